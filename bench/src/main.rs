//! `longjob-bench`: throughput of longjob on a backend, as one JSON line.
//!
//! ```text
//! longjob-bench throughput --backend memory --jobs 20000 --concurrency 50 --progress 10
//! ```
//! `process_per_s` is N over the time from the worker's start until the store shows all N jobs
//! completed; `enqueue_per_s` is N over the time to submit them (in batches of 1000).
//!
//! `--peers` then runs, as child processes, the other job systems on the same backend (see
//! [`peers`]: BullMQ and apalis-redis for redis; graphile-worker, pg-boss and apalis-postgres for
//! postgres; both sets for memory, to try them) and prints a Markdown table after longjob's JSON
//! line, with longjob's `process_per_s` ratio to each peer. Peers find their servers through
//! `--redis-url` / `--database-url` (else `REDIS_URL` / `DATABASE_URL`, else loopback defaults).

mod peers;
mod pg_stats;
mod redis_stats;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use longjob_core::{JobResult, LongJob, LongJobConfig, SubmitRequest, WorkerConfig};

const OWNER: &str = "bench";

#[derive(Debug, Clone)]
struct Args {
    backend: String,
    jobs: usize,
    concurrency: usize,
    progress: u64,
    peers: bool,
    redis_url: String,
    database_url: String,
    /// Seconds each peer may run before it reports a failure.
    peer_timeout: u64,
    /// `--peer-set redis|postgres|all`: the peers to run instead of the backend's own.
    peer_set: Option<String>,
    /// PostgreSQL: LISTEN/NOTIFY wake-ups and live events on (`--notify on|off`).
    notify: bool,
    /// PostgreSQL: workers' store writes commit without waiting for the WAL flush
    /// (`--relaxed-writes on|off`, `PgConfig::relaxed_worker_writes`).
    relaxed_writes: bool,
    /// PostgreSQL: statements of one kind running at once (`--batch-in-flight N`,
    /// `PgConfig::batch_in_flight`); `None` keeps the default.
    batch_in_flight: Option<usize>,
    /// Most jobs the worker claims at once (`--claim-batch N`, `WorkerConfig::claim_batch`);
    /// `None` keeps the default (the concurrency).
    claim_batch: Option<usize>,
    /// How long the claimer gathers freed slots, in ms (`--claim-gather MS`,
    /// `WorkerConfig::claim_gather`); `None` keeps the default.
    claim_gather_ms: Option<u64>,
    /// How long a job's start (its store write and `processing` event) waits for its end, in
    /// ms (`--start-hold MS`, `WorkerConfig::start_hold`); `None` keeps the default.
    start_hold_ms: Option<u64>,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

const USAGE: &str = "usage: longjob-bench throughput --backend memory|redis|postgres [--jobs N] [--concurrency C] [--progress P]\n\
\x20                              [--peers] [--redis-url URL] [--database-url URL] [--notify on|off] [--relaxed-writes on|off] [--batch-in-flight N] [--claim-batch N] [--claim-gather MS] [--start-hold MS] [--peer-timeout S] [--peer-set redis|postgres|all]\n\
\x20      longjob-bench --help\n\
backends available in this build: memory, redis, postgres";

/// Whether the command line asks for the usage (`-h`, `--help` or `help`) rather than a run.
fn asks_for_help(argv: &[String]) -> bool {
    argv.first().is_some_and(|a| a == "help") || argv.iter().any(|a| a == "-h" || a == "--help")
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    if argv.next().as_deref() != Some("throughput") {
        return Err("the first argument must be `throughput`".into());
    }
    let mut args = Args {
        backend: "memory".into(),
        jobs: 20_000,
        concurrency: 50,
        progress: 0,
        peers: false,
        redis_url: env_or("REDIS_URL", "redis://127.0.0.1:6379"),
        database_url: env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
        peer_timeout: 900,
        peer_set: None,
        notify: true,
        relaxed_writes: false,
        batch_in_flight: None,
        claim_batch: None,
        claim_gather_ms: None,
        start_hold_ms: None,
    };
    while let Some(flag) = argv.next() {
        if flag == "--peers" {
            args.peers = true;
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
            "--jobs" => args.jobs = number()? as usize,
            "--concurrency" => args.concurrency = number()?.max(1) as usize,
            "--progress" => args.progress = number()?,
            "--redis-url" => args.redis_url = value.clone(),
            "--database-url" => args.database_url = value.clone(),
            "--peer-timeout" => args.peer_timeout = number()?,
            "--batch-in-flight" => args.batch_in_flight = Some(number()?.max(1) as usize),
            "--claim-batch" => args.claim_batch = Some(number()?.max(1) as usize),
            "--claim-gather" => args.claim_gather_ms = Some(number()?),
            "--start-hold" => args.start_hold_ms = Some(number()?),
            "--notify" => {
                args.notify = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("--notify {value}: on or off")),
                }
            }
            "--relaxed-writes" => {
                args.relaxed_writes = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("--relaxed-writes {value}: on or off")),
                }
            }
            "--peer-set" => {
                if peers::PeerSet::named(&value).is_none() {
                    return Err(format!("--peer-set {value}: redis, postgres or all"));
                }
                args.peer_set = Some(value.clone());
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// The facade under test: one match arm per backend (async, for backends that connect first;
/// `args` carries `redis_url` and `database_url`).
/// The backends of a run, and what to clean up after it.
enum Namespace {
    None,
    Redis(longjob_redis::Redis),
    Postgres(longjob_postgres::PgBackend),
}

impl Namespace {
    async fn clean(&self) {
        match self {
            Namespace::None => {}
            Namespace::Redis(redis) => {
                if let Err(e) = redis.delete_namespace().await {
                    eprintln!("warning: could not delete the bench keys: {e}");
                }
            }
            Namespace::Postgres(pg) => {
                let drop = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", pg.schema());
                if let Err(e) = sqlx::query(&drop).execute(pg.pool()).await {
                    eprintln!("warning: could not drop the bench schema: {e}");
                }
            }
        }
    }
}

async fn facade(args: &Args) -> Result<(LongJob, Namespace), String> {
    let mut config = LongJobConfig::default();
    config.jobs_per_hour = None;
    let builder = LongJob::builder().config(config);
    match args.backend.as_str() {
        "memory" => Ok((builder.build(), Namespace::None)),
        "redis" => {
            let prefix = format!("lj-bench-{}", longjob_core::JobId::new());
            let redis = longjob_redis::Redis::connect(
                longjob_redis::RedisConfig::new(&args.redis_url).prefix(prefix),
            )
            .await
            .map_err(|e| format!("redis at {}: {e}", args.redis_url))?;
            let lj = builder
                .store(Arc::new(redis.store()))
                .queue(Arc::new(redis.queue()))
                .bus(Arc::new(redis.bus()))
                .build();
            Ok((lj, Namespace::Redis(redis)))
        }
        "postgres" => {
            let schema = format!("lj_bench_{:016x}", rand_suffix());
            let mut config = longjob_postgres::PgConfig::new(&args.database_url)
                .schema(schema)
                .notifications(args.notify)
                .relaxed_worker_writes(args.relaxed_writes);
            if let Some(n) = args.batch_in_flight {
                config = config.batch_in_flight(n);
            }
            let pg = longjob_postgres::PgBackend::connect(config)
                .await
                .map_err(|e| format!("postgres at {}: {e}", args.database_url))?;
            let lj = builder
                .store(Arc::new(pg.store()))
                .queue(Arc::new(pg.queue()))
                .bus(Arc::new(pg.bus()))
                .build();
            Ok((lj, Namespace::Postgres(pg)))
        }
        other => Err(format!("backend {other:?} is not available in this build")),
    }
}

async fn throughput(args: &Args) -> Result<serde_json::Value, String> {
    let (lj, namespace) = facade(args).await?;
    // A run stopped by Ctrl-C or SIGTERM still removes its keys or schema: an interrupted run
    // of 200 000 jobs left 300 000 keys (777 MB) in Redis, and the runs after it were slower.
    let result = tokio::select! {
        result = run(args, &lj) => result,
        signal = interrupted() => Err(format!("interrupted by {signal}; the run's data was removed")),
    };
    namespace.clean().await;
    result
}

/// Resolves on SIGINT or SIGTERM (never, if neither can be listened for).
async fn interrupted() -> &'static str {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => "SIGINT",
            Err(_) => std::future::pending().await,
        },
        () = terminate => "SIGTERM",
    }
}

async fn run(args: &Args, lj: &LongJob) -> Result<serde_json::Value, String> {
    let requests: Vec<SubmitRequest> = (0..args.jobs)
        .map(|i| SubmitRequest::new("noop", OWNER, serde_json::json!(i)).max_attempts(1))
        .collect();
    let enqueue_started = Instant::now();
    for chunk in requests.chunks(1000) {
        lj.submit_batch(chunk.to_vec())
            .await
            .map_err(|e| e.to_string())?;
    }
    let enqueue_s = enqueue_started.elapsed().as_secs_f64();

    let progress = args.progress;
    let mut worker_config = WorkerConfig::default();
    worker_config.concurrency = args.concurrency;
    worker_config.claim_batch = args.claim_batch;
    if let Some(ms) = args.claim_gather_ms {
        worker_config.claim_gather = Duration::from_millis(ms);
    }
    if let Some(ms) = args.start_hold_ms {
        worker_config.start_hold = Duration::from_millis(ms);
    }
    // Every progress call is a real event, as every updateProgress is for the peers.
    worker_config.progress_interval = Duration::ZERO;
    worker_config.claim_wait = Duration::from_millis(200);
    // Handler runs counted in-process, so the store is polled only once every job has run at
    // least once: polling a store that cannot be done yet would only load the backend measured.
    let handled = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let worker = lj
        .worker()
        .config(worker_config)
        .handle("noop", {
            let handled = Arc::clone(&handled);
            move |ctx, _: serde_json::Value| {
                let handled = Arc::clone(&handled);
                async move {
                    for i in 1..=progress {
                        ctx.progress(i, progress).await;
                    }
                    handled.fetch_add(1, Ordering::Relaxed);
                    Ok(None::<JobResult>)
                }
            }
        })
        .start();
    while handled.load(Ordering::Relaxed) < args.jobs {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    loop {
        let counts = lj
            .store()
            // Only `active` is read: counting nothing as created keeps the poll cheap.
            .count_by_owner(OWNER, chrono::Utc::now())
            .await
            .map_err(|e| e.to_string())?;
        if counts.active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let process_s = started.elapsed().as_secs_f64();
    worker.shutdown(Duration::from_secs(5)).await;
    Ok(serde_json::json!({
        "system": "longjob",
        "backend": args.backend,
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "progress": args.progress,
        "enqueue_per_s": (args.jobs as f64 / enqueue_s).round() as u64,
        "process_per_s": (args.jobs as f64 / process_s).round() as u64,
    }))
}

/// A schema-name suffix: the low bits of a fresh (time-ordered, random-tailed) job id.
fn rand_suffix() -> u64 {
    longjob_core::JobId::new().as_uuid().as_u64_pair().1
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if asks_for_help(&argv) {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse(argv.into_iter()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On Redis, the server's command count before and after (INFO commandstats); on PostgreSQL,
    // the database's transaction count.
    let before = (args.backend == "redis").then(|| redis_stats::command_calls(&args.redis_url));
    let pg_before =
        (args.backend == "postgres").then(|| pg_stats::transactions(&args.database_url));
    let mut line = match runtime.block_on(throughput(&args)) {
        Ok(line) => line,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match before {
        Some(Ok(before)) => match redis_stats::command_calls(&args.redis_url) {
            Ok(after) => {
                line["redis_commands_per_job"] =
                    peers::per_job(after.saturating_sub(before), args.jobs)
            }
            Err(e) => eprintln!("redis commands per job: {e}"),
        },
        Some(Err(e)) => eprintln!("redis commands per job: {e}"),
        None => {}
    }
    drop(runtime);
    if let Some(n) = args.claim_batch {
        line["claim_batch"] = serde_json::json!(n);
    }
    match pg_before {
        Some(Ok(before)) => match pg_stats::after(&args.database_url) {
            Ok(after) => {
                line["pg_transactions_per_job"] = pg_stats::per_job(before, after, args.jobs);
                line["pg_relaxed_writes"] = serde_json::json!(args.relaxed_writes);
            }
            Err(e) => eprintln!("PostgreSQL transactions per job: {e}"),
        },
        Some(Err(e)) => eprintln!("PostgreSQL transactions per job: {e}"),
        None => {}
    }
    println!("{line}");
    if args.peers {
        run_peers(&args, &line);
    }
    ExitCode::SUCCESS
}

/// Runs the peers of `args.backend` one after the other and prints the table on stdout.
fn run_peers(args: &Args, longjob: &serde_json::Value) {
    let env = peers::Env {
        peers_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("peers"),
        redis_url: args.redis_url.clone(),
        database_url: args.database_url.clone(),
        concurrency: args.concurrency,
        progress: args.progress,
        timeout_s: args.peer_timeout,
        apalis: std::cell::OnceCell::new(),
    };
    let sets = match &args.peer_set {
        Some(name) => peers::PeerSet::named(name).unwrap_or_default(),
        None => peers::PeerSet::for_backend(&args.backend),
    };
    let results: Vec<serde_json::Value> = sets
        .into_iter()
        .flat_map(|set| peers::plan(set, args.jobs, args.progress))
        .map(|run| peers::run_one(&run, &env))
        .collect();
    println!();
    print!("{}", peers::table(longjob, &results));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags_and_refuses_bad_ones() {
        let argv = |s: &str| {
            s.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
                .into_iter()
        };
        let args = parse(argv("throughput --jobs 10 --concurrency 2 --progress 3")).unwrap();
        assert_eq!((args.jobs, args.concurrency, args.progress), (10, 2, 3));
        assert!(!args.peers);
        assert_eq!(args.claim_batch, None);
        let args = parse(argv("throughput --claim-batch 10")).unwrap();
        assert_eq!(args.claim_batch, Some(10));
        let args = parse(argv(
            "throughput --peers --redis-url redis://h:1 --database-url postgres://h/db --peer-timeout 5",
        ))
        .unwrap();
        assert!(args.peers);
        assert_eq!(args.redis_url, "redis://h:1");
        assert_eq!(args.database_url, "postgres://h/db");
        assert_eq!(args.peer_timeout, 5);
        assert!(parse(argv("throughput --peer-set mysql")).is_err());
        assert_eq!(
            parse(argv("throughput --peer-set redis"))
                .unwrap()
                .peer_set
                .as_deref(),
            Some("redis")
        );
        assert!(!parse(argv("throughput")).unwrap().relaxed_writes);
        assert!(
            parse(argv("throughput --relaxed-writes on"))
                .unwrap()
                .relaxed_writes
        );
        assert!(parse(argv("throughput --relaxed-writes maybe")).is_err());
        assert_eq!(
            parse(argv("throughput --batch-in-flight 3"))
                .unwrap()
                .batch_in_flight,
            Some(3)
        );
        assert!(parse(argv("throughput --jobs x")).is_err());
        assert!(parse(argv("throughput --nope 1")).is_err());
        assert!(parse(argv("other")).is_err());
    }

    #[test]
    fn help_is_asked_for_anywhere_on_the_line() {
        let line = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert!(asks_for_help(&line("--help")));
        assert!(asks_for_help(&line("-h")));
        assert!(asks_for_help(&line("help")));
        assert!(asks_for_help(&line("throughput --backend redis --help")));
        assert!(!asks_for_help(&line("throughput --backend redis")));
        assert!(!asks_for_help(&line("")));
    }

    #[test]
    fn a_small_run_completes_every_job() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let args = parse(
            "throughput --jobs 300 --concurrency 8 --progress 2"
                .split(' ')
                .map(String::from),
        )
        .unwrap();
        let line = rt.block_on(throughput(&args)).unwrap();
        assert_eq!(line["jobs"], 300);
        assert!(line["process_per_s"].as_f64().unwrap() > 0.0);
    }
}
