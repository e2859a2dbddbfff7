-- longjob on PostgreSQL, schema version 3: fewer index entries written per job and per event.
--
-- B-tree inserts were 38 % of the WAL a job wrote (17 entries a job at N=20 000, no progress
-- events; pg_waldump --stats). Two of the indexes did work no query needed at that price:
--
-- - `download_jobs_owner_id (owner, id DESC)` served listings, which now read
--   `download_jobs_owner_created` backwards: ids are UUID v7, so an owner's jobs sort the same
--   by creation. The insert and the update that finishes a job (not a HOT update: it sets
--   finished_at) each wrote an entry in it.
-- - `job_events_at` (B-tree) served only `purge_events_before`, yet every event wrote an entry.
--   Events arrive in time order, so a BRIN index answers the purge's range scan as well, and
--   costs next to nothing per insert (a page range is summarized once, not per row).

DROP INDEX download_jobs_owner_id;

DROP INDEX job_events_at;
CREATE INDEX job_events_at ON job_events USING brin (at);
