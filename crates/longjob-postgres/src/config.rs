//! [`PgConfig`]: how to reach PostgreSQL and how the backends behave.

use std::time::Duration;

use longjob_core::{BackendError, BackendResult};

/// The database URL used when none is given: a local PostgreSQL's `test` database.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The schema used when none is given.
pub const DEFAULT_SCHEMA: &str = "longjob";

/// How to reach PostgreSQL and how the backends behave.
///
/// ```
/// use std::time::Duration;
/// use longjob_postgres::PgConfig;
///
/// let config = PgConfig::new("postgres://app@db.internal/app")
///     .schema("jobs")
///     .notifications(false) // behind a transaction-mode pooler: polling only
///     .poll_interval(Duration::from_millis(250));
/// assert_eq!(config.schema, "jobs");
/// assert!(config.migrate_on_connect);
/// ```
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// The connection URL (`postgres://user:password@host:port/database?...`).
    pub url: String,
    /// The schema holding every table (created if missing). Lowercase letters, digits and `_`,
    /// starting with a letter or `_`, at most 48 characters. Default `longjob`.
    pub schema: String,
    /// Run the embedded migrations when connecting (default `true`). Hosts that manage their
    /// migrations themselves set `false` and call [`PgBackend::migrate`](crate::PgBackend::migrate)
    /// when they see fit.
    pub migrate_on_connect: bool,
    /// Use `LISTEN/NOTIFY` to wake waiting claimers, deliver live events and cancel signals
    /// (default `true`). With `false` (behind a transaction-mode pooler, where `LISTEN` does not
    /// work), everything keeps working by polling every [`poll_interval`](Self::poll_interval).
    pub notifications: bool,
    /// The pool's maximum number of connections (default 10).
    pub max_connections: u32,
    /// The server-side `statement_timeout` set on every connection (default 10 s); `None` leaves
    /// the server's setting (needed behind poolers that refuse startup parameters).
    pub statement_timeout: Option<Duration>,
    /// How long an operation waits for a pooled connection (default 5 s).
    pub acquire_timeout: Duration,
    /// How often a waiting claim, an event subscription and a cancel stream look at the tables
    /// when no notification woke them (default 1 s; also the latency without notifications).
    pub poll_interval: Duration,
    /// Concurrent calls of one kind (store updates and reads, event publishes, acks, pushes)
    /// are gathered into one statement; this many such statements of one kind run at once
    /// (default 1). Fewer gives bigger batches (less database work per job), more gives lower
    /// latency under light load.
    pub batch_in_flight: usize,
    /// Commit event publishes and queue acks without waiting for the WAL flush
    /// (`synchronous_commit = off`, on a second small pool), default `true`. Store writes — the
    /// source of truth — wait for it, unless
    /// [`relaxed_worker_writes`](Self::relaxed_worker_writes). A database *crash* (not a clean restart) may then
    /// lose the last fraction of a second of events and acks: an unacked job is delivered again
    /// and the worker, finding it finished in the store, acks it without running it; a lost
    /// event's seq is reused by the next one. Set `false` to make every commit durable.
    pub relaxed_commit: bool,
    /// Commit the store writes of workers — a job's start, its progress flushes, its outcome —
    /// without waiting for the WAL flush (`synchronous_commit = off` for those statements
    /// only), default `false`. Inserts, cancels, manual retries and claims stay durable (a
    /// claim's fencing token must never be handed out twice). A database *crash* (not a clean
    /// restart) may then lose the worker writes of its last fraction of a second: the job is
    /// back in its earlier state with its lease unacked, and runs again when the lease expires
    /// (at least once, as after a worker crash); see `docs/postgres.md` for what subscribers
    /// may see.
    pub relaxed_worker_writes: bool,
}

impl PgConfig {
    /// A configuration with the defaults for this URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: DEFAULT_SCHEMA.to_owned(),
            migrate_on_connect: true,
            notifications: true,
            max_connections: 10,
            statement_timeout: Some(Duration::from_secs(10)),
            acquire_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            batch_in_flight: 1,
            relaxed_commit: true,
            relaxed_worker_writes: false,
        }
    }

    /// The defaults, with the URL from `DATABASE_URL` (else [`DEFAULT_DATABASE_URL`]).
    pub fn from_env() -> Self {
        Self::new(std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into()))
    }

    /// Sets [`schema`](Self::schema).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets [`migrate_on_connect`](Self::migrate_on_connect).
    pub fn migrate_on_connect(mut self, yes: bool) -> Self {
        self.migrate_on_connect = yes;
        self
    }

    /// Sets [`notifications`](Self::notifications).
    pub fn notifications(mut self, yes: bool) -> Self {
        self.notifications = yes;
        self
    }

    /// Sets [`max_connections`](Self::max_connections).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Sets [`statement_timeout`](Self::statement_timeout).
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Sets [`acquire_timeout`](Self::acquire_timeout).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Sets [`poll_interval`](Self::poll_interval).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Sets [`batch_in_flight`](Self::batch_in_flight) (at least 1).
    pub fn batch_in_flight(mut self, n: usize) -> Self {
        self.batch_in_flight = n.max(1);
        self
    }

    /// Sets [`relaxed_commit`](Self::relaxed_commit).
    pub fn relaxed_commit(mut self, yes: bool) -> Self {
        self.relaxed_commit = yes;
        self
    }

    /// Sets [`relaxed_worker_writes`](Self::relaxed_worker_writes).
    pub fn relaxed_worker_writes(mut self, yes: bool) -> Self {
        self.relaxed_worker_writes = yes;
        self
    }

    /// Checks the schema name.
    pub(crate) fn validate(&self) -> BackendResult<()> {
        validate_schema(&self.schema)
    }
}

/// Schema names are restricted so that they never need quoting and the notification channels
/// derived from them stay under PostgreSQL's 63-byte identifier limit.
pub(crate) fn validate_schema(schema: &str) -> BackendResult<()> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && schema.len() <= 48 {
        Ok(())
    } else {
        Err(BackendError::InvalidArgument(format!(
            "schema name {schema:?}: use 1 to 48 lowercase letters, digits or '_', not starting with a digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        for ok in ["longjob", "lj_test_123", "_x"] {
            assert!(validate_schema(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1abc", "Jobs", "a-b", "a;drop", &"x".repeat(49)] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }
}
