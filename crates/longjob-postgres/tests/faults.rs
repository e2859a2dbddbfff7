//! Faults: a private PostgreSQL cluster restarted in the middle of a run, and a worker that
//! dies in the middle of a job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use longjob_core::memory::MemoryBlobStore;
use longjob_core::signing::UrlSigner;
use longjob_core::{
    JobId, JobState, LongJob, LongJobConfig, LongJobError, RetryPolicy, SubmitRequest, WorkerConfig,
};
use longjob_postgres::{PgBackend, PgConfig};

const OWNER: &str = "alice";

fn facade(pg: &PgBackend) -> LongJob {
    let mut config = LongJobConfig::default();
    config.jobs_per_hour = None;
    config.retry = RetryPolicy {
        max_attempts: 10,
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(2),
        jitter: true,
    };
    LongJob::builder()
        .store(Arc::new(pg.store()))
        .queue(Arc::new(pg.queue()))
        .bus(Arc::new(pg.bus()))
        .blobs(Arc::new(MemoryBlobStore::new(UrlSigner::random(
            "http://127.0.0.1/files",
        ))))
        .config(config)
        .build()
}

fn worker_config(concurrency: usize, lease: Duration) -> WorkerConfig {
    let mut c = WorkerConfig::default();
    c.concurrency = concurrency;
    c.lease_ttl = lease;
    c.heartbeat_interval = lease / 4;
    c.claim_wait = Duration::from_millis(500);
    c.purge_interval = None;
    c
}

/// A private cluster: its own data directory and port, started and stopped with pg_ctl.
struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Cluster {
    async fn create() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect(
                "the fault test needs PostgreSQL's server binaries (/usr/lib/postgresql/*/bin): \
                 run `bash scripts/services/postgres.sh`",
            );
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("lj-pg-fault-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            run("chown", &["postgres:postgres", dir.to_str().unwrap()]).await;
        }
        let cluster = Self { dir, bin, port };
        let data = cluster.data();
        cluster
            .as_pg(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
            )
            .await;
        cluster.start().await;
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn as_pg(&self, tool: &str, args: &[&str]) {
        let tool = self.bin.join(tool).to_string_lossy().into_owned();
        if is_root() {
            let mut all = vec!["-u", "postgres", "--", tool.as_str()];
            all.extend_from_slice(args);
            run("runuser", &all).await;
        } else {
            run(&tool, args).await;
        }
    }

    async fn start(&self) {
        let log = self.dir.join("server.log").to_string_lossy().into_owned();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.display()
        );
        let data = self.data();
        self.as_pg(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-o", &options, "start"],
        )
        .await;
    }

    async fn stop(&self) {
        let data = self.data();
        self.as_pg("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])
            .await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl").to_string_lossy().into_owned();
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if is_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--", &pg_ctl])
                .args(args)
                .output()
        } else {
            std::process::Command::new(&pg_ctl).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false)
}

async fn run(program: &str, args: &[&str]) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_run_every_job_completes_exactly_once() {
    restart_mid_run(false).await;
}

/// A clean stop flushes the WAL, relaxed commits included: nothing is lost, nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_run_with_relaxed_worker_writes_every_job_completes_exactly_once() {
    restart_mid_run(true).await;
}

async fn restart_mid_run(relaxed_worker_writes: bool) {
    const JOBS: usize = 300;
    let cluster = Cluster::create().await;
    let config = PgConfig::new(cluster.url())
        .poll_interval(Duration::from_millis(200))
        .acquire_timeout(Duration::from_secs(2))
        .statement_timeout(Some(Duration::from_secs(5)))
        .relaxed_worker_writes(relaxed_worker_writes);
    let pg = PgBackend::connect(config).await.unwrap();
    let lj = facade(&pg);

    let runs: Arc<Mutex<HashMap<JobId, u32>>> = Arc::default();
    let seen = Arc::clone(&runs);
    let worker = lj
        .worker()
        .config(worker_config(16, Duration::from_secs(8)))
        .handle("work", move |ctx, _: serde_json::Value| {
            let seen = Arc::clone(&seen);
            async move {
                *seen.lock().unwrap().entry(ctx.job_id()).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(60)).await;
                ctx.progress(1, 1).await;
                Ok(None)
            }
        })
        .start();

    let requests = (0..JOBS)
        .map(|i| SubmitRequest::new("work", OWNER, serde_json::json!({ "i": i })))
        .collect();
    let jobs: Vec<JobId> = lj
        .submit_batch(requests)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();

    // Let a quarter of the jobs run, then take the database away mid-run.
    let started = Instant::now();
    while runs.lock().unwrap().len() < JOBS / 4 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "jobs do not run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.stop().await;
    let outage = Instant::now();

    // The API side reports the outage as errors (transient backend errors), never panics.
    let status = lj.status(jobs[0], OWNER).await.unwrap_err();
    assert!(
        matches!(&status, LongJobError::Backend(e) if e.is_transient()),
        "{status:?}"
    );
    let submit = lj
        .submit(SubmitRequest::new("work", OWNER, serde_json::json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(&submit, LongJobError::Backend(e) if e.is_transient()),
        "{submit:?}"
    );
    assert!(lj.subscribe(jobs[1], OWNER, 0).await.is_err());
    let remaining = Duration::from_secs(3).saturating_sub(outage.elapsed());
    tokio::time::sleep(remaining).await;
    cluster.start().await;

    // Every job completes.
    let schema = pg.schema().to_owned();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done: Result<i64, _> = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {schema}.download_jobs WHERE state = 'completed'"
        ))
        .fetch_one(pg.pool())
        .await;
        if done.as_ref().is_ok_and(|n| *n as usize == JOBS) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every job completed after the restart: {done:?} of {JOBS}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.shutdown(Duration::from_secs(5)).await;

    // Exactly once: each job went to Completed once (one `completed` event, never two), and
    // the queue is empty.
    let completed_events: Vec<(uuid::Uuid, i64)> = sqlx::query_as(&format!(
        "SELECT job_id, count(*) FROM {schema}.job_events \
         WHERE payload->>'type' = 'completed' GROUP BY job_id"
    ))
    .fetch_all(pg.pool())
    .await
    .unwrap();
    assert!(
        completed_events.iter().all(|(_, n)| *n == 1),
        "a job completed twice: {:?}",
        completed_events
            .iter()
            .filter(|(_, n)| *n != 1)
            .collect::<Vec<_>>()
    );
    // And once at least: every job told its end (the worker retries an outcome's publish
    // through the outage), so exactly one `completed` event for each job of the run.
    let completed_once = completed_events
        .iter()
        .filter(|(id, n)| *n == 1 && jobs.contains(&JobId::from_uuid(*id)))
        .count();
    assert_eq!(
        completed_once,
        JOBS,
        "jobs without a `completed` event: {:?}",
        jobs.iter()
            .filter(|id| !completed_events.iter().any(|(j, _)| j == id.as_uuid()))
            .collect::<Vec<_>>()
    );
    let stats = longjob_core::Queue::stats(&pg.queue()).await.unwrap();
    assert_eq!((stats.ready, stats.delayed, stats.leased), (0, 0, 0));
    for id in &jobs {
        let job = lj.status(*id, OWNER).await.unwrap();
        assert_eq!(job.state, JobState::Completed, "{job:?}");
    }
    let runs = runs.lock().unwrap();
    let reruns: u32 = runs.values().map(|n| n - 1).sum();
    eprintln!(
        "restart test: {JOBS} jobs completed once each; {} completed events; {reruns} handler re-runs after the outage",
        completed_events.len()
    );
    assert_eq!(runs.len(), JOBS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_job_is_finished_by_another_after_its_lease() {
    let pg = common::backend().await;
    let lj = facade(&pg);
    let lease = Duration::from_secs(2);
    let started = Arc::new(tokio::sync::Notify::new());
    let first = lj
        .worker()
        .config(worker_config(2, lease))
        .handle("work", {
            let started = Arc::clone(&started);
            move |_ctx, _: serde_json::Value| {
                let started = Arc::clone(&started);
                async move {
                    started.notify_one();
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(None)
                }
            }
        })
        .start();
    let id = lj
        .submit(SubmitRequest::new("work", OWNER, serde_json::json!({})))
        .await
        .unwrap()
        .job
        .id;
    tokio::time::timeout(Duration::from_secs(20), started.notified())
        .await
        .expect("the first worker never started the job");
    // Its start is written once the handler outlasts the start's hold.
    let deadline = Instant::now() + Duration::from_secs(20);
    while lj.status(id, OWNER).await.unwrap().state != JobState::Running {
        assert!(Instant::now() < deadline, "the start was never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first worker dies without a word: no release, no heartbeat.
    first.abort().await;
    let died = Instant::now();

    let second = lj
        .worker()
        .config(worker_config(2, lease))
        .handle("work", |_ctx, _: serde_json::Value| async move { Ok(None) })
        .start();
    let job = tokio::time::timeout(Duration::from_secs(30), lj.wait_finished(id, OWNER))
        .await
        .expect("the job was not finished by the second worker")
        .unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.attempt, 2, "the second worker ran a second attempt");
    assert!(
        died.elapsed() >= lease / 2,
        "taken over before the lease could expire ({:?})",
        died.elapsed()
    );
    second.shutdown(Duration::from_secs(5)).await;
}

/// WAL flushes (`pg_stat_wal.wal_sync`) of the private cluster so far, once the backends whose
/// statistics are pending have exited (`pg` closed).
async fn wal_syncs(cluster: &Cluster) -> i64 {
    use sqlx::Connection;
    // Exited backends publish their statistics while exiting, shortly after the client leaves.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    n
}

/// Writes one job `WRITES` times, one write after the other, as its worker (`worker`: started
/// under a lease, then progress flushes) or as the API (cancelled, then touched again), then
/// closes the backend.
async fn sequential_writes(pg: PgBackend, worker: bool) {
    use longjob_core::{Job, JobStore};
    let store = pg.store();
    let mut job = Job::new("work", OWNER, serde_json::json!({}));
    store.insert(&job, Duration::from_secs(60)).await.unwrap();
    job.version = 1;
    if worker {
        job.start(1, chrono::Utc::now()).unwrap();
    } else {
        job.cancel(chrono::Utc::now()).unwrap();
    }
    for i in 0..WRITES {
        job.progress.current = i;
        job = store.update(&job).await.unwrap();
    }
    pg.pool().close().await;
}

const WRITES: u64 = 40;

/// With `relaxed_worker_writes`, a worker's store writes do not wait for the WAL flush (a
/// sequential writer then causes almost no flushes), while the API's writes, and every write
/// without the option, still do (one flush each). A private cluster, so that no other client's
/// commits count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_worker_writes_skip_the_wal_flush_and_api_writes_do_not() {
    let cluster = Cluster::create().await;
    let connect = |relaxed: bool| {
        let config = PgConfig::new(cluster.url())
            .notifications(false)
            .max_connections(1)
            .relaxed_worker_writes(relaxed);
        async move { PgBackend::connect(config).await.unwrap() }
    };
    // Migrations first, so that they do not count.
    let pg = connect(false).await;
    pg.pool().close().await;
    let start = wal_syncs(&cluster).await;

    sequential_writes(connect(false).await, true).await;
    let durable = wal_syncs(&cluster).await;
    sequential_writes(connect(true).await, true).await;
    let relaxed = wal_syncs(&cluster).await;
    sequential_writes(connect(true).await, false).await;
    let api = wal_syncs(&cluster).await;

    let (durable, relaxed, api) = (durable - start, relaxed - durable, api - relaxed);
    let writes = i64::try_from(WRITES).unwrap();
    assert!(
        durable >= writes,
        "durable worker writes: {durable} flushes"
    );
    assert!(
        relaxed < writes / 4,
        "relaxed worker writes: {relaxed} flushes"
    );
    assert!(
        api >= writes,
        "API writes with the option on: {api} flushes"
    );

    // The setting lasts for the relaxed statement's transaction only: the same (only) pooled
    // connection is back to the server's setting right after.
    use longjob_core::JobStore;
    let pg = connect(true).await;
    let store = pg.store();
    let mut job = longjob_core::Job::new("work", OWNER, serde_json::json!({}));
    store.insert(&job, Duration::from_secs(60)).await.unwrap();
    job.version = 1;
    job.start(1, chrono::Utc::now()).unwrap();
    store.update(&job).await.unwrap();
    let after: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(after, "on");
}
