//! The shared context of the three backends: the pool, the schema and error mapping.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use longjob_core::{BackendError, BackendResult};
use sqlx::PgPool;

use crate::error::{BACKEND, Timeouts, map_err};

/// What every backend of one [`PgBackend`](crate::PgBackend) shares.
#[derive(Debug)]
pub(crate) struct Db {
    pub(crate) pool: PgPool,
    /// For event publishes and queue acks: the same database with `synchronous_commit = off`
    /// when [`PgConfig::relaxed_commit`](crate::PgConfig::relaxed_commit), else `pool`.
    pub(crate) relaxed: PgPool,
    pub(crate) schema: String,
    pub(crate) timeouts: Timeouts,
    /// A client-side deadline for one operation, so a dead connection never hangs a caller.
    pub(crate) op_deadline: Duration,
    pub(crate) notifications: bool,
    pub(crate) poll_interval: Duration,
    /// Worker transitions commit with `synchronous_commit = off`
    /// ([`PgConfig::relaxed_worker_writes`](crate::PgConfig::relaxed_worker_writes)).
    pub(crate) relaxed_worker_writes: bool,
    /// Statements of one kind (updates, publishes, acks, …) running at once.
    pub(crate) batch_in_flight: usize,
}

impl Db {
    /// Maps an sqlx error.
    pub(crate) fn err(&self, e: sqlx::Error) -> BackendError {
        map_err(e, &self.timeouts)
    }

    /// Runs an operation under the client-side deadline, mapping its error.
    pub(crate) async fn run<T>(
        &self,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> BackendResult<T> {
        self.run_raw(fut).await?.map_err(|e| self.err(e))
    }

    /// Runs an operation under the client-side deadline, leaving its error to the caller.
    pub(crate) async fn run_raw<T>(
        &self,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> BackendResult<Result<T, sqlx::Error>> {
        tokio::time::timeout(self.op_deadline, fut)
            .await
            .map_err(|_| BackendError::Timeout {
                backend: BACKEND,
                after: self.op_deadline,
            })
    }

    /// The notification channel for queue wake-ups.
    pub(crate) fn queue_channel(&self) -> String {
        format!("{}__queue", self.schema)
    }

    /// The notification channel for job events.
    pub(crate) fn events_channel(&self) -> String {
        format!("{}__events", self.schema)
    }

    /// The notification channel for cancel requests.
    pub(crate) fn cancel_channel(&self) -> String {
        format!("{}__cancel", self.schema)
    }

    /// `sql` with every `{s}` replaced by the schema.
    pub(crate) fn sql(&self, sql: &str) -> String {
        sql.replace("{s}", &self.schema)
    }
}

/// Seconds of a duration, for `make_interval(secs => ...)`.
pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Locks `m`, taking over a lock poisoned by a panicking holder: what these locks guard (hints
/// and subscriber lists) stays usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
