//! # longjob-postgres
//!
//! [`JobStore`](longjob_core::JobStore), [`Queue`](longjob_core::Queue) and
//! [`ProgressBus`](longjob_core::ProgressBus) on PostgreSQL, with sqlx.
//!
//! - [`PgJobStore`]: jobs in `download_jobs`, items in `file_records`; compare-and-set and
//!   fencing in one `UPDATE`.
//! - [`PgQueue`]: one row per job; a batch claimed in one statement with
//!   `FOR UPDATE SKIP LOCKED`, fencing tokens from a sequence; `LISTEN/NOTIFY` as a wake-up
//!   hint, polling as the fallback.
//! - [`PgProgressBus`]: events in `job_events` for replay, delivered live by `NOTIFY` through one
//!   listening connection per [`PgBackend`] shared by every subscriber.
//!
//! Tables live in one schema (default `longjob`), created by embedded migrations, on connect
//! or by [`PgBackend::migrate`]. Queries are plain `sqlx::query`: building needs no database.
//! A host application can submit a job inside its own transaction with
//! [`PgBackend::enqueue_with`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), longjob_core::BackendError> {
//! use std::sync::Arc;
//! use longjob_postgres::{PgBackend, PgConfig};
//!
//! let pg = PgBackend::connect(PgConfig::from_env()).await?;
//! let store: Arc<dyn longjob_core::JobStore> = Arc::new(pg.store());
//! let queue: Arc<dyn longjob_core::Queue> = Arc::new(pg.queue());
//! let bus: Arc<dyn longjob_core::ProgressBus> = Arc::new(pg.bus());
//! # let _ = (store, queue, bus);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod bus;
mod config;
mod db;
mod error;
mod hub;
mod queue;
mod store;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use longjob_core::store::Inserted;
use longjob_core::{BackendError, BackendResult, Job};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Acquire, Connection, PgConnection, PgPool, Postgres};

pub use bus::PgProgressBus;
pub use config::{DEFAULT_DATABASE_URL, DEFAULT_SCHEMA, PgConfig};
pub use queue::PgQueue;
pub use store::PgJobStore;

use crate::db::Db;
use crate::error::{BACKEND, Timeouts};
use crate::hub::{Channels, Hub};

/// The Rust examples of `docs/postgres.md`, compiled by `cargo test --doc` so they keep up with
/// the API (the file's only code blocks are Rust; any other must be marked with its language).
#[cfg(doctest)]
#[doc = include_str!("../../../docs/postgres.md")]
pub struct PostgresMdDoctests;

/// The embedded migrations (`migrations/` of this crate). [`PgBackend::migrate`] runs them in
/// the configured schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// One PostgreSQL database as longjob's store, queue and bus: a pool, a schema, and (with
/// notifications on) one listening connection shared by the three.
///
/// Cheap to clone. Build it once per process.
#[derive(Debug, Clone)]
pub struct PgBackend {
    db: Arc<Db>,
    store: PgJobStore,
    queue: PgQueue,
    bus: PgProgressBus,
}

impl PgBackend {
    /// Connects a pool to `config.url`, runs the migrations when
    /// [`migrate_on_connect`](PgConfig::migrate_on_connect), and starts the listener when
    /// [`notifications`](PgConfig::notifications) are on.
    ///
    /// A database that cannot be reached is [`BackendError::Unavailable`].
    pub async fn connect(config: PgConfig) -> BackendResult<Self> {
        config.validate()?;
        let mut options: PgConnectOptions = config
            .url
            .parse()
            .map_err(|e| BackendError::InvalidArgument(format!("database URL: {e}")))?;
        if let Some(timeout) = config.statement_timeout {
            options = options.options([("statement_timeout", timeout.as_millis().to_string())]);
        }
        let timeouts = Timeouts {
            acquire: config.acquire_timeout,
            statement: config.statement_timeout,
        };
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|e| error::map_err(e, &timeouts))?;
        Self::with_pool(pool, config).await
    }

    /// Uses the host application's pool (its `url`, `max_connections` and `statement_timeout`
    /// settings are then the pool's own; `config` gives the schema and the behaviour).
    pub async fn with_pool(pool: PgPool, config: PgConfig) -> BackendResult<Self> {
        config.validate()?;
        let timeouts = Timeouts {
            acquire: config.acquire_timeout,
            statement: config.statement_timeout,
        };
        let relaxed = if config.relaxed_commit {
            let options = pool
                .connect_options()
                .as_ref()
                .clone()
                .options([("synchronous_commit", "off")]);
            PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(config.acquire_timeout)
                .connect_lazy_with(options)
        } else {
            pool.clone()
        };
        let db = Arc::new(Db {
            pool,
            relaxed,
            schema: config.schema.clone(),
            timeouts,
            op_deadline: config.acquire_timeout
                + config.statement_timeout.unwrap_or(Duration::from_secs(30))
                + Duration::from_secs(1),
            notifications: config.notifications,
            poll_interval: config.poll_interval,
            batch_in_flight: config.batch_in_flight,
            relaxed_worker_writes: config.relaxed_worker_writes,
        });
        if config.migrate_on_connect {
            migrate(&db).await?;
        }
        let hub = if config.notifications {
            let options = db.pool.connect_options().as_ref().clone();
            let channels = Channels {
                queue: db.queue_channel(),
                events: db.events_channel(),
                cancel: db.cancel_channel(),
            };
            Some(Hub::start(options, channels).await.map_err(|e| db.err(e))?)
        } else {
            None
        };
        Ok(Self {
            store: PgJobStore::new(Arc::clone(&db)),
            queue: PgQueue::new(Arc::clone(&db), hub.clone()),
            bus: PgProgressBus::new(Arc::clone(&db), hub),
            db,
        })
    }

    /// Runs the embedded migrations in the configured schema (creating it if missing), with
    /// sqlx's `_sqlx_migrations` table in that schema too. Safe to call from several processes
    /// at once, and again when up to date.
    pub async fn migrate(&self) -> BackendResult<()> {
        migrate(&self.db).await
    }

    /// The job store.
    pub fn store(&self) -> PgJobStore {
        self.store.clone()
    }

    /// The queue.
    pub fn queue(&self) -> PgQueue {
        self.queue.clone()
    }

    /// The progress bus.
    pub fn bus(&self) -> PgProgressBus {
        self.bus.clone()
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.db.schema
    }

    /// Submits `job` (its store row and, when new, its queue row, due at its `run_at` or now)
    /// through `conn`, typically the host application's own transaction: the job then exists
    /// if and only if that transaction commits, and waiting workers are woken at commit.
    ///
    /// With an idempotency key still live, nothing is written and the existing job comes back
    /// as [`Inserted::Existing`]. Inside a transaction, a refused insert (the id exists already)
    /// aborts that transaction, as any failed statement does in PostgreSQL.
    ///
    /// ```no_run
    /// # async fn demo(pg: longjob_postgres::PgBackend) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use longjob_core::Job;
    ///
    /// let mut tx = pg.pool().begin().await?;
    /// sqlx::query("INSERT INTO orders (id, status) VALUES ($1, 'exporting')")
    ///     .bind(42_i64)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// let job = Job::new("export", "alice", serde_json::json!({"order": 42}));
    /// pg.enqueue_with(&mut *tx, &job, Duration::from_secs(24 * 3600)).await?;
    /// tx.commit().await?; // the order and its job, or neither
    /// # Ok(())
    /// # }
    /// ```
    pub async fn enqueue_with<'c, A>(
        &self,
        conn: A,
        job: &Job,
        idempotency_ttl: Duration,
    ) -> BackendResult<Inserted>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        let mut conn = self.db.run(conn.acquire()).await?;
        let inserted = self
            .store
            .insert_with(&mut *conn, job, idempotency_ttl)
            .await?;
        if inserted.is_new() {
            let delay = job
                .run_at
                .and_then(|at| (at - Utc::now()).to_std().ok())
                .unwrap_or(Duration::ZERO);
            self.queue.push_with(&mut *conn, &[job.id], delay).await?;
        }
        Ok(inserted)
    }
}

async fn migrate(db: &Db) -> BackendResult<()> {
    let options = db.pool.connect_options();
    let mut conn = db.run(PgConnection::connect_with(options.as_ref())).await?;
    let result = migrate_on(db, &mut conn).await;
    // The connection's search_path was changed: never hand it to anyone else.
    let _ = conn.close().await;
    result
}

async fn migrate_on(db: &Db, conn: &mut PgConnection) -> BackendResult<()> {
    // Serializes the schema's creation between processes (sqlx's own lock comes later).
    db.run(
        sqlx::query("SELECT pg_advisory_lock(hashtext('longjob-migrate:' || $1))")
            .bind(&db.schema)
            .execute(&mut *conn),
    )
    .await?;
    for statement in [
        format!("CREATE SCHEMA IF NOT EXISTS {}", db.schema),
        format!("SET search_path TO {}", db.schema),
    ] {
        db.run(sqlx::query(&statement).execute(&mut *conn)).await?;
    }
    MIGRATOR.run(&mut *conn).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => db.err(e),
        other => BackendError::corrupt(BACKEND, format_args!("migration failed: {other}")),
    })?;
    tracing::debug!(schema = %db.schema, "postgres migrations applied");
    Ok(())
}
