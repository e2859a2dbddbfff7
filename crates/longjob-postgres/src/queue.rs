//! [`PgQueue`]: the [`Queue`] on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use longjob_core::queue::{Lease, QueueStats};
use longjob_core::{BackendError, BackendResult, JobId, Queue};
use sqlx::{Acquire, Postgres};
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use crate::db::{Db, secs};
use crate::error::BACKEND;
use crate::hub::Hub;

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
}

#[derive(Debug)]
struct Sql {
    push: String,
    claim: String,
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
            push: db.sql(&format!(
                "WITH ins AS (INSERT INTO {{s}}.queue AS q (job_id, available_at, leased) \
                   SELECT DISTINCT id, now() + make_interval(secs => $2), false \
                   FROM unnest($1::uuid[]) AS id \
                   ON CONFLICT (job_id) DO UPDATE \
                     SET available_at = excluded.available_at, leased = false \
                   RETURNING 1) \
                 SELECT count(*){notify} FROM ins"
            )),
            claim: db.sql(
                "WITH picked AS (SELECT job_id, available_at FROM {s}.queue \
                   WHERE available_at <= now() ORDER BY available_at, job_id \
                   LIMIT $1 FOR UPDATE SKIP LOCKED), \
                 leased AS (UPDATE {s}.queue q SET leased = true, \
                   token = nextval('{s}.lease_tokens'), \
                   available_at = now() + make_interval(secs => $2) \
                   FROM picked WHERE q.job_id = picked.job_id \
                   RETURNING q.job_id, q.token, picked.available_at AS due) \
                 SELECT job_id, token FROM leased ORDER BY due, job_id",
            ),
            next_due: db
                .sql("SELECT extract(epoch FROM min(available_at) - now())::float8 FROM {s}.queue"),
            extend: db.sql(
                "UPDATE {s}.queue q SET available_at = now() + make_interval(secs => $3) \
                 FROM unnest($1::uuid[], $2::int8[]) AS l(job_id, token) \
                 WHERE q.job_id = l.job_id AND q.token = l.token AND q.leased \
                   AND q.available_at > now() \
                 RETURNING q.job_id, q.token",
            ),
            ack: db.sql(
                "DELETE FROM {s}.queue WHERE job_id = $1 AND token = $2 AND leased \
                 AND available_at > now()",
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

fn token_of(lease: &Lease) -> BackendResult<i64> {
    i64::try_from(lease.token)
        .map_err(|_| BackendError::InvalidArgument(format!("lease token {}", lease.token)))
}

impl PgQueue {
    pub(crate) fn new(db: Arc<Db>, hub: Option<Arc<Hub>>) -> Self {
        let sql = Arc::new(Sql::new(&db));
        Self {
            db,
            hub,
            local: Arc::new(Notify::new()),
            sql,
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
        let ids: Vec<Uuid> = jobs.iter().map(|j| *j.as_uuid()).collect();
        let mut conn = self.db.run(conn.acquire()).await?;
        self.db
            .run(
                sqlx::query(&self.sql.push)
                    .bind(ids)
                    .bind(secs(delay))
                    .execute(&mut *conn),
            )
            .await?;
        self.local.notify_waiters();
        Ok(())
    }

    async fn claim_once(&self, max: i64, ttl: Duration) -> BackendResult<Vec<Lease>> {
        let rows: Vec<(Uuid, i64)> = self
            .db
            .run(
                sqlx::query_as(&self.sql.claim)
                    .bind(max)
                    .bind(secs(ttl))
                    .fetch_all(&self.db.pool),
            )
            .await?;
        rows.into_iter()
            .map(|(id, token)| {
                Ok(Lease {
                    job_id: JobId::from_uuid(id),
                    token: u64::try_from(token)
                        .map_err(|_| BackendError::corrupt(BACKEND, "negative lease token"))?,
                })
            })
            .collect()
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
        self.push_with(&self.db.pool, &[job], delay).await
    }

    async fn push_many(&self, jobs: &[JobId], delay: Duration) -> BackendResult<()> {
        self.push_with(&self.db.pool, jobs, delay).await
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
        let done = self
            .db
            .run(
                sqlx::query(&self.sql.ack)
                    .bind(lease.job_id.as_uuid())
                    .bind(token_of(lease)?)
                    .execute(&self.db.pool),
            )
            .await?;
        Ok(done.rows_affected() == 1)
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
