//! [`PgQueue`]: the [`Queue`] on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use longjob_core::queue::{Lease, QueueStats};
use longjob_core::{BackendError, BackendResult, JobId, Queue};
use sqlx::{Acquire, Postgres};
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use crate::db::{Db, lock, secs};
use crate::error::BACKEND;
use crate::hub::Hub;
use longjob_core::batch::Batcher;

/// The [`Queue`] on PostgreSQL: one row per job id in the `queue` table.
///
/// - [`claim`](Queue::claim) is one statement for a whole batch: it picks due rows — waiting
///   jobs and expired leases alike, since both are "available" from a time — with
///   `FOR UPDATE SKIP LOCKED`, and leases them with fencing tokens from the `lease_tokens`
///   sequence.
/// - [`extend`](Queue::extend) is one statement however many leases.
/// - Pushes send a `NOTIFY` that wakes waiting claimers of every process; claimers also poll
///   (every [`poll_interval`](crate::PgConfig::poll_interval), or sooner when a job is due
///   sooner), so the queue works, only slower, with notifications off or lost.
///
/// Get one from [`PgBackend::queue`](crate::PgBackend::queue).
#[derive(Debug, Clone)]
pub struct PgQueue {
    db: Arc<Db>,
    hub: Option<Arc<Hub>>,
    /// Wakes claimers of this process on its own pushes, notifications or not.
    local: Arc<Notify>,
    sql: Arc<Sql>,
    acks: Arc<Batcher<Lease, bool>>,
    pushes: Arc<Batcher<(Vec<JobId>, Duration), ()>>,
    /// While a backlog drains: where this process's next claim may start looking, and since
    /// when claims have started there (see [`PgQueue::claim_once`]).
    claim_floor: Arc<std::sync::Mutex<Option<ClaimFloor>>>,
}

/// Most operations gathered in one statement.
const MAX_BATCH: usize = 256;

/// How long claims may start at a floor before one looks at the whole queue again.
const FLOOR_REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct ClaimFloor {
    /// The earliest due time among the jobs of the last full claim.
    due: DateTime<Utc>,
    since: Instant,
}

#[derive(Debug)]
struct Sql {
    push: String,
    claim: String,
    /// The claim, looking only at jobs due at or after `$3`.
    claim_from: String,
    next_due: String,
    extend: String,
    ack: String,
    requeue: String,
    stats: String,
}

impl Sql {
    fn new(db: &Db) -> Self {
        let notify = if db.notifications {
            format!(", length(pg_notify('{}', '')::text)", db.queue_channel())
        } else {
            String::new()
        };
        Self {
            // Ids are distinct and sorted (locks taken in id order: concurrent batches never
            // deadlock).
            push: db.sql(&format!(
                "WITH ins AS (INSERT INTO {{s}}.queue AS q (job_id, available_at, leased) \
                   SELECT id, now() + make_interval(secs => d), false \
                   FROM unnest($1::uuid[], $2::float8[]) AS t(id, d) ORDER BY id \
                   ON CONFLICT (job_id) DO UPDATE \
                     SET available_at = excluded.available_at, leased = false \
                   RETURNING 1) \
                 SELECT count(*){notify} FROM ins"
            )),
            claim: db.sql(&claim_sql("")),
            claim_from: db.sql(&claim_sql("AND available_at >= $3")),
            next_due: db
                .sql("SELECT extract(epoch FROM min(available_at) - now())::float8 FROM {s}.queue"),
            extend: db.sql(
                "WITH l AS (SELECT * FROM unnest($1::uuid[], $2::int8[]) AS l(job_id, token)), \
                 locked AS (SELECT job_id FROM {s}.queue WHERE job_id IN (SELECT job_id FROM l) \
                   ORDER BY job_id FOR UPDATE) \
                 UPDATE {s}.queue q SET available_at = now() + make_interval(secs => $3) \
                 FROM l, locked \
                 WHERE q.job_id = l.job_id AND locked.job_id = l.job_id AND q.token = l.token \
                   AND q.leased AND q.available_at > now() \
                 RETURNING q.job_id, q.token",
            ),
            // The leases, sorted by id, drive the delete (a nested loop over the primary key,
            // or a merge join on a small table), so rows are deleted, and locked, in id order
            // without a locking step of their own, which would write one more WAL record per row.
            ack: db.sql(
                "DELETE FROM {s}.queue q \
                 USING (SELECT * FROM unnest($1::uuid[], $2::int8[]) AS l(job_id, token) \
                   ORDER BY job_id) l \
                 WHERE q.job_id = l.job_id AND q.token = l.token \
                   AND q.leased AND q.available_at > now() \
                 RETURNING q.job_id, q.token",
            ),
            requeue: db.sql(&format!(
                "WITH u AS (UPDATE {{s}}.queue SET leased = false, \
                   available_at = now() + make_interval(secs => $3) \
                   WHERE job_id = $1 AND token = $2 AND leased AND available_at > now() \
                   RETURNING 1) \
                 SELECT count(*){notify} FROM u"
            )),
            stats: db.sql(
                "SELECT count(*) FILTER (WHERE available_at <= now()) AS ready, \
                   count(*) FILTER (WHERE NOT leased AND available_at > now()) AS delayed, \
                   count(*) FILTER (WHERE leased AND available_at > now()) AS leased \
                 FROM {s}.queue",
            ),
        }
    }
}

/// Claims up to `$1` due jobs for `$2` seconds (with `bound`, an extra condition on the due
/// time); returns their ids, tokens, due times and whether each was leased (an expired lease,
/// [`Lease::redelivered`]), earliest first.
fn claim_sql(bound: &str) -> String {
    format!(
        "WITH picked AS (SELECT job_id, available_at, leased FROM {{s}}.queue \
           WHERE available_at <= now() {bound} ORDER BY available_at, job_id \
           LIMIT $1 FOR UPDATE SKIP LOCKED), \
         leased AS (UPDATE {{s}}.queue q SET leased = true, \
           token = nextval('{{s}}.lease_tokens'), \
           available_at = now() + make_interval(secs => $2) \
           FROM picked WHERE q.job_id = picked.job_id \
           RETURNING q.job_id, q.token, picked.available_at AS due, picked.leased AS lost) \
         SELECT job_id, token, due, lost FROM leased ORDER BY due, job_id"
    )
}

fn token_of(lease: &Lease) -> BackendResult<i64> {
    i64::try_from(lease.token)
        .map_err(|_| BackendError::InvalidArgument(format!("lease token {}", lease.token)))
}

impl PgQueue {
    pub(crate) fn new(db: Arc<Db>, hub: Option<Arc<Hub>>) -> Self {
        let sql = Arc::new(Sql::new(&db));
        let acks = Arc::new(Batcher::new(BACKEND, MAX_BATCH, db.batch_in_flight, {
            let (db, sql) = (Arc::clone(&db), Arc::clone(&sql));
            move |leases| ack_many(Arc::clone(&db), Arc::clone(&sql), leases)
        }));
        let pushes = Arc::new(Batcher::new(BACKEND, MAX_BATCH, db.batch_in_flight, {
            let (db, sql) = (Arc::clone(&db), Arc::clone(&sql));
            move |pushes| push_many(Arc::clone(&db), Arc::clone(&sql), pushes)
        }));
        Self {
            db,
            hub,
            local: Arc::new(Notify::new()),
            sql,
            acks,
            pushes,
            claim_floor: Arc::default(),
        }
    }

    /// Pushes `jobs` through `conn`: a pool, a connection, or a transaction of the host
    /// application (`&mut *tx`), in which case they become claimable only if that transaction
    /// commits (and the wake-up notification is sent at commit too).
    pub async fn push_with<'c, A>(
        &self,
        conn: A,
        jobs: &[JobId],
        delay: Duration,
    ) -> BackendResult<()>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        if jobs.is_empty() {
            return Ok(());
        }
        let (ids, delays) = push_arrays(std::iter::once((jobs, delay)));
        let mut conn = self.db.run(conn.acquire()).await?;
        self.db
            .run(
                sqlx::query(&self.sql.push)
                    .bind(ids)
                    .bind(delays)
                    .execute(&mut *conn),
            )
            .await?;
        self.local.notify_waiters();
        Ok(())
    }

    /// Claims up to `max` due jobs.
    ///
    /// A claimed job's old entry in the `(available_at, job_id)` index stays behind, dead, until
    /// a vacuum, and claims take the earliest entries first: while a backlog drains, each claim
    /// would walk past every job claimed before it (measured: 98 index pages a claim at the
    /// start of a run of 200 000 jobs, 850 and 5 ms by its middle). So after a full claim the
    /// next one starts at the earliest due time that claim took. What it may then miss (a job
    /// another claimer had locked, or one pushed in a long transaction whose `now()` is in the
    /// past) is found by a claim that looks at the whole queue: when a claim from the floor
    /// comes back short (for the rest), and at least every [`FLOOR_REFRESH`].
    async fn claim_once(&self, max: i64, ttl: Duration) -> BackendResult<Vec<Lease>> {
        let floor = (*lock(&self.claim_floor)).filter(|f| f.since.elapsed() < FLOOR_REFRESH);
        let mut rows = match floor {
            Some(f) => self.claim_rows(max, ttl, Some(f.due)).await?,
            None => Vec::new(),
        };
        let whole_queue = floor.is_none() || (rows.len() as i64) < max;
        if whole_queue {
            let rest = max - rows.len() as i64;
            rows.extend(self.claim_rows(rest, ttl, None).await?);
        }
        let next = match rows.iter().map(|(_, _, due, _)| *due).min() {
            Some(due) if rows.len() as i64 >= max => Some(ClaimFloor {
                due,
                since: match floor {
                    Some(f) if !whole_queue => f.since,
                    _ => Instant::now(),
                },
            }),
            _ => None,
        };
        *lock(&self.claim_floor) = next;
        rows.into_iter()
            .map(|(id, token, _, lost)| {
                Ok(Lease {
                    job_id: JobId::from_uuid(id),
                    token: u64::try_from(token)
                        .map_err(|_| BackendError::corrupt(BACKEND, "negative lease token"))?,
                    redelivered: lost,
                })
            })
            .collect()
    }

    async fn claim_rows(
        &self,
        max: i64,
        ttl: Duration,
        from: Option<DateTime<Utc>>,
    ) -> BackendResult<Vec<(Uuid, i64, DateTime<Utc>, bool)>> {
        let query = match from {
            Some(from) => sqlx::query_as(&self.sql.claim_from)
                .bind(max)
                .bind(secs(ttl))
                .bind(from),
            None => sqlx::query_as(&self.sql.claim).bind(max).bind(secs(ttl)),
        };
        self.db.run(query.fetch_all(&self.db.pool)).await
    }

    /// How long until the next job (or expired lease) becomes available, if any is queued.
    async fn next_due(&self) -> BackendResult<Option<Duration>> {
        let secs: Option<f64> = self
            .db
            .run(sqlx::query_scalar(&self.sql.next_due).fetch_one(&self.db.pool))
            .await?;
        Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }
}

#[async_trait]
impl Queue for PgQueue {
    async fn push(&self, job: JobId, delay: Duration) -> BackendResult<()> {
        self.pushes.call((vec![job], delay)).await?;
        self.local.notify_waiters();
        Ok(())
    }

    async fn push_many(&self, jobs: &[JobId], delay: Duration) -> BackendResult<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        self.pushes.call((jobs.to_vec(), delay)).await?;
        self.local.notify_waiters();
        Ok(())
    }

    async fn claim(
        &self,
        max: usize,
        lease_ttl: Duration,
        wait: Duration,
    ) -> BackendResult<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let deadline = Instant::now() + wait;
        let never = Notify::new();
        loop {
            // Register interest before looking, so a wake-up between the look and the wait
            // is not lost.
            let local = self.local.notified();
            let remote = self
                .hub
                .as_ref()
                .map_or(&never, |h| &h.queue_wake)
                .notified();
            tokio::pin!(local, remote);
            local.as_mut().enable();
            remote.as_mut().enable();
            let leases = self.claim_once(max, lease_ttl).await?;
            let now = Instant::now();
            if !leases.is_empty() || now >= deadline {
                return Ok(leases);
            }
            let mut until = deadline.min(now + self.db.poll_interval);
            if let Some(due) = self.next_due().await? {
                until = until.min(now + due);
            }
            tokio::select! {
                () = &mut local => {}
                () = &mut remote => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn extend(&self, leases: &[Lease], ttl: Duration) -> BackendResult<Vec<bool>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = leases.iter().map(|l| *l.job_id.as_uuid()).collect();
        let tokens = leases
            .iter()
            .map(token_of)
            .collect::<BackendResult<Vec<_>>>()?;
        let held: Vec<(Uuid, i64)> = self
            .db
            .run(
                sqlx::query_as(&self.sql.extend)
                    .bind(ids)
                    .bind(tokens)
                    .bind(secs(ttl))
                    .fetch_all(&self.db.pool),
            )
            .await?;
        let held: std::collections::HashSet<(Uuid, i64)> = held.into_iter().collect();
        leases
            .iter()
            .map(|l| Ok(held.contains(&(*l.job_id.as_uuid(), token_of(l)?))))
            .collect()
    }

    async fn ack(&self, lease: &Lease) -> BackendResult<bool> {
        self.acks.call(*lease).await
    }

    async fn requeue(&self, lease: &Lease, delay: Duration) -> BackendResult<bool> {
        let n: i64 = self
            .db
            .run(
                sqlx::query_scalar(&self.sql.requeue)
                    .bind(lease.job_id.as_uuid())
                    .bind(token_of(lease)?)
                    .bind(secs(delay))
                    .fetch_one(&self.db.pool),
            )
            .await?;
        if n == 1 {
            self.local.notify_waiters();
        }
        Ok(n == 1)
    }

    async fn stats(&self) -> BackendResult<QueueStats> {
        let (ready, delayed, leased): (i64, i64, i64) = self
            .db
            .run(sqlx::query_as(&self.sql.stats).fetch_one(&self.db.pool))
            .await?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(QueueStats {
            ready: n(ready),
            delayed: n(delayed),
            leased: n(leased),
        })
    }

    async fn health(&self) -> BackendResult<()> {
        self.db
            .run(sqlx::query("SELECT 1").execute(&self.db.pool))
            .await
            .map(|_| ())
    }
}

/// Distinct ids sorted, each with its delay in seconds (the last push of an id wins).
fn push_arrays<'a>(pushes: impl Iterator<Item = (&'a [JobId], Duration)>) -> (Vec<Uuid>, Vec<f64>) {
    let mut due = std::collections::BTreeMap::new();
    for (jobs, delay) in pushes {
        for job in jobs {
            due.insert(*job.as_uuid(), secs(delay));
        }
    }
    due.into_iter().unzip()
}

async fn push_many(
    db: Arc<Db>,
    sql: Arc<Sql>,
    pushes: Vec<(Vec<JobId>, Duration)>,
) -> BackendResult<Vec<BackendResult<()>>> {
    let (ids, delays) = push_arrays(pushes.iter().map(|(jobs, d)| (jobs.as_slice(), *d)));
    db.run(
        sqlx::query(&sql.push)
            .bind(ids)
            .bind(delays)
            .execute(&db.pool),
    )
    .await?;
    Ok(pushes.iter().map(|_| Ok(())).collect())
}

async fn ack_many(
    db: Arc<Db>,
    sql: Arc<Sql>,
    leases: Vec<Lease>,
) -> BackendResult<Vec<BackendResult<bool>>> {
    let mut ids = Vec::with_capacity(leases.len());
    let mut tokens = Vec::with_capacity(leases.len());
    for lease in &leases {
        ids.push(*lease.job_id.as_uuid());
        tokens.push(token_of(lease)?);
    }
    let acked: Vec<(Uuid, i64)> = db
        .run(
            sqlx::query_as(&sql.ack)
                .bind(ids)
                .bind(tokens)
                .fetch_all(&db.relaxed),
        )
        .await?;
    // A lease acked twice in one batch is acked once.
    let mut acked: std::collections::HashSet<(Uuid, i64)> = acked.into_iter().collect();
    Ok(leases
        .iter()
        .map(|l| Ok(acked.remove(&(*l.job_id.as_uuid(), token_of(l)?))))
        .collect())
}
