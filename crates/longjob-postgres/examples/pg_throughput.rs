//! Throughput of longjob on PostgreSQL, measured as `longjob-bench throughput` measures the
//! in-memory backends (same submit batches, worker settings and completion check), as one JSON
//! line. Until the harness takes `--backend postgres`, this is how the figures are made:
//!
//! ```text
//! cargo run --release -p longjob-postgres --example pg_throughput -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/test --jobs 20000 --concurrency 50
//! ```
//! Flags: `--jobs N`, `--concurrency C`, `--progress P` (progress events per job),
//! `--notify on|off`, `--relaxed-commit on|off`, `--in-flight K`, `--count-since epoch|now`,
//! `--database-url URL`.
//! Each run uses a fresh schema, dropped at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use longjob_core::memory::MemoryBlobStore;
use longjob_core::signing::UrlSigner;
use longjob_core::{JobResult, LongJob, LongJobConfig, SubmitRequest, WorkerConfig};
use longjob_postgres::{PgBackend, PgConfig};

const OWNER: &str = "bench";

#[tokio::main]
async fn main() {
    let mut jobs = 20_000usize;
    let mut concurrency = 50usize;
    let mut progress = 0u64;
    let mut notify = true;
    let mut in_flight = 1usize;
    let mut relaxed = true;
    // The harness counts from the epoch (so every job of the run is counted at every poll);
    // `--count-since now` counts only the unfinished ones, to tell the poll's cost apart.
    let mut count_since_now = false;
    let mut url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| longjob_postgres::DEFAULT_DATABASE_URL.to_owned());
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().expect("every flag takes a value");
        match flag.as_str() {
            "--jobs" => jobs = value.parse().unwrap(),
            "--concurrency" => concurrency = value.parse().unwrap(),
            "--progress" => progress = value.parse().unwrap(),
            "--notify" => notify = value == "on",
            "--in-flight" => in_flight = value.parse().unwrap(),
            "--relaxed-commit" => relaxed = value == "on",
            "--count-since" => count_since_now = value == "now",
            "--database-url" => url = value,
            other => panic!("unknown flag {other}"),
        }
    }
    let schema = format!("lj_bench_{:08x}", rand::random::<u32>());
    let pg = PgBackend::connect(
        PgConfig::new(&url)
            .schema(&schema)
            .notifications(notify)
            .batch_in_flight(in_flight)
            .relaxed_commit(relaxed)
            .max_connections(u32::try_from(concurrency).unwrap().clamp(4, 20))
            .poll_interval(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let mut config = LongJobConfig::default();
    config.jobs_per_hour = None;
    let lj = LongJob::builder()
        .store(Arc::new(pg.store()))
        .queue(Arc::new(pg.queue()))
        .bus(Arc::new(pg.bus()))
        .blobs(Arc::new(MemoryBlobStore::new(UrlSigner::random(
            "http://127.0.0.1/files",
        ))))
        .config(config)
        .build();

    let requests: Vec<SubmitRequest> = (0..jobs)
        .map(|i| SubmitRequest::new("noop", OWNER, serde_json::json!(i)).max_attempts(1))
        .collect();
    let enqueue_started = Instant::now();
    for chunk in requests.chunks(1000) {
        lj.submit_batch(chunk.to_vec()).await.unwrap();
    }
    let enqueue_s = enqueue_started.elapsed().as_secs_f64();

    let mut worker_config = WorkerConfig::default();
    worker_config.concurrency = concurrency;
    worker_config.progress_interval = Duration::ZERO;
    worker_config.claim_wait = Duration::from_millis(200);
    worker_config.purge_interval = None;
    let commits_before = commits(&pg).await;
    let started = Instant::now();
    let worker = lj
        .worker()
        .config(worker_config)
        .handle("noop", move |ctx, _: serde_json::Value| async move {
            for i in 1..=progress {
                ctx.progress(i, progress).await;
            }
            Ok(None::<JobResult>)
        })
        .start();
    let mut polls = 0u64;
    let since = if count_since_now {
        chrono::Utc::now()
    } else {
        chrono::DateTime::<chrono::Utc>::UNIX_EPOCH
    };
    loop {
        polls += 1;
        let counts = lj.store().count_by_owner(OWNER, since).await.unwrap();
        if counts.active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let process_s = started.elapsed().as_secs_f64();
    worker.shutdown(Duration::from_secs(5)).await;
    // Transactions (single statements, here) committed while processing, less the completion
    // polls; pg_stat_database is flushed about once a second.
    let statements = (commits(&pg).await - commits_before - polls as i64 - 1) as f64 / jobs as f64;
    println!(
        "{}",
        serde_json::json!({
            "system": "longjob",
            "backend": "postgres",
            "notify": notify,
            "batch_in_flight": in_flight,
            "relaxed_commit": relaxed,
            "count_since": if count_since_now { "now" } else { "epoch" },
            "jobs": jobs,
            "concurrency": concurrency,
            "progress": progress,
            "enqueue_per_s": (jobs as f64 / enqueue_s).round(),
            "process_per_s": (jobs as f64 / process_s).round(),
            "statements_per_job": (statements * 10.0).round() / 10.0,
        })
    );
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pg.pool())
        .await
        .unwrap();
}

/// Transactions committed in this database so far, once the statistics have been flushed.
async fn commits(pg: &PgBackend) -> i64 {
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pg.pool())
    .await
    .unwrap()
}
