//! Faults: a Redis restart in the middle of a run of jobs, and a worker dropped mid-job.
//!
//! The restart test runs its own `redis-server` (from `REDIS_SERVER`, else `redis-server` on the
//! `PATH`; `scripts/services/redis.sh` installs it) on a free port with AOF on, and kills it
//! with SIGKILL mid-run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use longjob_core::memory::MemoryBlobStore;
use longjob_core::signing::UrlSigner;
use longjob_core::{
    JobId, JobState, LongJob, LongJobConfig, RetryPolicy, SubmitRequest, WorkerConfig,
};
use longjob_redis::{Redis, RedisConfig};

const OWNER: &str = "fault-tester";

/// A private redis-server with AOF on, fsync on every write, so a SIGKILL loses nothing.
struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("lj-fault-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            port,
            dir,
            child: None,
        };
        redis.spawn();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(&binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {binary} ({e}): install it with scripts/services/redis.sh or set REDIS_SERVER")
            });
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{binary} did not listen on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn facade(redis: &Redis) -> LongJob {
    let mut config = LongJobConfig::default();
    config.retry = RetryPolicy {
        max_attempts: 10,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        jitter: true,
    };
    config.jobs_per_hour = None;
    LongJob::builder()
        .store(Arc::new(redis.store()))
        .queue(Arc::new(redis.queue()))
        .bus(Arc::new(redis.bus()))
        .blobs(Arc::new(MemoryBlobStore::new(UrlSigner::random(
            "http://test/files",
        ))))
        .config(config)
        .build()
}

fn worker_config(concurrency: usize, lease: Duration) -> WorkerConfig {
    let mut c = WorkerConfig::default();
    c.concurrency = concurrency;
    c.lease_ttl = lease;
    c.heartbeat_interval = lease / 4;
    c.claim_wait = Duration::from_secs(1);
    c.purge_interval = None;
    c
}

async fn submit_all(lj: &LongJob, n: usize) -> Vec<JobId> {
    let requests = (0..n)
        .map(|i| SubmitRequest::new("work", OWNER, serde_json::json!({ "i": i })))
        .collect();
    lj.submit_batch(requests)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect()
}

async fn states(lj: &LongJob, ids: &[JobId]) -> HashMap<JobState, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        if let Ok(job) = lj.status(*id, OWNER).await {
            *counts.entry(job.state).or_default() += 1;
        }
    }
    counts
}

/// The `completed` events of a job in its event list.
async fn completed_events(url: &str, prefix: &str, id: JobId) -> usize {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{{{prefix}}}:evl:{id}"))
        .arg(1)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    entries
        .iter()
        .filter(|e| e.contains("\"type\":\"completed\""))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run_completes_every_job_exactly_once() {
    const JOBS: usize = 300;
    let mut server = PrivateRedis::start();
    let config = RedisConfig::new(server.url())
        .prefix("lj-fault")
        .call_timeout(Duration::from_secs(2));
    let redis = common::connect(config).await;
    let lj = facade(&redis);
    let ids = submit_all(&lj, JOBS).await;

    let runs = Arc::new(Mutex::new(HashMap::<JobId, u32>::new()));
    let seen = Arc::clone(&runs);
    let worker = lj
        .worker()
        .config(worker_config(20, Duration::from_secs(3)))
        .handle("work", move |ctx, _: serde_json::Value| {
            let seen = Arc::clone(&seen);
            async move {
                for step in 1..=4 {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    ctx.progress(step, 4).await;
                }
                *seen.lock().unwrap().entry(ctx.job_id()).or_default() += 1;
                Ok(None)
            }
        })
        .start();

    // Let about a third of the jobs finish, then kill Redis and bring it back from its AOF.
    let started = Instant::now();
    loop {
        let done = runs.lock().unwrap().len();
        if done >= JOBS / 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {done} jobs ran before the restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.spawn();
    eprintln!("redis restarted after {:?}", started.elapsed());

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let counts = states(&lj, &ids).await;
        if counts.get(&JobState::Completed) == Some(&JOBS) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every job completed: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.shutdown(Duration::from_secs(5)).await;

    // Completed exactly once: the store holds it completed (a compare-and-set transition that
    // cannot happen twice) and its event log tells it once. The runtime retries an outcome event
    // that met a transient error; when Redis died after running the publish but before
    // answering, the retry finds the job's end told already and adds nothing. A handler may
    // run again (its lease ran out during the outage): that is counted, not refused.
    let mut rerun = 0;
    for id in &ids {
        let completions = completed_events(&server.url(), "lj-fault", *id).await;
        assert_eq!(
            completions, 1,
            "job {id} has {completions} completed events"
        );
        rerun += runs.lock().unwrap().get(id).map_or(0, |n| n - 1);
    }
    let stats = longjob_core::Queue::stats(lj.queue().as_ref())
        .await
        .unwrap();
    assert_eq!(
        (stats.ready, stats.delayed, stats.leased),
        (0, 0, 0),
        "{stats:?}"
    );
    eprintln!(
        "{JOBS} jobs completed once each across a Redis restart; {rerun} handler runs were \
         repeated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_dropped_worker_are_finished_by_another_after_the_lease() {
    const JOBS: usize = 20;
    let lease = Duration::from_millis(1500);
    let redis = common::fresh().await;
    let lj = facade(&redis);
    let ids = submit_all(&lj, JOBS).await;

    // The first worker takes every job and hangs in it.
    let first = lj
        .worker()
        .config(worker_config(JOBS, lease))
        .handle("work", |_ctx, _: serde_json::Value| async move {
            std::future::pending::<()>().await;
            Ok(None)
        })
        .start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while states(&lj, &ids).await.get(&JobState::Running) != Some(&JOBS) {
        assert!(
            Instant::now() < deadline,
            "the first worker did not start every job"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Killed: dropped without ack, release or heartbeat.
    drop(first);
    let dropped = Instant::now();

    let second = lj
        .worker()
        .config(worker_config(JOBS, lease))
        .handle("work", |_ctx, _: serde_json::Value| async move { Ok(None) })
        .start();
    for id in &ids {
        let job = tokio::time::timeout(Duration::from_secs(30), lj.wait_finished(*id, OWNER))
            .await
            .expect("job not finished by the second worker")
            .unwrap();
        assert_eq!(job.state, JobState::Completed);
        assert_eq!(job.attempt, 2, "the second worker's attempt");
    }
    let took = dropped.elapsed();
    assert!(
        took >= lease / 2,
        "finished after {took:?}, before the lease could expire"
    );
    eprintln!("{JOBS} jobs of a dropped worker finished by another {took:?} after the drop");
    second.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_and_waiting_claims_survive_a_redis_restart() {
    use futures::StreamExt;
    use longjob_core::{EventPayload, ProgressBus, Queue};

    let mut server = PrivateRedis::start();
    let config = RedisConfig::new(server.url())
        .prefix("lj-fault-bus")
        .call_timeout(Duration::from_secs(2));
    let redis = common::connect(config).await;
    let (bus, queue) = (redis.bus(), redis.queue());
    let job = JobId::new();
    let mut stream = bus.subscribe(job, 0).await.unwrap();
    let filler = || EventPayload::Progress {
        progress: Default::default(),
    };
    for _ in 0..3 {
        bus.publish(job, filler()).await.unwrap();
    }
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.spawn();
    // Publish again once Redis answers (the first calls may meet the restart).
    let mut published = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while published < 3 {
        assert!(Instant::now() < deadline, "Redis did not come back");
        match bus.publish(job, filler()).await {
            Ok(_) => published += 1,
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut seqs = Vec::new();
    while seqs.len() < 6 {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("events after the restart")
            .expect("the stream goes on");
        match event {
            Ok(event) => seqs.push(event.seq),
            Err(e) => assert!(e.is_transient(), "{e}"),
        }
    }
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);

    // A claim waiting after the restart is woken by a push (the subscriber connection is back).
    let id = JobId::new();
    let started = Instant::now();
    let (leases, ()) = tokio::join!(
        async {
            queue
                .claim(1, Duration::from_secs(30), Duration::from_secs(20))
                .await
                .unwrap()
        },
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            queue.push(id, Duration::ZERO).await.unwrap();
        }
    );
    assert_eq!(leases.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}
