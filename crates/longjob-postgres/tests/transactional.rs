//! Transactional enqueue: a job submitted inside the host's transaction exists if and only if
//! that transaction commits. Also: how unreachable databases are reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use longjob_core::store::Inserted;
use longjob_core::{BackendError, Job, JobId, JobStore, Queue};
use longjob_postgres::{PgBackend, PgConfig};

const LEASE: Duration = Duration::from_secs(30);

async fn host_table(pg: &PgBackend) -> String {
    let table = format!("{}.orders", pg.schema());
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY)"
    ))
    .execute(pg.pool())
    .await
    .unwrap();
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transaction_keeps_the_job_and_wakes_a_waiting_worker() {
    let pg = common::backend().await;
    let table = host_table(&pg).await;
    let queue = pg.queue();
    // A worker waits for work while the host's transaction runs.
    let waiter = tokio::spawn({
        let queue = queue.clone();
        async move {
            let started = Instant::now();
            let leases = queue
                .claim(1, LEASE, Duration::from_secs(20))
                .await
                .unwrap();
            (leases, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let job = Job::new("export", "alice", serde_json::json!({"order": 1}));
    let mut tx = pg.pool().begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {table} (id) VALUES (1)"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let inserted = pg
        .enqueue_with(&mut *tx, &job, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(inserted.is_new());
    // Not visible outside the transaction before the commit.
    assert!(pg.store().get(job.id).await.unwrap().is_none());
    assert_eq!(queue.stats().await.unwrap().ready, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.commit().await.unwrap();

    let stored = pg
        .store()
        .get(job.id)
        .await
        .unwrap()
        .expect("committed job");
    assert_eq!(stored.version, 1);
    let (leases, waited) = waiter.await.unwrap();
    assert_eq!(leases.len(), 1, "the committed job must be delivered");
    assert_eq!(leases[0].job_id, job.id);
    assert!(waited < Duration::from_secs(5), "woken late: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transaction_leaves_no_job() {
    let pg = common::backend().await;
    let table = host_table(&pg).await;
    let job = Job::new("export", "alice", serde_json::json!({"order": 2}))
        .with_items(["a", "b"])
        .with_idempotency_key("order-2");
    let mut tx = pg.pool().begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {table} (id) VALUES (2)"))
        .execute(&mut *tx)
        .await
        .unwrap();
    pg.enqueue_with(&mut *tx, &job, Duration::from_secs(3600))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    assert!(pg.store().get(job.id).await.unwrap().is_none());
    assert!(
        pg.store()
            .find_by_idempotency_key("alice", "order-2")
            .await
            .unwrap()
            .is_none(),
        "the key must not outlive the rolled-back job"
    );
    let queue = pg.queue();
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.ready, stats.delayed, stats.leased), (0, 0, 0));
    assert!(
        queue
            .claim(10, LEASE, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );

    // A transaction dropped without commit (the handler errored out) rolls back the same way.
    {
        let mut tx = pg.pool().begin().await.unwrap();
        pg.enqueue_with(&mut *tx, &job, Duration::from_secs(3600))
            .await
            .unwrap();
    }
    assert!(pg.store().get(job.id).await.unwrap().is_none());

    // And the same job submitted afterwards, committed, exists once.
    let mut tx = pg.pool().begin().await.unwrap();
    assert!(
        pg.enqueue_with(&mut *tx, &job, Duration::from_secs(3600))
            .await
            .unwrap()
            .is_new()
    );
    tx.commit().await.unwrap();
    let again = Job::new("export", "alice", serde_json::json!({"order": 2}))
        .with_idempotency_key("order-2");
    let mut tx = pg.pool().begin().await.unwrap();
    match pg
        .enqueue_with(&mut *tx, &again, Duration::from_secs(3600))
        .await
        .unwrap()
    {
        Inserted::Existing(existing) => {
            assert_eq!(existing.id, job.id);
            assert_eq!(existing.items.len(), 2);
        }
        Inserted::New(_) => panic!("the live key must return the committed job"),
    }
    tx.commit().await.unwrap();
    assert_eq!(queue.stats().await.unwrap().ready, 1, "queued once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_job_enqueued_in_a_transaction_waits_for_its_run_at() {
    let pg = common::backend().await;
    let job = Job::new("export", "alice", serde_json::json!({}))
        .with_run_at(chrono::Utc::now() + chrono::Duration::seconds(600));
    let mut conn = pg.pool().acquire().await.unwrap();
    pg.enqueue_with(&mut *conn, &job, Duration::ZERO)
        .await
        .unwrap();
    let stats = pg.queue().stats().await.unwrap();
    assert_eq!((stats.ready, stats.delayed), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_is_unavailable_not_a_panic() {
    // Nothing listens on port 1.
    let config = PgConfig::new("postgres://postgres@127.0.0.1:1/test")
        .acquire_timeout(Duration::from_secs(2));
    let err = PgBackend::connect(config).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        matches!(
            err,
            BackendError::Unavailable { .. } | BackendError::Timeout { .. }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_can_run_apart_from_connect_and_twice() {
    let config = common::config()
        .migrate_on_connect(false)
        .notifications(false);
    let pg = common::connect_with(config.clone()).await;
    let err = pg
        .store()
        .get(longjob_core::JobId::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::Corrupt { .. }),
        "tables are missing before migrating: {err:?}"
    );
    pg.migrate().await.unwrap();
    pg.migrate().await.unwrap();
    assert!(
        pg.store()
            .get(longjob_core::JobId::new())
            .await
            .unwrap()
            .is_none()
    );
    let in_schema: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = '_sqlx_migrations'",
    )
    .bind(pg.schema())
    .fetch_one(pg.pool())
    .await
    .unwrap();
    assert_eq!(
        in_schema, 1,
        "_sqlx_migrations must be in the chosen schema"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_schema_name_is_refused() {
    let err = PgBackend::connect(PgConfig::from_env().schema("Robert'); DROP TABLE x;--"))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::InvalidArgument(_)), "{err:?}");
}

/// While a backlog drains, a claim starts where the last full one did (past the dead index
/// entries of the jobs claimed before). A job pushed in a transaction that began earlier sorts
/// before that point (its `now()` is in the past): it is still claimed within about a second,
/// not after the whole backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_enqueued_in_an_older_transaction_is_claimed_while_a_backlog_drains() {
    let pg = common::backend().await;
    let queue = pg.queue();
    let mut tx = pg.pool().begin().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let backlog: Vec<JobId> = (0..5000).map(|_| JobId::new()).collect();
    queue.push_many(&backlog, Duration::ZERO).await.unwrap();
    let first = queue.claim(50, LEASE, Duration::ZERO).await.unwrap();
    assert_eq!(first.len(), 50);
    let late = Job::new("export", "alice", serde_json::json!({"order": 2}));
    pg.enqueue_with(&mut *tx, &late, Duration::from_secs(3600))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let started = Instant::now();
    let mut claimed = first.len();
    loop {
        let leases = queue.claim(50, LEASE, Duration::ZERO).await.unwrap();
        claimed += leases.len();
        if leases.iter().any(|l| l.job_id == late.id) {
            break;
        }
        assert!(
            claimed < 4000,
            "the late job waited behind the backlog: {claimed} jobs claimed over {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "claimed after {:?}",
        started.elapsed()
    );
}
