//! What the schema is for: job updates that finish no job are HOT updates (no index entries),
//! the owner's unfinished jobs are counted by `finished_at`, through every transition, and an
//! event writes one B-tree entry (its key) while old events can still be purged by time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use longjob_core::{Job, JobError, JobStore};
use longjob_postgres::PgBackend;

/// `(n_tup_upd, n_tup_hot_upd)` of the schema's `download_jobs`, once at least `updates` are
/// counted (statistics reach the view up to a few seconds after the writer goes idle).
async fn update_stats(pg: &PgBackend, updates: i64) -> (i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row: (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname = 'download_jobs'",
        )
        .bind(pg.schema())
        .fetch_one(pg.pool())
        .await
        .unwrap();
        if row.0 >= updates || Instant::now() > deadline {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_a_job_is_a_hot_update() {
    let pg = common::backend().await;
    let store = pg.store();
    let owner = format!("hot-{}", rand::random::<u32>());
    let jobs: Vec<Job> = (0..40)
        .map(|i| Job::new("k", &owner, serde_json::json!(i)))
        .collect();
    store.insert_many(&jobs).await.unwrap();
    // Concurrent, so they are written in batches as a worker's are.
    futures::future::join_all(jobs.into_iter().enumerate().map(|(i, mut job)| {
        let store = store.clone();
        async move {
            job.version = 1;
            job.start(i as u64 + 1, Utc::now()).unwrap();
            store.update(&job).await.unwrap()
        }
    }))
    .await;
    let (updates, hot) = update_stats(&pg, 40).await;
    assert_eq!(updates, 40);
    // Every one could be HOT as far as the indexes go; a page's last row may find no room
    // left for its new version (version 1's schema: none was HOT).
    assert!(
        hot * 4 >= updates * 3,
        "{hot} of {updates} updates were HOT"
    );
    assert_eq!(
        store
            .count_by_owner(&owner, Utc::now())
            .await
            .unwrap()
            .active,
        40
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_index_covers_a_column_that_changes_before_a_job_finishes() {
    let pg = common::backend().await;
    let defs: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = 'download_jobs'",
    )
    .bind(pg.schema())
    .fetch_all(pg.pool())
    .await
    .unwrap();
    assert!(!defs.is_empty());
    for def in defs {
        let columns = def.split_once(" USING ").map_or("", |(_, rest)| rest);
        for changing in [
            "state",
            "version",
            "lease_token",
            "attempt",
            "progress",
            "updated_at",
            "started_at",
            "run_at",
            "error",
        ] {
            let named = columns
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|word| word == changing);
            assert!(!named, "{def} names {changing}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_jobs_are_counted_through_fail_cancel_and_requeue() {
    let pg = common::backend().await;
    let store = pg.store();
    let owner = format!("count-{}", rand::random::<u32>());
    let active = || async {
        store
            .count_by_owner(&owner, Utc::now())
            .await
            .unwrap()
            .active
    };
    let job = Job::new("k", &owner, serde_json::json!(1));
    let mut job = match store.insert(&job, Duration::ZERO).await.unwrap() {
        longjob_core::store::Inserted::New(job) => job,
        other => panic!("{other:?}"),
    };
    assert_eq!(active().await, 1);
    job.start(1, Utc::now()).unwrap();
    job = store.update(&job).await.unwrap();
    assert_eq!(active().await, 1);
    job.fail(JobError::internal("x"), Utc::now()).unwrap();
    job = store.update(&job).await.unwrap();
    assert_eq!(active().await, 0);
    // A manual retry of a failed job makes it unfinished again.
    job.requeue(1, Utc::now()).unwrap();
    job = store.update(&job).await.unwrap();
    assert_eq!(active().await, 1);
    job.cancel(Utc::now()).unwrap();
    job = store.update(&job).await.unwrap();
    assert_eq!(active().await, 0);
    job.requeue(1, Utc::now()).unwrap();
    store.update(&job).await.unwrap();
    assert_eq!(active().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unfinished_count_reads_the_partial_index() {
    let pg = common::backend().await;
    // A table big enough that the planner would never choose the index by accident.
    sqlx::query(&format!(
        "INSERT INTO {}.download_jobs (id, kind, owner, state, version, payload, progress, \
           created_at, updated_at, finished_at) \
         SELECT gen_random_uuid(), 'k', 'o' || (g % 50), 'completed', 1, '{{}}', '{{}}', now(), \
           now(), now() FROM generate_series(1, 5000) g",
        pg.schema()
    ))
    .execute(pg.pool())
    .await
    .unwrap();
    sqlx::query(&format!("ANALYZE {}.download_jobs", pg.schema()))
        .execute(pg.pool())
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN SELECT count(*) FROM {}.download_jobs WHERE owner = 'o1' \
           AND finished_at IS NULL",
        pg.schema()
    ))
    .fetch_all(pg.pool())
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("download_jobs_unfinished"), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_at_schema_version_1_is_migrated_with_its_jobs() {
    use sqlx::Connection;
    let config = common::config();
    // Version 1 alone, as deployed databases have it: a directory holding only its file.
    let dir = std::env::temp_dir().join(format!("lj-migrations-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/0001_longjob.sql"),
        dir.join("0001_longjob.sql"),
    )
    .unwrap();
    let v1 = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&config.url).await.unwrap();
    for statement in [
        format!("CREATE SCHEMA {}", config.schema),
        format!("SET search_path TO {}", config.schema),
    ] {
        sqlx::query(&statement).execute(&mut conn).await.unwrap();
    }
    v1.run(&mut conn).await.unwrap();
    sqlx::query(
        "INSERT INTO download_jobs (id, kind, owner, state, version, payload, progress, \
           created_at, updated_at, finished_at) VALUES \
         (gen_random_uuid(), 'k', 'v1', 'queued', 1, '{}', '{}', now(), now(), NULL), \
         (gen_random_uuid(), 'k', 'v1', 'completed', 1, '{}', '{}', now(), now(), now())",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let pg = common::connect_with(config).await;
    let counts = pg
        .store()
        .count_by_owner("v1", Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!((counts.created_since, counts.active), (2, 1));
    let versions: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT version FROM {}._sqlx_migrations ORDER BY version",
        pg.schema()
    ))
    .fetch_all(pg.pool())
    .await
    .unwrap();
    assert_eq!(versions, [1, 2, 3]);
}

/// The B-tree indexes of a table of the test's schema, as `pg_get_indexdef` prints them.
async fn b_tree_indexes(pg: &PgBackend, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam \
         WHERE n.nspname = $1 AND c.relname = $2 AND am.amname = 'btree' ORDER BY 1",
    )
    .bind(pg.schema())
    .bind(table)
    .fetch_all(pg.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_writes_one_b_tree_entry_and_a_job_three() {
    let pg = common::backend().await;
    let events = b_tree_indexes(&pg, "job_events").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].contains("(job_id, seq)"), "{events:?}");
    // The primary key, (owner, created_at) and the partial index of unfinished jobs; the
    // finished-at index is partial on the other side, so a job is in three at any time.
    let jobs = b_tree_indexes(&pg, "download_jobs").await;
    assert_eq!(jobs.len(), 4, "{jobs:?}");
    assert!(!jobs.iter().any(|d| d.contains("(owner, id")), "{jobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_older_than_a_cutoff_are_purged_and_newer_ones_kept() {
    use futures::StreamExt;
    use longjob_core::{EventPayload, JobId, ProgressBus};

    let pg = common::backend().await;
    let bus = pg.bus();
    let (old, new) = (JobId::new(), JobId::new());
    let filler = || EventPayload::Progress {
        progress: Default::default(),
    };
    for _ in 0..3 {
        bus.publish(old, filler()).await.unwrap();
    }
    // `at` is the statement's time: leave a clear gap around the cutoff.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cutoff = Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    bus.publish(new, filler()).await.unwrap();
    bus.publish(old, filler()).await.unwrap();

    // One at a time: the limit holds.
    assert_eq!(bus.purge_events_before(cutoff, 1).await.unwrap(), 1);
    assert_eq!(bus.purge_events_before(cutoff, 100).await.unwrap(), 2);
    assert_eq!(bus.purge_events_before(cutoff, 100).await.unwrap(), 0);

    let seqs = |job| {
        let bus = bus.clone();
        async move {
            let mut stream = bus.subscribe(job, 0).await.unwrap();
            let mut seqs = Vec::new();
            while let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(300), stream.next()).await
            {
                seqs.push(event.unwrap().seq);
            }
            seqs
        }
    };
    // The old job's fourth event, published after the cutoff, is kept; so is the new job's.
    assert_eq!(seqs(old).await, [4]);
    assert_eq!(seqs(new).await, [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_expired_sweeps_old_events_of_unfinished_jobs_and_old_cancel_requests() {
    use std::sync::Arc;

    use longjob_core::{EventPayload, LongJob, LongJobConfig, ProgressBus, SubmitRequest};

    let pg = common::backend().await;
    let mut config = LongJobConfig::default();
    config.jobs_per_hour = None;
    config.retention = Duration::from_secs(3600);
    let lj = LongJob::builder()
        .store(Arc::new(pg.store()))
        .queue(Arc::new(pg.queue()))
        .bus(Arc::new(pg.bus()))
        .config(config)
        .build();
    let schema = pg.schema().to_owned();

    // An unfinished job (no worker: it stays queued) with its `queued` event and 600 more, so
    // the sweep takes more than one batch.
    let job = lj
        .submit(SubmitRequest::new("k", "alice", serde_json::json!({})))
        .await
        .unwrap()
        .job;
    let filler = || EventPayload::Progress {
        progress: Default::default(),
    };
    pg.bus()
        .publish_many(job.id, (0..600).map(|_| filler()).collect())
        .await
        .unwrap();
    pg.bus().signal_cancel(job.id).await.unwrap();
    pg.bus().signal_cancel(job.id).await.unwrap();

    // Everything but the last two events, and the first cancel request, is past the retention.
    sqlx::query(&format!(
        "UPDATE {schema}.job_events SET at = now() - interval '2 hours' \
         WHERE job_id = $1 AND seq <= 599"
    ))
    .bind(job.id.as_uuid())
    .execute(pg.pool())
    .await
    .unwrap();
    let cancels = format!("SELECT id FROM {schema}.cancel_requests ORDER BY id");
    let cancel_ids: Vec<i64> = sqlx::query_scalar(&cancels)
        .fetch_all(pg.pool())
        .await
        .unwrap();
    assert_eq!(cancel_ids.len(), 2);
    sqlx::query(&format!(
        "UPDATE {schema}.cancel_requests SET at = now() - interval '2 hours' WHERE id = $1"
    ))
    .bind(cancel_ids[0])
    .execute(pg.pool())
    .await
    .unwrap();

    // No finished job to purge; the bus is swept all the same.
    assert_eq!(lj.purge_expired().await.unwrap(), 0);

    let seqs: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT seq FROM {schema}.job_events WHERE job_id = $1 ORDER BY seq"
    ))
    .bind(job.id.as_uuid())
    .fetch_all(pg.pool())
    .await
    .unwrap();
    assert_eq!(seqs, [600, 601]);
    let left: Vec<i64> = sqlx::query_scalar(&cancels)
        .fetch_all(pg.pool())
        .await
        .unwrap();
    assert_eq!(left, cancel_ids[1..]);
    // The job itself is untouched, and the next seq follows on.
    assert_eq!(lj.status(job.id, "alice").await.unwrap().id, job.id);
    assert_eq!(pg.bus().publish(job.id, filler()).await.unwrap().seq, 602);
}
