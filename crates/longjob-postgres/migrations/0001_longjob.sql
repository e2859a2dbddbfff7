-- longjob on PostgreSQL, schema version 1.
-- Runs with search_path set to the configured schema (default "longjob"), so every object,
-- and sqlx's own _sqlx_migrations table, lands in that schema.

-- The job record: the columns that are queried, plus JSONB for the rest.
CREATE TABLE download_jobs (
    id              uuid        PRIMARY KEY,
    kind            text        NOT NULL,
    owner           text        NOT NULL,
    state           text        NOT NULL,
    version         bigint      NOT NULL,
    lease_token     bigint      NOT NULL DEFAULT 0,
    attempt         integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL DEFAULT 1,
    payload         jsonb       NOT NULL,
    progress        jsonb       NOT NULL,
    error           jsonb,
    result          jsonb,
    idempotency_key text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    started_at      timestamptz,
    finished_at     timestamptz,
    run_at          timestamptz
);
-- list_by_owner (newest first: ids are UUID v7) and count_by_owner.
CREATE INDEX download_jobs_owner_id ON download_jobs (owner, id DESC);
-- count_by_owner: jobs created since a time, and unfinished jobs (only those are indexed).
CREATE INDEX download_jobs_owner_created ON download_jobs (owner, created_at);
CREATE INDEX download_jobs_active ON download_jobs (owner)
    WHERE state NOT IN ('completed', 'failed', 'cancelled');
-- purge_finished.
CREATE INDEX download_jobs_finished_at ON download_jobs (finished_at) WHERE finished_at IS NOT NULL;

-- Per-item records of a job (a download's files), in the job's order.
CREATE TABLE file_records (
    job_id  uuid    NOT NULL REFERENCES download_jobs (id) ON DELETE CASCADE,
    ord     integer NOT NULL,
    item_id text    NOT NULL,
    status  text    NOT NULL,
    size    bigint,
    error   text,
    PRIMARY KEY (job_id, ord)
);

-- Idempotency keys: one row per (owner, key); a row whose expires_at has passed may be taken over.
CREATE TABLE idempotency_keys (
    owner      text        NOT NULL,
    key        text        NOT NULL,
    job_id     uuid        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_keys_job ON idempotency_keys (job_id);
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);

-- The queue: one row per job id. A waiting job is claimable from available_at; a leased job
-- becomes claimable again at available_at (its lease's expiry), so one index serves claims and
-- the reaping of expired leases alike.
CREATE SEQUENCE lease_tokens;
CREATE TABLE queue (
    job_id       uuid        PRIMARY KEY,
    available_at timestamptz NOT NULL,
    leased       boolean     NOT NULL DEFAULT false,
    token        bigint      NOT NULL DEFAULT 0
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
CREATE INDEX queue_available_at ON queue (available_at, job_id);

-- Events: the last seq of each job, and the retained events for replay.
CREATE TABLE job_event_heads (
    job_id   uuid   PRIMARY KEY,
    last_seq bigint NOT NULL
);
CREATE TABLE job_events (
    job_id  uuid        NOT NULL,
    seq     bigint      NOT NULL,
    at      timestamptz NOT NULL,
    payload jsonb       NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE INDEX job_events_at ON job_events (at);

-- Cancel requests, so a cancel reaches workers even without notifications (polling).
CREATE TABLE cancel_requests (
    id     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id uuid        NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cancel_requests_at ON cancel_requests (at);
