//! apalis peer of `longjob-bench` (apalis 1.0 with apalis-redis 1.0 or apalis-postgres 1.0).
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 apalis-peer --backend redis --mode default|tuned --jobs N --concurrency C
//! DATABASE_URL=postgres://… apalis-peer --backend postgres --mode default|tuned --jobs N --concurrency C
//! ```
//! Also `--redis-url URL` / `--database-url URL` instead of the variables, `--tuned` for
//! `--mode tuned`, `--timeout S` (default 600) and `--stall S` (default 20).
//! Pushes N no-op jobs (`push_bulk` in chunks of 1000) on a fresh queue, then runs one worker of
//! concurrency C; `process_per_s` is N over the time from the worker's start until the backend
//! shows all N jobs done (the `done` set in Redis, `status = 'Done'` rows in Postgres, polled every
//! 25 ms, as longjob's harness polls its store). Modes: `default` is apalis' default `Config`;
//! `tuned` is `batch_size(50)` (the fetch batch, which also sizes the in-process buffer) and
//! `lock_tasks(false)`.
//!
//! A run whose worker stops or whose completed count does not move for `--stall` seconds (or that
//! exceeds `--timeout`) is reported as `{"system":…, "error":"…"}` with exit status 1, never a hang:
//! with its defaults apalis-redis stops on a backlog of more than ~8 000 due jobs (a Lua `unpack`
//! of every due job id overflows Lua's stack: "too many results to unpack").
//! apalis has no progress API: `--progress` other than 0 is refused.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct Args {
    backend: String,
    mode: String,
    jobs: usize,
    concurrency: usize,
    progress: u64,
    timeout: Duration,
    stall: Duration,
    /// Else `REDIS_URL`, else loopback.
    redis_url: Option<String>,
    /// Else `DATABASE_URL`, else loopback.
    database_url: Option<String>,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        backend: "redis".into(),
        mode: "default".into(),
        jobs: 5_000,
        concurrency: 50,
        progress: 0,
        timeout: Duration::from_secs(600),
        stall: Duration::from_secs(20),
        redis_url: None,
        database_url: None,
    };
    while let Some(flag) = argv.next() {
        if flag == "--tuned" {
            args.mode = "tuned".into();
            continue;
        }
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--backend" => args.backend = value.clone(),
            "--mode" => args.mode = value.clone(),
            "--jobs" => args.jobs = number()? as usize,
            "--concurrency" => args.concurrency = number()?.max(1) as usize,
            "--progress" => args.progress = number()?,
            "--timeout" => args.timeout = Duration::from_secs(number()?),
            "--stall" => args.stall = Duration::from_secs(number()?),
            "--redis-url" => args.redis_url = Some(value.clone()),
            "--database-url" => args.database_url = Some(value.clone()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if !matches!(args.backend.as_str(), "redis" | "postgres") {
        return Err(format!("--backend {}: redis or postgres", args.backend));
    }
    if !matches!(args.mode.as_str(), "default" | "tuned") {
        return Err(format!("--mode {}: default or tuned", args.mode));
    }
    if args.progress != 0 {
        return Err("apalis has no progress API: --progress must be 0".into());
    }
    Ok(args)
}

fn system(backend: &str) -> String {
    format!("apalis-{backend}")
}

fn queue_name(backend: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "longjob-bench-apalis-{backend}-{}-{nanos}",
        std::process::id()
    )
}

async fn noop(_job: Value) -> Result<(), BoxDynError> {
    Ok(())
}

/// What the measurement loop watches: the backend's count of done jobs, and the worker.
struct Watch<'a> {
    args: &'a Args,
    /// Errors the worker reported (its event stream), most recent last.
    errors: Arc<Mutex<Vec<String>>>,
    worker: tokio::task::JoinHandle<Result<(), WorkerError>>,
}

impl Watch<'_> {
    /// Waits until `done()` reaches N; errors on a stopped worker, a stall or the timeout.
    async fn until_done<F, Fut>(&mut self, mut done: F) -> Result<f64, String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<u64, String>>,
    {
        let started = Instant::now();
        let target = self.args.jobs as u64;
        let mut last = 0;
        let mut last_move = Instant::now();
        loop {
            let count = done().await?;
            if count >= target {
                return Ok(started.elapsed().as_secs_f64());
            }
            if count != last {
                last = count;
                last_move = Instant::now();
            }
            let why = if self.worker.is_finished() {
                Some("the worker stopped".to_string())
            } else if last_move.elapsed() > self.args.stall {
                Some(format!("stalled for {}s", self.args.stall.as_secs()))
            } else if started.elapsed() > self.args.timeout {
                Some(format!("timed out after {}s", self.args.timeout.as_secs()))
            } else {
                None
            };
            if let Some(why) = why {
                let mut detail = String::new();
                if self.worker.is_finished() {
                    if let Ok(Err(e)) = (&mut self.worker).await {
                        detail = format!(": {e}");
                    }
                }
                if let Ok(errors) = self.errors.lock() {
                    if let Some(last) = errors.last() {
                        detail.push_str(&format!(
                            "; last worker error ({} in all): {last}",
                            errors.len()
                        ));
                    }
                }
                return Err(format!("{why} at {count}/{target} jobs done{detail}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn record_errors(errors: &Arc<Mutex<Vec<String>>>) -> impl Fn(&WorkerContext, &Event) + use<> {
    let errors = errors.clone();
    move |_, event| {
        if let Event::Error(e) = event {
            if let Ok(mut errors) = errors.lock() {
                errors.push(e.to_string());
            }
        }
    }
}

fn figures(args: &Args, enqueue_s: f64, process_s: f64) -> Value {
    json!({
        "system": system(&args.backend),
        "backend": args.backend,
        "mode": args.mode,
        "version": "1.0.0",
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "progress": args.progress,
        "enqueue_per_s": (args.jobs as f64 / enqueue_s).round() as u64,
        "process_per_s": (args.jobs as f64 / process_s).round() as u64,
    })
}

async fn run_redis(args: &Args) -> Result<Value, String> {
    use apalis_redis::{Config, RedisStorage};
    let url = args.redis_url.clone().unwrap_or_else(|| {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    });
    let conn = apalis_redis::connect(url.as_str())
        .await
        .map_err(|e| format!("redis {url}: {e}"))?;
    let queue = queue_name("redis");
    let mut config = Config::default().queue(&queue);
    if args.mode == "tuned" {
        config = config.batch_size(50).lock_tasks(false);
    }
    let result = async {
        let mut storage = RedisStorage::<Value>::new(conn.clone()).with_config(config.clone());
        let enqueue_started = Instant::now();
        let ids: Vec<usize> = (0..args.jobs).collect();
        for chunk in ids.chunks(1000) {
            storage
                .push_bulk(chunk.iter().map(|i| json!(i)).collect())
                .await
                .map_err(|e| format!("push: {e}"))?;
        }
        let enqueue_s = enqueue_started.elapsed().as_secs_f64();

        let errors = Arc::new(Mutex::new(Vec::new()));
        let worker = WorkerBuilder::new(format!("{queue}-worker"))
            .backend(storage)
            .concurrency(args.concurrency)
            .on_event(record_errors(&errors))
            .build(noop);
        let mut watch = Watch {
            args,
            errors,
            worker: tokio::spawn(worker.run()),
        };
        let done_set = config.done_jobs_set();
        let mut counter = conn.clone();
        let process_s = watch
            .until_done(|| {
                let mut counter = counter.clone();
                let done_set = done_set.clone();
                async move {
                    redis::cmd("SCARD")
                        .arg(&done_set)
                        .query_async::<u64>(&mut counter)
                        .await
                        .map_err(|e| format!("SCARD: {e}"))
                }
            })
            .await;
        watch.worker.abort();
        let _ = &mut counter;
        Ok::<_, String>(figures(args, enqueue_s, process_s?))
    }
    .await;
    // Remove the queue's keys whatever happened.
    let mut conn = conn;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = match redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{queue}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                eprintln!("apalis-redis: cleanup SCAN: {e}");
                break;
            }
        };
        if !keys.is_empty() {
            if let Err(e) = redis::cmd("DEL")
                .arg(&keys)
                .query_async::<u64>(&mut conn)
                .await
            {
                eprintln!("apalis-redis: cleanup DEL: {e}");
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    // apalis registers each queue (by its workers' key) in a global sorted set.
    const QUEUES: &str = "core:apalis:queues:list";
    if let Ok(members) = redis::cmd("ZRANGE")
        .arg(QUEUES)
        .arg(0)
        .arg(-1)
        .query_async::<Vec<String>>(&mut conn)
        .await
    {
        let ours: Vec<&String> = members.iter().filter(|m| m.starts_with(&queue)).collect();
        if !ours.is_empty() {
            if let Err(e) = redis::cmd("ZREM")
                .arg(QUEUES)
                .arg(&ours)
                .query_async::<u64>(&mut conn)
                .await
            {
                eprintln!("apalis-redis: cleanup ZREM: {e}");
            }
        }
    }
    result
}

async fn run_postgres(args: &Args) -> Result<Value, String> {
    use apalis_postgres::{Config, PgPool, PostgresStorage};
    let url = args.database_url.clone().unwrap_or_else(|| {
        std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    });
    let pool = PgPool::connect(&url)
        .await
        .map_err(|e| format!("postgres: {e}"))?;
    // apalis-postgres lives in its fixed schema `apalis` (migration history included); each run
    // uses a fresh queue (job_type) and deletes its rows at the end.
    PostgresStorage::setup(&pool)
        .await
        .map_err(|e| format!("apalis-postgres setup: {e}"))?;
    let queue = queue_name("postgres");
    let mut config = Config::default().queue(&queue);
    if args.mode == "tuned" {
        config = config.batch_size(50).lock_tasks(false);
    }
    let result = async {
        let mut storage = PostgresStorage::<Value>::new(&pool).with_config(config);
        let enqueue_started = Instant::now();
        let ids: Vec<usize> = (0..args.jobs).collect();
        for chunk in ids.chunks(1000) {
            storage
                .push_bulk(chunk.iter().map(|i| json!(i)).collect())
                .await
                .map_err(|e| format!("push: {e}"))?;
        }
        let enqueue_s = enqueue_started.elapsed().as_secs_f64();

        let errors = Arc::new(Mutex::new(Vec::new()));
        let worker = WorkerBuilder::new(format!("{queue}-worker"))
            .backend(storage)
            .concurrency(args.concurrency)
            .on_event(record_errors(&errors))
            .build(noop);
        let mut watch = Watch {
            args,
            errors,
            worker: tokio::spawn(worker.run()),
        };
        let process_s = watch
            .until_done(|| {
                let pool = pool.clone();
                let queue = queue.clone();
                async move {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'",
                    )
                    .bind(queue)
                    .fetch_one(&pool)
                    .await
                    .map(|n| n as u64)
                    .map_err(|e| format!("count: {e}"))
                }
            })
            .await;
        watch.worker.abort();
        Ok::<_, String>(figures(args, enqueue_s, process_s?))
    }
    .await;
    for (table, sql) in [
        ("jobs", "DELETE FROM apalis.jobs WHERE job_type = $1"),
        (
            "workers",
            "DELETE FROM apalis.workers WHERE worker_type = $1",
        ),
    ] {
        if let Err(e) = sqlx::query(sql).bind(&queue).execute(&pool).await {
            eprintln!("apalis-postgres: cleanup of apalis.{table}: {e}");
        }
    }
    result
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "usage: apalis-peer --backend redis|postgres --mode default|tuned --jobs N --concurrency C [--timeout S] [--stall S]"
            );
            println!("{}", json!({"system": "apalis", "error": e}));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let run = async {
            match args.backend.as_str() {
                "redis" => run_redis(&args).await,
                _ => run_postgres(&args).await,
            }
        };
        // Whatever hangs (a server that does not answer), the run ends with a failure line.
        let limit = args.timeout + Duration::from_secs(60);
        tokio::time::timeout(limit, run)
            .await
            .unwrap_or_else(|_| Err(format!("gave up after {}s", limit.as_secs())))
    });
    // Do not wait for a stuck worker task on the way out.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{}",
                json!({
                    "system": system(&args.backend),
                    "backend": args.backend,
                    "mode": args.mode,
                    "jobs": args.jobs,
                    "concurrency": args.concurrency,
                    "progress": args.progress,
                    "error": e,
                })
            );
            ExitCode::FAILURE
        }
    }
}
