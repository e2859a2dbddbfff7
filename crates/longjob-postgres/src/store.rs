//! [`PgJobStore`]: the [`JobStore`] on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use longjob_core::store::{Inserted, OwnerCounts, OwnerQuota, QuotaHit};
use longjob_core::{
    BackendError, BackendResult, ItemRecord, ItemStatus, Job, JobError, JobId, JobResult, JobState,
    JobStore, Progress,
};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Acquire, PgConnection, Postgres};
use uuid::Uuid;

use crate::db::{Db, secs};
use crate::error::{BACKEND, duplicate_job_id};
use longjob_core::batch::Batcher;

/// The longest idempotency time-to-live stored (longer ones are cut to it).
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The [`JobStore`] on PostgreSQL: jobs in `download_jobs`, their items in `file_records`,
/// idempotency keys in `idempotency_keys`.
///
/// Every write is one statement: [`update`](JobStore::update) is a compare-and-set on `version`
/// that also checks the fencing token (`UPDATE … WHERE id = $1 AND version = $2 AND
/// lease_token <= $3`), and writes the changed item records in the same statement.
/// Get one from [`PgBackend::store`](crate::PgBackend::store).
#[derive(Debug, Clone)]
pub struct PgJobStore {
    db: Arc<Db>,
    sql: Arc<Sql>,
    updates: Arc<Batcher<Job, Option<i64>>>,
    gets: Arc<Batcher<JobId, Option<Job>>>,
}

#[derive(Debug)]
struct Sql {
    insert: String,
    insert_keyed: String,
    insert_many: String,
    get_many: String,
    update_many: String,
    version_of: String,
    list: String,
    find_key: String,
    count: String,
    purge: String,
}

/// The job columns, with the items aggregated in order, for a job aliased `j`.
const COLUMNS: &str = "j.id, j.kind, j.owner, j.state, j.version, j.lease_token, j.attempt, \
    j.max_attempts, j.payload, j.progress, j.error, j.result, j.idempotency_key, j.created_at, \
    j.updated_at, j.started_at, j.finished_at, j.run_at, \
    (SELECT coalesce(jsonb_agg(jsonb_build_object('id', f.item_id, 'status', f.status, \
        'size', f.size, 'error', f.error) ORDER BY f.ord), '[]'::jsonb) \
     FROM {s}.file_records f WHERE f.job_id = j.id) AS items";

const INSERT_COLUMNS: &str = "id, kind, owner, state, version, lease_token, attempt, \
    max_attempts, payload, progress, error, result, idempotency_key, created_at, updated_at, \
    started_at, finished_at, run_at";

const INSERT_VALUES: &str =
    "$1, $2, $3, $4, 1, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17";

const INSERT_ITEMS: &str = "INSERT INTO {s}.file_records (job_id, ord, item_id, status, size, error) \
    SELECT j.id, t.ord::int, t.item_id, t.status, t.size, t.error \
    FROM j, unnest($18::text[], $19::text[], $20::int8[], $21::text[]) \
        WITH ORDINALITY AS t(item_id, status, size, error, ord)";

/// Many compare-and-set updates in one statement; each op's CAS is checked on the latest row
/// version (a row updated meanwhile is re-read and re-checked, as any UPDATE in READ COMMITTED).
/// The ops, sorted by id, drive the update, so with a nested loop over the primary key (or a
/// merge join) rows are updated, and locked, in id order and concurrent batches do not
/// deadlock. Locking them in a step of their own first would guarantee that order whatever the
/// plan, but cost one more WAL record per row (a third of the statement's time); with a hash
/// join (a table of a few thousand jobs at most) two batches sharing two jobs may deadlock,
/// which PostgreSQL breaks by failing one with a transient error. `$26` is the
/// `synchronous_commit` of the statement's own (implicit) transaction: `'off'` for a batch of
/// worker transitions under [`PgConfig::relaxed_worker_writes`](crate::PgConfig), NULL to keep
/// the connection's setting; `set_config(…, true)` lasts until the commit, which reads it.
/// Answers `(op, new version)` for the ops that were written.
const UPDATE_MANY: &str = "WITH v AS (SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[], \
       $4::text[], $5::text[], $6::text[], $7::int4[], $8::int4[], $9::jsonb[], $10::jsonb[], \
       $11::jsonb[], $12::jsonb[], $13::text[], $14::timestamptz[], $15::timestamptz[], \
       $16::timestamptz[], $17::timestamptz[], $18::int4[], $19::int4[]) \
     AS v(id, version, token, kind, owner, state, attempt, max_attempts, payload, progress, \
       error, result, idempotency_key, updated_at, started_at, finished_at, run_at, n_items, op)), \
   u AS (UPDATE {s}.download_jobs j SET kind = v.kind, owner = v.owner, state = v.state, \
       version = j.version + 1, lease_token = v.token, attempt = v.attempt, \
       max_attempts = v.max_attempts, payload = v.payload, progress = v.progress, \
       error = v.error, result = v.result, idempotency_key = v.idempotency_key, \
       updated_at = v.updated_at, started_at = v.started_at, finished_at = v.finished_at, \
       run_at = v.run_at \
     FROM (SELECT * FROM v ORDER BY id) v \
     WHERE j.id = v.id AND j.version = v.version AND j.lease_token <= v.token \
     RETURNING v.op, j.id, j.version, v.n_items), \
   f AS (INSERT INTO {s}.file_records AS r (job_id, ord, item_id, status, size, error) \
     SELECT u.id, t.ord, t.item_id, t.status, t.size, t.error \
     FROM unnest($20::int4[], $21::int4[], $22::text[], $23::text[], $24::int8[], $25::text[]) \
       AS t(op, ord, item_id, status, size, error) \
     JOIN u ON u.op = t.op ORDER BY u.id, t.ord \
     ON CONFLICT (job_id, ord) DO UPDATE SET item_id = excluded.item_id, \
       status = excluded.status, size = excluded.size, error = excluded.error \
     WHERE (r.item_id, r.status, r.size, r.error) IS DISTINCT FROM \
       (excluded.item_id, excluded.status, excluded.size, excluded.error)), \
   d AS (DELETE FROM {s}.file_records r USING u WHERE r.job_id = u.id AND r.ord > u.n_items), \
   c AS (SELECT set_config('synchronous_commit', \
       coalesce($26::text, current_setting('synchronous_commit')), true)) \
 SELECT op, version FROM u, c";

/// Most operations gathered in one statement.
const MAX_BATCH: usize = 256;

impl Sql {
    fn new(db: &Db) -> Self {
        let columns = db.sql(COLUMNS);
        let items = db.sql(INSERT_ITEMS);
        Self {
            insert: db.sql(&format!(
                "WITH j AS (INSERT INTO {{s}}.download_jobs ({INSERT_COLUMNS}) \
                 VALUES ({INSERT_VALUES}) RETURNING id), f AS ({items}) SELECT count(*) FROM j"
            )),
            insert_keyed: db.sql(&format!(
                "WITH k AS (INSERT INTO {{s}}.idempotency_keys AS ik (owner, key, job_id, expires_at) \
                   VALUES ($3, $12, $1, now() + make_interval(secs => $22)) \
                   ON CONFLICT (owner, key) DO UPDATE \
                     SET job_id = excluded.job_id, expires_at = excluded.expires_at \
                     WHERE ik.expires_at <= now() \
                   RETURNING job_id), \
                 j AS (INSERT INTO {{s}}.download_jobs ({INSERT_COLUMNS}) \
                   SELECT {INSERT_VALUES} FROM k RETURNING id), \
                 f AS ({items}) SELECT count(*) FROM j"
            )),
            insert_many: db.sql(&format!(
                "WITH j AS (INSERT INTO {{s}}.download_jobs ({INSERT_COLUMNS}) \
                   SELECT id, kind, owner, state, 1, lease_token, attempt, max_attempts, payload, \
                     progress, error, result, NULL, created_at, updated_at, started_at, \
                     finished_at, run_at \
                   FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], \
                     $6::int4[], $7::int4[], $8::jsonb[], $9::jsonb[], $10::jsonb[], $11::jsonb[], \
                     $12::timestamptz[], $13::timestamptz[], $14::timestamptz[], \
                     $15::timestamptz[], $16::timestamptz[]) \
                     AS t(id, kind, owner, state, lease_token, attempt, max_attempts, payload, \
                       progress, error, result, created_at, updated_at, started_at, finished_at, \
                       run_at) \
                   RETURNING id) \
                 INSERT INTO {{s}}.file_records (job_id, ord, item_id, status, size, error) \
                 SELECT job_id, ord, item_id, status, size, error \
                 FROM unnest($17::uuid[], $18::int4[], $19::text[], $20::text[], $21::int8[], \
                   $22::text[]) AS t(job_id, ord, item_id, status, size, error) \
                 WHERE (SELECT count(*) FROM j) > 0"
            )),
            get_many: format!(
                "SELECT {columns} FROM {}.download_jobs j WHERE j.id = ANY($1)",
                db.schema
            ),
            update_many: db.sql(UPDATE_MANY),
            version_of: db
                .sql("SELECT version, lease_token FROM {s}.download_jobs WHERE id = $1"),
            list: format!(
                // Newest first by the (owner, created_at) index read backwards; ids (UUID v7)
                // break ties of one microsecond the way they were made.
                "SELECT {columns} FROM {}.download_jobs j WHERE j.owner = $1 \
                 ORDER BY j.created_at DESC, j.id DESC LIMIT $2",
                db.schema
            ),
            find_key: format!(
                "SELECT {columns} FROM {s}.idempotency_keys k \
                 JOIN {s}.download_jobs j ON j.id = k.job_id \
                 WHERE k.owner = $1 AND k.key = $2 AND k.expires_at > now()",
                s = db.schema
            ),
            // Two index scans: the owner's jobs since a time, and the owner's unfinished jobs
            // (a partial index holds only those). Unfinished is `finished_at IS NULL`, which
            // core keeps equal to a non-terminal state; the predicate must match the index's.
            count: db.sql(
                "SELECT (SELECT count(*) FROM {s}.download_jobs \
                     WHERE owner = $1 AND created_at >= $2) AS created, \
                   (SELECT count(*) FROM {s}.download_jobs WHERE owner = $1 \
                     AND finished_at IS NULL) AS active",
            ),
            purge: format!(
                "WITH v AS (SELECT id FROM {s}.download_jobs \
                   WHERE finished_at < $1 AND state IN ('completed', 'failed', 'cancelled') \
                   ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
                 gone AS (SELECT {columns} FROM {s}.download_jobs j JOIN v ON v.id = j.id), \
                 d AS (DELETE FROM {s}.download_jobs x USING v WHERE x.id = v.id), \
                 k AS (DELETE FROM {s}.idempotency_keys x USING v WHERE x.job_id = v.id) \
                 SELECT * FROM gone",
                s = db.schema
            ),
        }
    }
}

fn to_i64(v: u64, what: &str) -> BackendResult<i64> {
    i64::try_from(v).map_err(|_| BackendError::InvalidArgument(format!("{what} {v} is too large")))
}

fn to_i32(v: u32, what: &str) -> BackendResult<i32> {
    i32::try_from(v).map_err(|_| BackendError::InvalidArgument(format!("{what} {v} is too large")))
}

fn to_u64(v: i64, what: &str) -> BackendResult<u64> {
    u64::try_from(v).map_err(|_| BackendError::corrupt(BACKEND, format_args!("negative {what}")))
}

const fn item_status(status: ItemStatus) -> &'static str {
    match status {
        ItemStatus::Pending => "pending",
        ItemStatus::Completed => "completed",
        ItemStatus::Skipped => "skipped",
        ItemStatus::Failed => "failed",
    }
}

/// A job's items as four parallel arrays.
struct Items {
    ids: Vec<String>,
    statuses: Vec<&'static str>,
    sizes: Vec<Option<i64>>,
    errors: Vec<Option<String>>,
}

impl Items {
    fn of(job: &Job) -> BackendResult<Self> {
        let n = job.items.len();
        let mut items = Self {
            ids: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            sizes: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
        };
        for item in &job.items {
            items.ids.push(item.id.clone());
            items.statuses.push(item_status(item.status));
            items
                .sizes
                .push(item.size.map(|s| to_i64(s, "item size")).transpose()?);
            items.errors.push(item.error.clone());
        }
        Ok(items)
    }
}

/// A job's scalar fields, converted for binding.
struct Scalars {
    lease_token: i64,
    attempt: i32,
    max_attempts: i32,
}

impl Scalars {
    fn of(job: &Job) -> BackendResult<Self> {
        Ok(Self {
            lease_token: to_i64(job.lease_token, "lease token")?,
            attempt: to_i32(job.attempt, "attempt")?,
            max_attempts: to_i32(job.max_attempts, "max attempts")?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    kind: String,
    owner: String,
    state: String,
    version: i64,
    lease_token: i64,
    attempt: i32,
    max_attempts: i32,
    payload: serde_json::Value,
    progress: Json<Progress>,
    error: Option<Json<JobError>>,
    result: Option<Json<JobResult>>,
    idempotency_key: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    run_at: Option<DateTime<Utc>>,
    items: Json<Vec<ItemRecord>>,
}

impl JobRow {
    fn into_job(self) -> BackendResult<Job> {
        let state = JobState::parse(&self.state).ok_or_else(|| {
            BackendError::corrupt(BACKEND, format_args!("unknown job state {:?}", self.state))
        })?;
        Ok(Job {
            id: JobId::from_uuid(self.id),
            kind: self.kind,
            owner: self.owner,
            payload: self.payload,
            state,
            attempt: u32::try_from(self.attempt)
                .map_err(|_| BackendError::corrupt(BACKEND, "negative attempt"))?,
            max_attempts: u32::try_from(self.max_attempts)
                .map_err(|_| BackendError::corrupt(BACKEND, "negative max attempts"))?,
            progress: self.progress.0,
            items: self.items.0,
            error: self.error.map(|e| e.0),
            result: self.result.map(|r| r.0),
            idempotency_key: self.idempotency_key,
            created_at: self.created_at,
            updated_at: self.updated_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            run_at: self.run_at,
            lease_token: to_u64(self.lease_token, "lease token")?,
            version: to_u64(self.version, "version")?,
        })
    }
}

impl PgJobStore {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        let sql = Arc::new(Sql::new(&db));
        let updates = Arc::new(Batcher::new(BACKEND, MAX_BATCH, db.batch_in_flight, {
            let (db, sql) = (Arc::clone(&db), Arc::clone(&sql));
            move |jobs| update_many(Arc::clone(&db), Arc::clone(&sql), jobs)
        }));
        let gets = Arc::new(Batcher::new(BACKEND, MAX_BATCH, db.batch_in_flight, {
            let (db, sql) = (Arc::clone(&db), Arc::clone(&sql));
            move |ids| get_many(Arc::clone(&db), Arc::clone(&sql), ids)
        }));
        Self {
            db,
            sql,
            updates,
            gets,
        }
    }

    /// Binds the 21 (22 with a key) parameters of an insert.
    fn insert_query<'q>(
        &'q self,
        job: &'q Job,
        scalars: &Scalars,
        items: Items,
        ttl: Option<Duration>,
    ) -> Query<'q, Postgres, PgArguments> {
        let sql = if ttl.is_some() {
            &self.sql.insert_keyed
        } else {
            &self.sql.insert
        };
        let q = sqlx::query(sql)
            .bind(job.id.as_uuid())
            .bind(&job.kind)
            .bind(&job.owner)
            .bind(job.state.as_str())
            .bind(scalars.lease_token)
            .bind(scalars.attempt)
            .bind(scalars.max_attempts)
            .bind(Json(&job.payload))
            .bind(Json(job.progress))
            .bind(job.error.as_ref().map(Json))
            .bind(job.result.as_ref().map(Json))
            .bind(job.idempotency_key.as_deref())
            .bind(job.created_at)
            .bind(job.updated_at)
            .bind(job.started_at)
            .bind(job.finished_at)
            .bind(job.run_at)
            .bind(items.ids)
            .bind(items.statuses)
            .bind(items.sizes)
            .bind(items.errors);
        match ttl {
            Some(ttl) => q.bind(secs(ttl.min(MAX_TTL))),
            None => q,
        }
    }

    /// Inserts `job` through `conn`: a pool, a connection, or a transaction of the host
    /// application (`&mut *tx`), in which case the job exists only if that transaction commits.
    ///
    /// Inside a transaction, a refused insert (the id exists already) aborts that transaction,
    /// as any failed statement does in PostgreSQL.
    pub async fn insert_with<'c, A>(
        &self,
        conn: A,
        job: &Job,
        idempotency_ttl: Duration,
    ) -> BackendResult<Inserted>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        let mut conn = self.db.run(conn.acquire()).await?;
        self.insert_on(&mut conn, job, idempotency_ttl).await
    }

    /// The live job holding the owner's idempotency key, through `conn`.
    async fn find_key_on<'c, E>(
        &self,
        conn: E,
        owner: &str,
        key: &str,
    ) -> BackendResult<Option<Job>>
    where
        E: sqlx::Executor<'c, Database = Postgres>,
    {
        let found = self
            .db
            .run(
                sqlx::query_as::<_, JobRow>(&self.sql.find_key)
                    .bind(owner)
                    .bind(key)
                    .fetch_optional(conn),
            )
            .await?;
        found.map(JobRow::into_job).transpose()
    }

    /// The owner's counts for quotas, through `conn` (the pool, or a transaction).
    async fn counts_on<'c, E>(
        &self,
        conn: E,
        owner: &str,
        since: DateTime<Utc>,
    ) -> BackendResult<OwnerCounts>
    where
        E: sqlx::Executor<'c, Database = Postgres>,
    {
        let (created, active): (i64, i64) = self
            .db
            .run(
                sqlx::query_as(&self.sql.count)
                    .bind(owner)
                    .bind(since)
                    .fetch_one(conn),
            )
            .await?;
        Ok(OwnerCounts {
            created_since: to_u64(created, "count")?,
            active: to_u64(active, "count")?,
        })
    }

    async fn insert_on(
        &self,
        conn: &mut PgConnection,
        job: &Job,
        idempotency_ttl: Duration,
    ) -> BackendResult<Inserted> {
        let scalars = Scalars::of(job)?;
        let ttl = job.idempotency_key.as_ref().map(|_| idempotency_ttl);
        for _ in 0..3 {
            let q = self.insert_query(job, &scalars, Items::of(job)?, ttl);
            let inserted: i64 = match self.db.run_raw(q.fetch_one(&mut *conn)).await? {
                Ok(row) => sqlx::Row::try_get(&row, 0).map_err(|e| self.db.err(e))?,
                Err(e) if duplicate_job_id(&e).is_some() => {
                    return Err(BackendError::AlreadyExists(job.id));
                }
                Err(e) => return Err(self.db.err(e)),
            };
            if inserted == 1 {
                let mut stored = job.clone();
                stored.version = 1;
                return Ok(Inserted::New(stored));
            }
            // The key is held by a live job: return it (unless it expired meanwhile; then try
            // again).
            let (Some(key), true) = (&job.idempotency_key, ttl.is_some()) else {
                break;
            };
            if let Some(job) = self.find_key_on(&mut *conn, &job.owner, key).await? {
                return Ok(Inserted::Existing(job));
            }
        }
        Err(BackendError::corrupt(
            BACKEND,
            "idempotency key neither free nor held by a job",
        ))
    }
}

#[async_trait]
impl JobStore for PgJobStore {
    async fn insert(&self, job: &Job, idempotency_ttl: Duration) -> BackendResult<Inserted> {
        self.insert_with(&self.db.pool, job, idempotency_ttl).await
    }

    /// One transaction: an advisory lock on the owner (per schema), then the idempotency key,
    /// the counts and the insert. One owner's checked inserts take turns, from any number of
    /// processes; other owners' do not wait (unless their names' hashes collide).
    async fn insert_within(
        &self,
        job: &Job,
        idempotency_ttl: Duration,
        quota: &OwnerQuota,
    ) -> BackendResult<Result<Inserted, QuotaHit>> {
        let mut tx = self.db.run(self.db.pool.begin()).await?;
        self.db
            .run(
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
                    .bind(&self.db.schema)
                    .bind(&job.owner)
                    .execute(&mut *tx),
            )
            .await?;
        if let Some(key) = &job.idempotency_key {
            if let Some(job) = self.find_key_on(&mut *tx, &job.owner, key).await? {
                return Ok(Ok(Inserted::Existing(job)));
            }
        }
        // Read committed: this statement sees every insert committed before we got the lock.
        let counts = self.counts_on(&mut *tx, &job.owner, quota.since).await?;
        if let Some(hit) = quota.check(&counts) {
            return Ok(Err(hit));
        }
        let inserted = self.insert_on(&mut tx, job, idempotency_ttl).await?;
        self.db.run(tx.commit()).await?;
        Ok(Ok(inserted))
    }

    async fn insert_many(&self, jobs: &[Job]) -> BackendResult<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let n = jobs.len();
        let mut ids = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut owners = Vec::with_capacity(n);
        let mut states = Vec::with_capacity(n);
        let mut tokens = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut max_attempts = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut progresses = Vec::with_capacity(n);
        let mut errors = Vec::with_capacity(n);
        let mut results = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        let mut updated = Vec::with_capacity(n);
        let mut started = Vec::with_capacity(n);
        let mut finished = Vec::with_capacity(n);
        let mut run_at = Vec::with_capacity(n);
        let (mut item_jobs, mut item_ords, mut item_ids, mut item_statuses) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut item_sizes, mut item_errors) = (Vec::new(), Vec::new());
        for job in jobs {
            let scalars = Scalars::of(job)?;
            ids.push(*job.id.as_uuid());
            kinds.push(job.kind.as_str());
            owners.push(job.owner.as_str());
            states.push(job.state.as_str());
            tokens.push(scalars.lease_token);
            attempts.push(scalars.attempt);
            max_attempts.push(scalars.max_attempts);
            payloads.push(Json(&job.payload));
            progresses.push(Json(job.progress));
            errors.push(job.error.as_ref().map(Json));
            results.push(job.result.as_ref().map(Json));
            created.push(job.created_at);
            updated.push(job.updated_at);
            started.push(job.started_at);
            finished.push(job.finished_at);
            run_at.push(job.run_at);
            for (ord, item) in job.items.iter().enumerate() {
                item_jobs.push(*job.id.as_uuid());
                item_ords.push(i32::try_from(ord + 1).unwrap_or(i32::MAX));
                item_ids.push(item.id.as_str());
                item_statuses.push(item_status(item.status));
                item_sizes.push(item.size.map(|s| to_i64(s, "item size")).transpose()?);
                item_errors.push(item.error.as_deref());
            }
        }
        let q = sqlx::query(&self.sql.insert_many)
            .bind(ids)
            .bind(kinds)
            .bind(owners)
            .bind(states)
            .bind(tokens)
            .bind(attempts)
            .bind(max_attempts)
            .bind(payloads)
            .bind(progresses)
            .bind(errors)
            .bind(results)
            .bind(created)
            .bind(updated)
            .bind(started)
            .bind(finished)
            .bind(run_at)
            .bind(item_jobs)
            .bind(item_ords)
            .bind(item_ids)
            .bind(item_statuses)
            .bind(item_sizes)
            .bind(item_errors);
        match self.db.run_raw(q.execute(&self.db.pool)).await? {
            Ok(_) => Ok(()),
            Err(e) => match duplicate_job_id(&e) {
                Some(id) => Err(BackendError::AlreadyExists(id.unwrap_or(jobs[0].id))),
                None => Err(self.db.err(e)),
            },
        }
    }

    async fn get(&self, id: JobId) -> BackendResult<Option<Job>> {
        self.gets.call(id).await
    }

    async fn update(&self, job: &Job) -> BackendResult<Job> {
        let scalars = Scalars::of(job)?;
        let version = to_i64(job.version, "version")?;
        if let Some(new_version) = self.updates.call(job.clone()).await? {
            let mut stored = job.clone();
            stored.version = to_u64(new_version, "version")?;
            return Ok(stored);
        }
        let current: Option<(i64, i64)> = self
            .db
            .run(
                sqlx::query_as(&self.sql.version_of)
                    .bind(job.id.as_uuid())
                    .fetch_optional(&self.db.pool),
            )
            .await?;
        let Some((actual, token)) = current else {
            return Err(BackendError::NotFound(job.id));
        };
        if actual != version || token <= scalars.lease_token {
            // A version mismatch, or a concurrent writer that committed between the two
            // statements: either way the writer must re-read.
            return Err(BackendError::Conflict {
                id: job.id,
                expected: job.version,
                actual: to_u64(actual, "version")?,
            });
        }
        Err(BackendError::Fenced {
            id: job.id,
            token: job.lease_token,
            current: to_u64(token, "lease token")?,
        })
    }

    async fn list_by_owner(&self, owner: &str, limit: usize) -> BackendResult<Vec<Job>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .db
            .run(
                sqlx::query_as::<_, JobRow>(&self.sql.list)
                    .bind(owner)
                    .bind(limit)
                    .fetch_all(&self.db.pool),
            )
            .await?;
        rows.into_iter().map(JobRow::into_job).collect()
    }

    async fn find_by_idempotency_key(&self, owner: &str, key: &str) -> BackendResult<Option<Job>> {
        self.find_key_on(&self.db.pool, owner, key).await
    }

    async fn count_by_owner(
        &self,
        owner: &str,
        since: DateTime<Utc>,
    ) -> BackendResult<OwnerCounts> {
        self.counts_on(&self.db.pool, owner, since).await
    }

    async fn purge_finished(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> BackendResult<Vec<Job>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .db
            .run(
                sqlx::query_as::<_, JobRow>(&self.sql.purge)
                    .bind(finished_before)
                    .bind(limit)
                    .fetch_all(&self.db.pool),
            )
            .await?;
        rows.into_iter().map(JobRow::into_job).collect()
    }

    async fn health(&self) -> BackendResult<()> {
        self.db
            .run(sqlx::query("SELECT 1").execute(&self.db.pool))
            .await
            .map(|_| ())
    }
}

async fn get_many(
    db: Arc<Db>,
    sql: Arc<Sql>,
    ids: Vec<JobId>,
) -> BackendResult<Vec<BackendResult<Option<Job>>>> {
    let uuids: Vec<Uuid> = ids.iter().map(|id| *id.as_uuid()).collect();
    let rows = db
        .run(
            sqlx::query_as::<_, JobRow>(&sql.get_many)
                .bind(uuids)
                .fetch_all(&db.pool),
        )
        .await?;
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        found.insert(JobId::from_uuid(row.id), row.into_job());
    }
    Ok(ids
        .iter()
        .map(|id| match found.get(id) {
            None => Ok(None),
            Some(Ok(job)) => Ok(Some(job.clone())),
            Some(Err(e)) => Err(e.share()),
        })
        .collect())
}

/// Whether `job`, as about to be written, is a worker's transition: a start, a progress flush
/// or an attempt's end (states `processing`, `completed`, `failed`, `retrying`) under a lease
/// (a fencing token: tokens start at 1). The API's writes — cancel, manual retry (`cancelled`,
/// `queued`), and failing a job that could not be queued (never leased, token 0) — are not.
fn worker_transition(job: &Job) -> bool {
    job.lease_token > 0
        && matches!(
            job.state,
            JobState::Running | JobState::Completed | JobState::Failed | JobState::Retrying
        )
}

/// Writes a batch of updates in one statement; `Some(new version)` for each op written,
/// `None` for each whose compare-and-set failed.
async fn update_many(
    db: Arc<Db>,
    sql: Arc<Sql>,
    jobs: Vec<Job>,
) -> BackendResult<Vec<BackendResult<Option<i64>>>> {
    let n = jobs.len();
    let mut results: Vec<BackendResult<Option<i64>>> = (0..n).map(|_| Ok(None)).collect();
    let mut ids = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut owners = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut progresses = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut job_results = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut updated = Vec::with_capacity(n);
    let mut started = Vec::with_capacity(n);
    let mut finished = Vec::with_capacity(n);
    let mut run_at = Vec::with_capacity(n);
    let mut n_items = Vec::with_capacity(n);
    let mut ops = Vec::with_capacity(n);
    let (mut item_ops, mut item_ords, mut item_ids, mut item_statuses) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut item_sizes, mut item_errors) = (Vec::new(), Vec::new());
    for (op, job) in jobs.iter().enumerate() {
        let checked = Scalars::of(job).and_then(|s| {
            let items = Items::of(job)?;
            Ok((s, to_i64(job.version, "version")?, items))
        });
        let (scalars, version, items) = match checked {
            Ok(v) => v,
            Err(e) => {
                results[op] = Err(e);
                continue;
            }
        };
        let op = i32::try_from(op).unwrap_or(i32::MAX);
        ids.push(*job.id.as_uuid());
        versions.push(version);
        tokens.push(scalars.lease_token);
        kinds.push(job.kind.as_str());
        owners.push(job.owner.as_str());
        states.push(job.state.as_str());
        attempts.push(scalars.attempt);
        max_attempts.push(scalars.max_attempts);
        payloads.push(Json(&job.payload));
        progresses.push(Json(job.progress));
        errors.push(job.error.as_ref().map(Json));
        job_results.push(job.result.as_ref().map(Json));
        keys.push(job.idempotency_key.as_deref());
        updated.push(job.updated_at);
        started.push(job.started_at);
        finished.push(job.finished_at);
        run_at.push(job.run_at);
        n_items.push(i32::try_from(items.ids.len()).unwrap_or(i32::MAX));
        ops.push(op);
        for (i, id) in items.ids.into_iter().enumerate() {
            item_ops.push(op);
            item_ords.push(i32::try_from(i + 1).unwrap_or(i32::MAX));
            item_ids.push(id);
            item_statuses.push(items.statuses[i]);
            item_sizes.push(items.sizes[i]);
            item_errors.push(items.errors[i].clone());
        }
    }
    if ids.is_empty() {
        return Ok(results);
    }
    // One write that must be durable makes the whole batch durable.
    let relaxed = db.relaxed_worker_writes
        && jobs
            .iter()
            .zip(&results)
            .all(|(job, checked)| checked.is_err() || worker_transition(job));
    let written: Vec<(i32, i64)> = db
        .run(
            sqlx::query_as(&sql.update_many)
                .bind(ids)
                .bind(versions)
                .bind(tokens)
                .bind(kinds)
                .bind(owners)
                .bind(states)
                .bind(attempts)
                .bind(max_attempts)
                .bind(payloads)
                .bind(progresses)
                .bind(errors)
                .bind(job_results)
                .bind(keys)
                .bind(updated)
                .bind(started)
                .bind(finished)
                .bind(run_at)
                .bind(n_items)
                .bind(ops)
                .bind(item_ops)
                .bind(item_ords)
                .bind(item_ids)
                .bind(item_statuses)
                .bind(item_sizes)
                .bind(item_errors)
                .bind(relaxed.then_some("off"))
                .fetch_all(&db.pool),
        )
        .await?;
    for (op, version) in written {
        if let Some(slot) = usize::try_from(op).ok().and_then(|op| results.get_mut(op)) {
            *slot = Ok(Some(version));
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_leased_worker_states_are_worker_transitions() {
        let queued = Job::new("k", "o", serde_json::json!(null));
        assert!(!worker_transition(&queued));
        let mut running = queued.clone();
        assert!(running.start(7, Utc::now()).is_ok());
        assert!(worker_transition(&running));
        let mut done = running.clone();
        assert!(done.complete(None, Utc::now()).is_ok());
        assert!(worker_transition(&done));
        let mut failed = running.clone();
        assert!(failed.fail(JobError::internal("x"), Utc::now()).is_ok());
        assert!(worker_transition(&failed));
        // A cancel of a running job carries its token, and is still the API's.
        let mut cancelled = running.clone();
        assert!(cancelled.cancel(Utc::now()).is_ok());
        assert!(!worker_transition(&cancelled));
        // Failing a job that could not be queued: never leased.
        let mut unqueued = queued.clone();
        assert!(unqueued.start(0, Utc::now()).is_ok());
        assert!(unqueued.fail(JobError::internal("x"), Utc::now()).is_ok());
        assert!(!worker_transition(&unqueued));
    }
}
