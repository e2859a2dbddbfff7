//! apalis + apalis-redis side of longjob's throughput benchmark (same shape as
//! `longjob-bench throughput`): bulk-push N no-op tasks, then one worker of concurrency C;
//! prints one JSON line.
//!
//! ```text
//! cargo run --release --manifest-path bench/peers/apalis/Cargo.toml -- \
//!     --redis-url redis://127.0.0.1:6379 --jobs 5000 --concurrency 50 [--tuned]
//! ```
//! Without `--tuned`, apalis-redis runs with its default `Config`; with it, `batch_size(50)` and
//! `lock_tasks(false)`. `process_per_s` is N over the time from the worker's start until N tasks
//! succeeded. A run that cannot finish (the worker stops, or nothing completes for 30 s) prints
//! a line with `"error"` and exits with status 1. apalis has no progress API: P is not modelled.
//! The queue has a name of its own; its keys are deleted afterwards.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_redis::{Config, RedisStorage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noop {
    i: usize,
}

async fn noop(_task: Noop) -> Result<(), BoxDynError> {
    Ok(())
}

struct Args {
    redis_url: String,
    jobs: usize,
    concurrency: usize,
    tuned: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        redis_url: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        jobs: 5000,
        concurrency: 50,
        tuned: false,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "--tuned" {
            args.tuned = true;
            continue;
        }
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--redis-url" => args.redis_url = value.clone(),
            "--jobs" => args.jobs = number()?,
            "--concurrency" => args.concurrency = number()?.max(1),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

async fn delete_keys(url: &str, queue: &str) -> Result<(), redis::RedisError> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{queue}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

async fn run(args: &Args, queue: &str) -> Result<serde_json::Value, String> {
    let conn = apalis_redis::connect(args.redis_url.as_str())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut config = Config::default().queue(queue);
    if args.tuned {
        config = config.batch_size(50).lock_tasks(false);
    }
    let mut storage = RedisStorage::new(conn).with_config(config);

    let enqueue_started = Instant::now();
    let mut next = 0;
    while next < args.jobs {
        let end = (next + 1000).min(args.jobs);
        storage
            .push_bulk((next..end).map(|i| Noop { i }).collect())
            .await
            .map_err(|e| format!("push: {e}"))?;
        next = end;
    }
    let enqueue_s = enqueue_started.elapsed().as_secs_f64();

    let done = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&done);
    let total = args.jobs;
    let worker = WorkerBuilder::new("longjob-bench")
        .backend(storage)
        .concurrency(args.concurrency)
        .on_event(move |ctx, event| {
            if matches!(event, Event::Success(_))
                && counted.fetch_add(1, Ordering::SeqCst) + 1 >= total
            {
                let _ = ctx.stop();
            }
        })
        .build(noop);
    let started = Instant::now();
    let mut run = tokio::spawn(worker.run());
    // Wait for every task, or for the worker to stop, or for 30 s without progress.
    let (mut last, mut last_change) = (0, Instant::now());
    let outcome = loop {
        tokio::select! {
            result = &mut run => break Some(result),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let now = done.load(Ordering::SeqCst);
        if now >= total {
            break None;
        }
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if last_change.elapsed() > Duration::from_secs(30) {
            run.abort();
            return Err(format!("stalled after {now} of {total} tasks"));
        }
    };
    let process_s = started.elapsed().as_secs_f64();
    let completed = done.load(Ordering::SeqCst);
    if completed < total {
        let why = match outcome {
            Some(Ok(Err(e))) => format!("the worker stopped: {e}"),
            Some(Err(e)) => format!("the worker panicked: {e}"),
            _ => "the worker stopped".to_owned(),
        };
        return Err(format!("{why} after {completed} of {total} tasks"));
    }
    run.abort();
    Ok(serde_json::json!({
        "enqueue_per_s": (args.jobs as f64 / enqueue_s).round(),
        "process_per_s": (args.jobs as f64 / process_s).round(),
    }))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "error: {e}\nusage: longjob-bench-apalis [--redis-url URL] [--jobs N] [--concurrency C] [--tuned]"
            );
            return ExitCode::from(2);
        }
    };
    let queue = format!("lj-bench-apalis-{}-{}", std::process::id(), args.jobs);
    let result = run(&args, &queue).await;
    if let Err(e) = delete_keys(&args.redis_url, &queue).await {
        eprintln!("warning: could not delete the queue's keys: {e}");
    }
    let mut line = serde_json::json!({
        "system": "apalis",
        "settings": if args.tuned { "tuned" } else { "default" },
        "backend": "redis",
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "progress": 0,
    });
    let code = match result {
        Ok(figures) => {
            line.as_object_mut()
                .expect("an object")
                .extend(figures.as_object().cloned().unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            line["error"] = serde_json::Value::String(e);
            ExitCode::FAILURE
        }
    };
    println!("{line}");
    code
}
