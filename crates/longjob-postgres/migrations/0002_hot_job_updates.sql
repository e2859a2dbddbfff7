-- longjob on PostgreSQL, schema version 2: job updates that finish no job are HOT updates.
--
-- An update is HOT (no new index entries, pruned in place) only when it changes no indexed
-- column, columns in index predicates included, and the row's page has room for the new version.
-- Version 1 indexed the owner's unfinished jobs by `state NOT IN (terminal states)`, so every
-- state change (queued -> processing, processing -> retrying) wrote an entry in each of the
-- table's five indexes. "Unfinished" is `finished_at IS NULL` as well: longjob-core sets
-- finished_at exactly when a job reaches a terminal state and clears it when a failed or
-- cancelled job is requeued (Job's state machine tests check it). Only the update that
-- finishes a job then touches the indexes.

DROP INDEX download_jobs_active;
CREATE INDEX download_jobs_unfinished ON download_jobs (owner) WHERE finished_at IS NULL;

-- Room on each page for a new version of each of its rows, since the rows of a page (jobs
-- submitted together) tend to start together, before pruning can reclaim the old versions:
-- at 70, only about half of the starts were HOT under load; at 50, nearly all. Applies to
-- pages written from now on.
ALTER TABLE download_jobs SET (fillfactor = 50);
