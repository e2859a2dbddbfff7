//! apalis + apalis-postgres side of longjob's throughput benchmark (same shape as
//! `longjob-bench throughput`): bulk-push N no-op tasks, then one worker of concurrency C;
//! prints one JSON line.
//!
//! ```text
//! cargo run --release --manifest-path bench/peers/apalis-postgres/Cargo.toml -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/test --jobs 20000 --concurrency 50 [--tuned]
//! ```
//! Without `--tuned`, apalis-postgres runs with its default `Config`; with it, `batch_size(50)`
//! and `lock_tasks(false)`. `process_per_s` is N over the time from the worker's start until N tasks succeeded. A run
//! that cannot finish (the worker stops, or nothing completes for 30 s) prints a line with
//! `"error"` and exits with status 1. apalis has no progress API: P is not modelled. The queue
//! has a name of its own; its rows are deleted afterwards. No manual ANALYZE is run.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_postgres::{Config, PgPool, PostgresStorage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noop {
    i: usize,
}

async fn noop(_task: Noop) -> Result<(), BoxDynError> {
    Ok(())
}

struct Args {
    database_url: String,
    jobs: usize,
    concurrency: usize,
    tuned: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        database_url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        jobs: 20_000,
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
            "--database-url" => args.database_url = value.clone(),
            "--jobs" => args.jobs = number()?,
            "--concurrency" => args.concurrency = number()?.max(1),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

async fn run(args: &Args, pool: &PgPool, queue: &str) -> Result<serde_json::Value, String> {
    let mut config = Config::default().queue(queue);
    if args.tuned {
        config = config.batch_size(50).lock_tasks(false);
    }
    let mut storage: PostgresStorage<Noop> = PostgresStorage::new(pool).with_config(config);

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
                "error: {e}\nusage: longjob-bench-apalis-postgres [--database-url URL] [--jobs N] [--concurrency C] [--tuned]"
            );
            return ExitCode::from(2);
        }
    };
    let queue = format!("lj-bench-apalis-{}-{}", std::process::id(), args.jobs);
    let mut line = serde_json::json!({
        "system": "apalis",
        "settings": if args.tuned { "tuned" } else { "default" },
        "backend": "postgres",
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "progress": 0,
    });
    let result = match PgPool::connect(&args.database_url).await {
        Ok(pool) => match PostgresStorage::setup(&pool).await {
            Ok(()) => {
                let r = run(&args, &pool, &queue).await;
                let _ = sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
                    .bind(&queue)
                    .execute(&pool)
                    .await;
                r
            }
            Err(e) => Err(format!("setup: {e}")),
        },
        Err(e) => Err(format!("connect: {e}")),
    };
    let code = match result {
        Ok(figures) => {
            if let (Some(line), Some(figures)) = (line.as_object_mut(), figures.as_object()) {
                line.extend(figures.clone());
            }
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
