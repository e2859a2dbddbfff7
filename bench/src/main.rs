//! `longjob-bench`: throughput of longjob on a backend, as one JSON line.
//!
//! ```text
//! longjob-bench throughput --backend memory --jobs 20000 --concurrency 50 --progress 10
//! ```
//! `process_per_s` is N over the time from the worker's start until the store shows all N jobs
//! completed; `enqueue_per_s` is N over the time to submit them (in batches of 1000).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use longjob_core::{JobResult, LongJob, LongJobConfig, SubmitRequest, WorkerConfig};

const OWNER: &str = "bench";

#[derive(Debug, Clone)]
struct Args {
    backend: String,
    jobs: usize,
    concurrency: usize,
    progress: u64,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: longjob-bench throughput --backend memory [--jobs N] [--concurrency C] [--progress P]\n\
         backends available in this build: memory"
    );
    ExitCode::from(2)
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
    };
    while let Some(flag) = argv.next() {
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
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn facade(backend: &str) -> Result<LongJob, String> {
    let mut config = LongJobConfig::default();
    config.jobs_per_hour = None;
    match backend {
        "memory" => Ok(LongJob::builder().config(config).build()),
        other => Err(format!("backend {other:?} is not available in this build")),
    }
}

async fn throughput(args: &Args) -> Result<serde_json::Value, String> {
    let lj = facade(&args.backend)?;
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
    // Every progress call is a real event, as every updateProgress is for the peers.
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
            .count_by_owner(OWNER, chrono_epoch())
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
        "enqueue_per_s": (args.jobs as f64 / enqueue_s).round(),
        "process_per_s": (args.jobs as f64 / process_s).round(),
    }))
}

fn chrono_epoch() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::<chrono::Utc>::UNIX_EPOCH
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return usage();
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
    match runtime.block_on(throughput(&args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
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
        assert!(parse(argv("throughput --jobs x")).is_err());
        assert!(parse(argv("throughput --nope 1")).is_err());
        assert!(parse(argv("other")).is_err());
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
