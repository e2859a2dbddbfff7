//! The benchmark harness's throughput run, on Redis, with Redis commands per job.
//!
//! ```text
//! cargo run --release -p longjob-redis --example throughput -- [JOBS] [CONCURRENCY] [PROGRESS]
//! ```
//! Same shape as `longjob-bench throughput`: submit N no-op jobs in batches of 1 000, then one
//! worker of concurrency C, P progress events per job; `process_per_s` is N over the time from
//! the worker's start until the store shows all N jobs completed. Uses `REDIS_URL` (default
//! `redis://127.0.0.1:6379`) under a fresh prefix, deleted afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use longjob_core::{JobResult, LongJob, LongJobConfig, SubmitRequest, WorkerConfig};
use longjob_redis::{Redis, RedisConfig};

const OWNER: &str = "bench";

async fn command_calls(url: &str) -> HashMap<String, u64> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().unwrap());
    let jobs = args.next().unwrap_or(20_000) as usize;
    let concurrency = args.next().unwrap_or(50) as usize;
    let progress = args.next().unwrap_or(0);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("lj-bench-{}", uuid::Uuid::now_v7().simple());
    let redis = Redis::connect(RedisConfig::new(&url).prefix(&prefix))
        .await
        .unwrap();
    let mut config = LongJobConfig::default();
    config.jobs_per_hour = None;
    let lj = LongJob::builder()
        .store(Arc::new(redis.store()))
        .queue(Arc::new(redis.queue()))
        .bus(Arc::new(redis.bus()))
        .config(config)
        .build();

    let before = command_calls(&url).await;
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
    loop {
        let counts = lj
            .store()
            .count_by_owner(OWNER, chrono::DateTime::<chrono::Utc>::UNIX_EPOCH)
            .await
            .unwrap();
        if counts.active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let process_s = started.elapsed().as_secs_f64();
    worker.shutdown(Duration::from_secs(5)).await;
    let after = command_calls(&url).await;
    let mut per_job: Vec<(String, f64)> = after
        .iter()
        .map(|(name, calls)| {
            let delta = calls - before.get(name).copied().unwrap_or(0);
            (name.clone(), delta as f64 / jobs as f64)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    per_job.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = per_job.iter().map(|(_, n)| n).sum();
    let deleted = redis.delete_namespace().await.unwrap();
    eprintln!("deleted {deleted} keys");
    println!(
        "{}",
        serde_json::json!({
            "system": "longjob",
            "backend": "redis",
            "jobs": jobs,
            "concurrency": concurrency,
            "progress": progress,
            "enqueue_per_s": (jobs as f64 / enqueue_s).round(),
            "process_per_s": (jobs as f64 / process_s).round(),
            "redis_commands_per_job": (total * 10.0).round() / 10.0,
            "commands": per_job.iter().map(|(n, c)| format!("{n}={c:.2}")).collect::<Vec<_>>(),
        })
    );
}
