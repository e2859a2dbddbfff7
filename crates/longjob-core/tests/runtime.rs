//! The worker runtime, on the in-memory backends, under tokio's paused clock where time matters.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use longjob_core::blob::{PutOptions, byte_stream};
use longjob_core::memory::{MemoryBlobStore, MemoryJobStore, MemoryProgressBus, MemoryQueue};
use longjob_core::queue::QueueStats;
use longjob_core::signing::UrlSigner;
use longjob_core::store::{Inserted, OwnerCounts, OwnerQuota, QuotaHit};
use longjob_core::{
    BackendError, BackendResult, ErrorKind, EventPayload, Job, JobError, JobId, JobResult,
    JobState, JobStore, Lease, LongJob, LongJobConfig, Queue, RetryPolicy, SubmitRequest,
    WorkerConfig,
};
use tokio::time::Instant;

const OWNER: &str = "alice";

fn config(max_attempts: u32) -> LongJobConfig {
    let mut config = LongJobConfig::default();
    config.retry = RetryPolicy {
        max_attempts,
        base_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(60),
        jitter: false,
    };
    config.jobs_per_hour = None;
    config
}

fn facade(config: LongJobConfig) -> LongJob {
    LongJob::builder()
        .blobs(Arc::new(MemoryBlobStore::new(UrlSigner::random(
            "http://test/files",
        ))))
        .config(config)
        .build()
}

fn worker_config() -> WorkerConfig {
    let mut c = WorkerConfig::default();
    c.concurrency = 4;
    c.lease_ttl = Duration::from_secs(10);
    c.heartbeat_interval = Duration::from_secs(3);
    c.claim_wait = Duration::from_millis(500);
    c
}

async fn submit(lj: &LongJob, kind: &str, items: &[&str]) -> JobId {
    let request =
        SubmitRequest::new(kind, OWNER, serde_json::json!(null)).items(items.iter().copied());
    lj.submit(request).await.unwrap().job.id
}

async fn wait_state(lj: &LongJob, id: JobId, state: JobState) -> longjob_core::Job {
    for _ in 0..100_000 {
        let job = lj.status(id, OWNER).await.unwrap();
        if job.state == state {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job never reached {state}");
}

#[tokio::test(start_paused = true)]
async fn failed_attempts_follow_the_backoff_schedule() {
    let lj = facade(config(4));
    let starts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&starts);
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("flaky", move |ctx, _: serde_json::Value| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(Instant::now());
                if ctx.attempt() < 4 {
                    Err(JobError::network("connection reset"))
                } else {
                    Ok(None)
                }
            }
        })
        .start();
    let id = submit(&lj, "flaky", &[]).await;
    let job = wait_state(&lj, id, JobState::Completed).await;
    assert_eq!(job.attempt, 4);
    let starts = starts.lock().unwrap().clone();
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    // 1 s, 2 s, 4 s; a retry is claimed by a waiting worker within one claim wait.
    for (gap, expected) in gaps.iter().zip([1000u128, 2000, 4000]) {
        assert!(*gap >= expected && *gap <= expected + 600, "gaps {gaps:?}");
    }
    worker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn timeouts_are_retried_then_fail_after_max_attempts() {
    let mut cfg = config(3);
    cfg.timeouts.job = Duration::from_secs(5);
    let lj = facade(cfg);
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&attempts);
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("slow", move |_, _: serde_json::Value| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(None)
            }
        })
        .start();
    let started = Instant::now();
    let id = submit(&lj, "slow", &[]).await;
    let job = wait_state(&lj, id, JobState::Failed).await;
    assert_eq!(job.attempt, 3);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(job.error.as_ref().unwrap().kind, ErrorKind::Timeout);
    // Three timeouts of 5 s and backoffs of 1 s and 2 s.
    assert!(
        started.elapsed() >= Duration::from_secs(18),
        "{:?}",
        started.elapsed()
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn validation_errors_and_bad_input_are_not_retried() {
    let lj = facade(config(3));
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("strict", |_, n: u32| async move {
            if n == 0 {
                Err(JobError::validation("zero is not allowed"))
            } else {
                Ok(None)
            }
        })
        .start();
    let zero = lj
        .submit(SubmitRequest::new("strict", OWNER, serde_json::json!(0)))
        .await
        .unwrap()
        .job
        .id;
    let text = lj
        .submit(SubmitRequest::new("strict", OWNER, serde_json::json!("x")))
        .await
        .unwrap()
        .job
        .id;
    for id in [zero, text] {
        let job = wait_state(&lj, id, JobState::Failed).await;
        assert_eq!(job.attempt, 1);
        assert_eq!(job.error.unwrap().kind, ErrorKind::Validation);
    }
    worker.shutdown(Duration::from_secs(1)).await;
}

/// Worker A stalls (no heartbeat) past its lease; worker B takes the job over and completes it;
/// A's late completion is rejected and its result discarded.
#[tokio::test(start_paused = true)]
async fn a_stalled_workers_job_is_finished_by_another_and_its_late_write_rejected() {
    let lj = facade(config(3));
    let release_a = Arc::new(tokio::sync::Notify::new());
    let a_started = Arc::new(tokio::sync::Notify::new());
    let mut stalled = worker_config();
    stalled.lease_ttl = Duration::from_secs(2);
    stalled.heartbeat_interval = Duration::from_secs(3600);
    // Its one slot stays busy with the stalled handler, so it cannot claim the job back.
    stalled.concurrency = 1;
    let (release, started) = (Arc::clone(&release_a), Arc::clone(&a_started));
    let worker_a = lj
        .worker()
        .config(stalled)
        .handle("export", move |ctx, _: serde_json::Value| {
            let (release, started) = (Arc::clone(&release), Arc::clone(&started));
            async move {
                started.notify_one();
                release.notified().await;
                let meta = ctx
                    .blobs()
                    .put(
                        "results/a.zip",
                        byte_stream(&b"from a"[..]),
                        PutOptions::default(),
                    )
                    .await
                    .map_err(|e| JobError::storage(e.to_string()))?;
                Ok(Some(JobResult {
                    blob_key: meta.key,
                    size: meta.size,
                    file_name: "a.zip".into(),
                    content_type: None,
                }))
            }
        })
        .start();
    let id = submit(&lj, "export", &[]).await;
    a_started.notified().await;
    // Written once the handler outlasts the start's hold.
    let running = wait_state(&lj, id, JobState::Running).await;
    assert_eq!(running.attempt, 1);

    let worker_b = lj
        .worker()
        .config(worker_config())
        .handle("export", |ctx, _: serde_json::Value| async move {
            let meta = ctx
                .blobs()
                .put(
                    "results/b.zip",
                    byte_stream(&b"from b"[..]),
                    PutOptions::default(),
                )
                .await
                .map_err(|e| JobError::storage(e.to_string()))?;
            Ok(Some(JobResult {
                blob_key: meta.key,
                size: meta.size,
                file_name: "b.zip".into(),
                content_type: None,
            }))
        })
        .start();
    let done = wait_state(&lj, id, JobState::Completed).await;
    assert_eq!(done.attempt, 2, "B's takeover is the second attempt");
    assert_eq!(done.result.as_ref().unwrap().blob_key, "results/b.zip");

    release_a.notify_one();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = lj.status(id, OWNER).await.unwrap();
    assert_eq!(
        after.result.unwrap().blob_key,
        "results/b.zip",
        "A's late write landed"
    );
    assert_eq!(
        after.version, done.version,
        "A wrote the job after losing its lease"
    );
    assert!(
        lj.blobs().head("results/a.zip").await.unwrap().is_none(),
        "A's unwanted result is deleted"
    );
    worker_a.shutdown(Duration::from_secs(1)).await;
    worker_b.shutdown(Duration::from_secs(1)).await;
}

/// A worker that dies mid-job (dropped, no ack) loses nothing: after the lease, another finishes.
#[tokio::test(start_paused = true)]
async fn a_crashed_workers_job_is_finished_by_another_after_the_lease() {
    let lj = facade(config(3));
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&started);
    let crashing = lj
        .worker()
        .config(worker_config())
        .handle("export", move |_, _: serde_json::Value| {
            let signal = Arc::clone(&signal);
            async move {
                // Past the start's hold: the attempt is in the store when the worker dies.
                tokio::time::sleep(Duration::from_secs(1)).await;
                signal.notify_one();
                std::future::pending::<()>().await;
                Ok(None)
            }
        })
        .start();
    let id = submit(&lj, "export", &["1", "2"]).await;
    started.notified().await;
    let running = lj.status(id, OWNER).await.unwrap();
    assert_eq!((running.state, running.attempt), (JobState::Running, 1));
    crashing.abort().await;
    let survivor = lj
        .worker()
        .config(worker_config())
        .handle("export", |ctx, _: serde_json::Value| async move {
            for item in ctx.pending_items() {
                ctx.item_completed(&item, 10).await;
            }
            Ok(None)
        })
        .start();
    let job = wait_state(&lj, id, JobState::Completed).await;
    assert_eq!(job.attempt, 2);
    assert_eq!(job.progress.current, 2);
    assert_eq!(lj.queue().stats().await.unwrap(), QueueStats::default());
    survivor.shutdown(Duration::from_secs(1)).await;
}

/// A job that brings its workers down within the start's hold (before its start is written)
/// still uses up its attempts: its next delivery, redelivered, records the start first, and a
/// worker lost on the last attempt fails the job. One attempt allowed: the first crash is not
/// counted, the second is, the third worker fails it.
#[tokio::test(start_paused = true)]
async fn a_job_that_keeps_crashing_its_workers_uses_up_its_attempts() {
    let lj = facade(config(1));
    let started = Arc::new(tokio::sync::Notify::new());
    let crashing_worker = || {
        let signal = Arc::clone(&started);
        let mut c = worker_config();
        c.start_hold = Duration::from_secs(60);
        lj.worker()
            .config(c)
            .handle("poison", move |_, _: serde_json::Value| {
                let signal = Arc::clone(&signal);
                async move {
                    signal.notify_one();
                    std::future::pending::<()>().await;
                    Ok(None)
                }
            })
            .start()
    };
    let id = submit(&lj, "poison", &["1"]).await;

    // Each crashing worker dies as soon as its handler starts; what the store shows then:
    let crash = || async {
        let worker = crashing_worker();
        started.notified().await;
        let job = lj.status(id, OWNER).await.unwrap();
        worker.abort().await;
        (job.state, job.attempt)
    };
    assert_eq!(
        crash().await,
        (JobState::Queued, 0),
        "within the hold the start is not written"
    );
    assert_eq!(
        crash().await,
        (JobState::Running, 1),
        "a redelivered job's start is written before it runs"
    );

    let third = crashing_worker();
    let failed = wait_state(&lj, id, JobState::Failed).await;
    assert_eq!(failed.attempt, 1);
    assert!(
        failed.error.unwrap().message.contains("lost"),
        "failed as lost on its last attempt"
    );
    third.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_job_of_a_kind_without_a_handler_here_waits_for_a_worker_that_has_one() {
    let lj = facade(config(3));
    let old = lj
        .worker()
        .config(worker_config())
        .handle("export", |_, _: serde_json::Value| async { Ok(None) })
        .start();
    let report = submit(&lj, "report", &["1"]).await;
    let export = submit(&lj, "export", &["1"]).await;
    wait_state(&lj, export, JobState::Completed).await;
    // Offered to the worker without its handler several times meanwhile: still untouched.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let waiting = lj.status(report, OWNER).await.unwrap();
    assert_eq!(waiting.state, JobState::Queued);
    assert_eq!(waiting.attempt, 0);
    // The rolling deploy ends: the old worker stops, one with the handler takes over.
    old.shutdown(Duration::from_secs(1)).await;
    let new = lj
        .worker()
        .config(worker_config())
        .handle("report", |_, _: serde_json::Value| async { Ok(None) })
        .start();
    let done = wait_state(&lj, report, JobState::Completed).await;
    assert_eq!(done.attempt, 1);
    new.shutdown(Duration::from_secs(1)).await;
}

/// A log sink for one test: what the subscriber wrote, as text.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_kind_without_a_handler_is_warned_about_once_not_at_every_offer() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    // tracing caches each callsite's interest for the whole process, and while at most one
    // dispatcher is registered it asks only the registering thread's subscriber: a sibling test
    // reaching the same warning first, with none, would switch it off here too. With a second
    // dispatcher registered, every registration asks all of them, this test's included.
    let _anchor = tracing::Dispatch::new(
        tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .finish(),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    let lj = facade(config(3));
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("export", |_, _: serde_json::Value| async { Ok(None) })
        .start();
    for _ in 0..3 {
        submit(&lj, "report", &["1"]).await;
    }
    // Each job is offered every 5 s: about 18 offers in 30 s.
    tokio::time::sleep(Duration::from_secs(30)).await;
    worker.shutdown(Duration::from_secs(1)).await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("no handler for this kind").count(),
        1,
        "{text}"
    );
    assert!(text.contains("report"), "{text}");
}

struct SetOnDrop(Arc<AtomicBool>);
impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A cancel accepted by one facade (another API process) stops the handler a worker of another
/// facade runs, through the shared backends, within a second.
#[tokio::test(start_paused = true)]
async fn cancelling_a_running_job_stops_its_handler() {
    let store = Arc::new(MemoryJobStore::new());
    let queue = Arc::new(MemoryQueue::new());
    let bus = Arc::new(MemoryProgressBus::default());
    let blobs = Arc::new(MemoryBlobStore::new(UrlSigner::random("http://test/files")));
    let process = || {
        LongJob::builder()
            .store(store.clone())
            .queue(queue.clone())
            .bus(bus.clone())
            .blobs(blobs.clone())
            .config(config(3))
            .build()
    };
    let (api, workers) = (process(), process());
    let stopped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stopped);
    let worker = workers
        .worker()
        .config(worker_config())
        .handle("endless", move |ctx, _: serde_json::Value| {
            let guard = SetOnDrop(Arc::clone(&flag));
            async move {
                let _guard = guard;
                // Ignores the cancellation token on purpose: the runtime must stop it anyway.
                for i in 0.. {
                    ctx.progress(i, 1_000_000).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(None)
            }
        })
        .start();
    let id = submit(&api, "endless", &[]).await;
    wait_state(&api, id, JobState::Running).await;
    let cancelled_at = Instant::now();
    let job = api.cancel(id, OWNER).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    while !stopped.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        cancelled_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(worker.running(), 0);
    assert_eq!(
        api.status(id, OWNER).await.unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(
        queue.stats().await.unwrap(),
        QueueStats::default(),
        "the lease was acked"
    );
    assert!(matches!(
        api.cancel(id, OWNER).await,
        Err(longjob_core::LongJobError::InvalidState { .. })
    ));
    worker.shutdown(Duration::from_secs(1)).await;
}

/// What a test sees of the handler of [`held_worker`].
#[derive(Default)]
struct HeldRuns {
    /// Notified when the first run starts.
    started: tokio::sync::Notify,
    /// Set when the first run has ended (stopped, its future dropped or returned).
    stopped: Arc<AtomicBool>,
    runs: AtomicU32,
}

impl HeldRuns {
    async fn wait_stopped(&self) {
        let stopped = async {
            while !self.stopped.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(600), stopped)
            .await
            .expect("the first run was never stopped");
    }
}

/// A worker of `lj` whose starts are held for `hold`, with a `work` handler whose first run
/// waits until the runtime stops it (on its cancellation) and whose later runs return at once.
fn held_worker(lj: &LongJob, hold: Duration) -> (longjob_core::WorkerHandle, Arc<HeldRuns>) {
    let probe = Arc::new(HeldRuns::default());
    let mut config = worker_config();
    config.start_hold = hold;
    let seen = Arc::clone(&probe);
    let worker = lj
        .worker()
        .config(config)
        .handle("work", move |ctx, _: serde_json::Value| {
            let seen = Arc::clone(&seen);
            async move {
                if seen.runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    let _stopped = SetOnDrop(Arc::clone(&seen.stopped));
                    seen.started.notify_one();
                    ctx.cancellation().cancelled().await;
                    // Returns a result despite the stop: the runtime must not count it.
                }
                Ok(None)
            }
        })
        .start();
    (worker, probe)
}

/// A job cancelled while its start is held (the store still shows it queued) is stopped like a
/// running one, and a result it returns anyway is not written.
#[tokio::test(start_paused = true)]
async fn a_job_cancelled_before_its_start_is_written_stays_cancelled() {
    let lj = facade(config(3));
    let (worker, held) = held_worker(&lj, Duration::from_secs(60));
    let id = submit(&lj, "work", &[]).await;
    held.started.notified().await;
    assert_eq!(lj.status(id, OWNER).await.unwrap().state, JobState::Queued);
    lj.cancel(id, OWNER).await.unwrap();
    held.wait_stopped().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let job = lj.status(id, OWNER).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Cancelled, 0));
    assert_eq!(worker.running(), 0);
    assert_eq!(
        lj.queue().stats().await.unwrap(),
        QueueStats::default(),
        "the lease was acked"
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

/// A cancel signal for a job its store does not show cancelled (a stale signal, say of an
/// earlier run) stops a handler whose start is still held, and the job is run again, not
/// dropped: its store still shows it queued.
#[tokio::test(start_paused = true)]
async fn a_stale_cancel_signal_within_the_hold_runs_the_job_again() {
    let lj = facade(config(3));
    let (worker, held) = held_worker(&lj, Duration::from_secs(60));
    let id = submit(&lj, "work", &[]).await;
    held.started.notified().await;
    lj.bus().signal_cancel(id).await.unwrap();
    let done = wait_state(&lj, id, JobState::Completed).await;
    assert_eq!(held.runs.load(Ordering::SeqCst), 2);
    assert_eq!(done.attempt, 1, "the stopped run is not counted");
    worker.shutdown(Duration::from_secs(1)).await;
}

/// A cancel whose signal never reaches the worker (here the API process has a bus of its own)
/// is seen by the start's write when the hold ends: the handler is stopped then, not at its end.
#[tokio::test(start_paused = true)]
async fn a_cancel_unsignalled_is_seen_by_the_held_starts_write() {
    let store = Arc::new(MemoryJobStore::new());
    let queue = Arc::new(MemoryQueue::new());
    let blobs = Arc::new(MemoryBlobStore::new(UrlSigner::random("http://test/files")));
    let process = || {
        LongJob::builder()
            .store(store.clone())
            .queue(queue.clone())
            .bus(Arc::new(MemoryProgressBus::default()))
            .blobs(blobs.clone())
            .config(config(3))
            .build()
    };
    let (api, workers) = (process(), process());
    let hold = Duration::from_secs(1);
    let (worker, held) = held_worker(&workers, hold);
    let id = submit(&api, "work", &[]).await;
    held.started.notified().await;
    let began = Instant::now();
    api.cancel(id, OWNER).await.unwrap();
    held.wait_stopped().await;
    let took = began.elapsed();
    assert!(
        took >= hold / 2 && took < hold * 2,
        "stopped after {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let job = api.status(id, OWNER).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Cancelled, 0));
    assert_eq!(queue.stats().await.unwrap(), QueueStats::default());
    worker.shutdown(Duration::from_secs(1)).await;
}

/// The in-memory store, with updates failing (as an outage would) while `down` is set.
#[derive(Debug, Default)]
struct FlakyStore {
    inner: MemoryJobStore,
    down: AtomicBool,
}

#[async_trait]
impl JobStore for FlakyStore {
    async fn insert(&self, job: &Job, ttl: Duration) -> BackendResult<Inserted> {
        self.inner.insert(job, ttl).await
    }
    async fn insert_within(
        &self,
        job: &Job,
        ttl: Duration,
        quota: &OwnerQuota,
    ) -> BackendResult<Result<Inserted, QuotaHit>> {
        self.inner.insert_within(job, ttl, quota).await
    }
    async fn get(&self, id: JobId) -> BackendResult<Option<Job>> {
        self.inner.get(id).await
    }
    async fn update(&self, job: &Job) -> BackendResult<Job> {
        if self.down.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable {
                backend: "store",
                message: "down for the test".into(),
                source: None,
            });
        }
        self.inner.update(job).await
    }
    async fn list_by_owner(&self, owner: &str, limit: usize) -> BackendResult<Vec<Job>> {
        self.inner.list_by_owner(owner, limit).await
    }
    async fn find_by_idempotency_key(&self, owner: &str, key: &str) -> BackendResult<Option<Job>> {
        self.inner.find_by_idempotency_key(owner, key).await
    }
    async fn count_by_owner(
        &self,
        owner: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> BackendResult<OwnerCounts> {
        self.inner.count_by_owner(owner, since).await
    }
    async fn purge_finished(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> BackendResult<Vec<Job>> {
        self.inner.purge_finished(before, limit).await
    }
    async fn health(&self) -> BackendResult<()> {
        self.inner.health().await
    }
}

/// A held start that cannot be written (the store is down past the lease's time) stops the
/// handler and leaves the job; it comes back after its lease, redelivered, and runs to its end,
/// the unrecorded run not counted as an attempt.
#[tokio::test(start_paused = true)]
async fn a_held_start_that_cannot_be_written_leaves_the_job_for_a_later_run() {
    let store = Arc::new(FlakyStore::default());
    let lj = LongJob::builder()
        .store(store.clone())
        .blobs(Arc::new(MemoryBlobStore::new(UrlSigner::random(
            "http://test/files",
        ))))
        .config(config(3))
        .build();
    let (worker, held) = held_worker(&lj, Duration::from_secs(1));
    let id = submit(&lj, "work", &[]).await;
    held.started.notified().await;
    store.down.store(true, Ordering::SeqCst);
    held.wait_stopped().await;
    assert_eq!(lj.status(id, OWNER).await.unwrap().state, JobState::Queued);
    store.down.store(false, Ordering::SeqCst);
    let done = wait_state(&lj, id, JobState::Completed).await;
    assert_eq!(held.runs.load(Ordering::SeqCst), 2);
    assert_eq!(done.attempt, 1, "the unrecorded run is not counted");
    worker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_running_jobs_finish_within_the_grace_period() {
    let lj = facade(config(3));
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("two-seconds", |_, _: serde_json::Value| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(None)
        })
        .start();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&lj, "two-seconds", &[]).await);
    }
    for id in &ids {
        wait_state(&lj, *id, JobState::Running).await;
    }
    worker.shutdown(Duration::from_secs(10)).await;
    for id in ids {
        assert_eq!(
            lj.status(id, OWNER).await.unwrap().state,
            JobState::Completed
        );
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_past_the_grace_period_releases_jobs_without_counting_the_attempt() {
    let lj = facade(config(3));
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("long", |_, _: serde_json::Value| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(None)
        })
        .start();
    let id = submit(&lj, "long", &[]).await;
    wait_state(&lj, id, JobState::Running).await;
    worker.shutdown(Duration::from_secs(1)).await;
    let released = lj.status(id, OWNER).await.unwrap();
    assert_eq!(released.state, JobState::Retrying);
    assert_eq!(
        released.attempt, 0,
        "the interrupted attempt is not counted"
    );
    assert_eq!(lj.queue().stats().await.unwrap().ready, 1);
    let next = lj
        .worker()
        .config(worker_config())
        .handle("long", |_, _: serde_json::Value| async { Ok(None) })
        .start();
    let done = wait_state(&lj, id, JobState::Completed).await;
    assert_eq!(done.attempt, 1);
    next.shutdown(Duration::from_secs(1)).await;
}

/// A failed item makes the attempt fail; the retry (automatic, then manual) redoes only it.
#[tokio::test(start_paused = true)]
async fn a_retry_redoes_only_the_items_that_did_not_complete() {
    let lj = facade(config(2));
    let processed = Arc::new(Mutex::new(Vec::<(u32, String)>::new()));
    let log = Arc::clone(&processed);
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("files", move |ctx, _: serde_json::Value| {
            let log = Arc::clone(&log);
            async move {
                let mut failed = false;
                for item in ctx.pending_items() {
                    log.lock().unwrap().push((ctx.attempt(), item.clone()));
                    // "b" fails on attempts 1 and 2, succeeds on the third (after a manual retry).
                    if item == "b" && ctx.attempt() < 3 {
                        ctx.item_failed(&item, "source unreachable").await;
                        failed = true;
                    } else if item == "c" {
                        ctx.item_skipped(&item, "not available").await;
                    } else {
                        ctx.item_completed(&item, 100).await;
                    }
                }
                if failed {
                    Err(JobError::network("some files failed"))
                } else {
                    Ok(None)
                }
            }
        })
        .start();
    let id = submit(&lj, "files", &["a", "b", "c"]).await;
    let failed = wait_state(&lj, id, JobState::Failed).await;
    assert_eq!(failed.attempt, 2);
    assert_eq!(
        failed.progress.current, 3,
        "a finished job shows every item processed"
    );
    let retried = lj.retry(id, OWNER).await.unwrap();
    assert_eq!(retried.state, JobState::Queued);
    let done = wait_state(&lj, id, JobState::Completed).await;
    assert_eq!(done.attempt, 3);
    let log = processed.lock().unwrap().clone();
    let of = |attempt: u32| {
        log.iter()
            .filter(|(a, _)| *a == attempt)
            .map(|(_, i)| i.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(of(1), ["a", "b", "c"]);
    assert_eq!(of(2), ["b"]);
    assert_eq!(of(3), ["b"]);
    assert_eq!(done.progress.bytes_done, 200);
    worker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn progress_events_are_rate_limited_and_the_final_state_is_published() {
    let lj = facade(config(1));
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("tight", |ctx, _: serde_json::Value| async move {
            for i in 1..=10_000 {
                ctx.progress(i, 10_000).await;
            }
            Ok(None)
        })
        .start();
    let id = submit(&lj, "tight", &[]).await;
    let (_, mut events) = lj.subscribe(id, OWNER, 0).await.unwrap();
    let mut types = Vec::new();
    let mut statuses = Vec::new();
    let mut last_progress = None;
    while let Some(Ok(event)) = events.next().await {
        types.push(event.payload.type_name());
        if let EventPayload::Status { status, .. } = &event.payload {
            statuses.push(*status);
        }
        if let EventPayload::Progress { progress } = &event.payload {
            last_progress = Some(progress.current);
        }
        if event.is_terminal() {
            break;
        }
    }
    let progress_events = types.iter().filter(|t| **t == "progress").count();
    // The first report, and the last one the rate limit held back.
    assert_eq!(progress_events, 2, "{types:?}");
    // The `processing` event, sent while the handler starts, still comes before its progress.
    assert_eq!(
        types,
        ["status", "status", "progress", "progress", "completed"]
    );
    assert_eq!(statuses, [JobState::Queued, JobState::Running]);
    assert_eq!(
        last_progress,
        Some(10_000),
        "the last report must reach subscribers"
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

/// Counts the queue calls of a wrapped queue: a decorator, as any backend can be wrapped.
#[derive(Debug)]
struct CountingQueue {
    inner: MemoryQueue,
    extend_calls: AtomicUsize,
    largest_extend: AtomicUsize,
    /// The size of each claim that leased something.
    claims: Mutex<Vec<usize>>,
    requeues: AtomicUsize,
    /// Acks wait while this holds false, as acks on a slow backend would.
    acks_open: tokio::sync::watch::Sender<bool>,
}

impl CountingQueue {
    fn new() -> Self {
        Self {
            inner: MemoryQueue::new(),
            extend_calls: AtomicUsize::new(0),
            largest_extend: AtomicUsize::new(0),
            claims: Mutex::new(Vec::new()),
            requeues: AtomicUsize::new(0),
            acks_open: tokio::sync::watch::Sender::new(true),
        }
    }
}

/// A facade over a fresh counting queue (one attempt a job); acks wait while `acks_open` is
/// false, until the test opens them.
fn on_counting_queue(acks_open: bool) -> (Arc<CountingQueue>, LongJob) {
    let queue = Arc::new(CountingQueue::new());
    queue.acks_open.send_replace(acks_open);
    let lj = LongJob::builder()
        .queue(queue.clone())
        .config(config(1))
        .build();
    (queue, lj)
}

#[async_trait]
impl Queue for CountingQueue {
    async fn push(&self, job: JobId, delay: Duration) -> BackendResult<()> {
        self.inner.push(job, delay).await
    }
    async fn claim(&self, max: usize, ttl: Duration, wait: Duration) -> BackendResult<Vec<Lease>> {
        let leases = self.inner.claim(max, ttl, wait).await?;
        if !leases.is_empty() {
            self.claims.lock().unwrap().push(leases.len());
        }
        Ok(leases)
    }
    async fn extend(&self, leases: &[Lease], ttl: Duration) -> BackendResult<Vec<bool>> {
        self.extend_calls.fetch_add(1, Ordering::SeqCst);
        self.largest_extend
            .fetch_max(leases.len(), Ordering::SeqCst);
        self.inner.extend(leases, ttl).await
    }
    async fn ack(&self, lease: &Lease) -> BackendResult<bool> {
        let _ = self.acks_open.subscribe().wait_for(|open| *open).await;
        self.inner.ack(lease).await
    }
    async fn requeue(&self, lease: &Lease, delay: Duration) -> BackendResult<bool> {
        self.requeues.fetch_add(1, Ordering::SeqCst);
        self.inner.requeue(lease, delay).await
    }
    async fn stats(&self) -> BackendResult<QueueStats> {
        self.inner.stats().await
    }
    async fn health(&self) -> BackendResult<()> {
        self.inner.health().await
    }
}

/// A job's slot is free once its handler returns: while its outcome is still being written
/// (here, an ack that does not answer), the next job runs. Jobs finishing are bounded too, at
/// four per slot: with one slot (and none claimed ahead), four jobs finish while a fifth, its
/// handler returned, waits to finish, and a sixth is not claimed.
#[tokio::test(start_paused = true)]
async fn the_next_job_starts_while_the_last_ones_outcome_is_written() {
    let (queue, lj) = on_counting_queue(false);
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(submit(&lj, "quick", &[]).await);
    }
    let mut cfg = worker_config();
    cfg.concurrency = 1;
    cfg.prefetch = Some(0);
    let started = Arc::new(AtomicUsize::new(0));
    let worker = lj
        .worker()
        .config(cfg)
        .handle("quick", {
            let started = Arc::clone(&started);
            move |_, _: serde_json::Value| {
                started.fetch_add(1, Ordering::SeqCst);
                async { Ok(None) }
            }
        })
        .start();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        5,
        "the next job waits for the earlier ones' acks, or a sixth one ran past the bound"
    );
    assert_eq!(worker.running(), 5);
    queue.acks_open.send_replace(true);
    for id in &ids {
        wait_state(&lj, *id, JobState::Completed).await;
    }
    assert_eq!(started.load(Ordering::SeqCst), 6);
    worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(lj.queue().stats().await.unwrap(), QueueStats::default());
}

/// A facade over a fresh counting queue and a store whose reads take a remote store's time
/// (1 ms of tokio's clock): claiming ahead hides such reads, not an in-process store's.
fn on_remote_store() -> (Arc<CountingQueue>, LongJob) {
    let queue = Arc::new(CountingQueue::new());
    let store = TestStore {
        read_delay: Duration::from_millis(1),
        ..TestStore::default()
    };
    let lj = LongJob::builder()
        .store(Arc::new(store))
        .queue(queue.clone())
        .config(config(1))
        .build();
    (queue, lj)
}

/// Runs a worker of one slot on `lj` whose `quick` jobs return at once and whose `slow` ones
/// take 10 s. Returns it and the most handlers it ran at once (counted as they start).
fn one_slot_worker(
    lj: &LongJob,
    cfg: WorkerConfig,
) -> (longjob_core::WorkerHandle, Arc<AtomicUsize>) {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let handler = |pause: Duration| {
        let running = Arc::clone(&running);
        let peak = Arc::clone(&peak);
        move |_, _: serde_json::Value| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let running = Arc::clone(&running);
            async move {
                tokio::time::sleep(pause).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(None)
            }
        }
    };
    let mut cfg = cfg;
    cfg.concurrency = 1;
    let worker = lj
        .worker()
        .config(cfg)
        .handle("quick", handler(Duration::from_millis(1)))
        .handle("slow", handler(Duration::from_secs(10)))
        .start();
    (worker, peak)
}

/// On a worker from [`one_slot_worker`]: runs three quick jobs one at a time (so its handlers
/// look short), then a slow one, and submits a quick job while the slow one runs. Returns the
/// slow job and the quick one, 20 ms after the quick one was submitted.
async fn a_quick_job_behind_a_slow_one(lj: &LongJob) -> (JobId, JobId) {
    for _ in 0..3 {
        let id = submit(lj, "quick", &[]).await;
        wait_state(lj, id, JobState::Completed).await;
    }
    let slow = submit(lj, "slow", &[]).await;
    wait_state(lj, slow, JobState::Running).await;
    let waiting = submit(lj, "quick", &[]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    (slow, waiting)
}

/// While handlers are short, jobs are claimed ahead of free slots (more leases held than
/// handlers run), never more handlers at once than the concurrency, and no job goes back.
#[tokio::test(start_paused = true)]
async fn jobs_are_claimed_ahead_while_handlers_are_short() {
    let (queue, lj) = on_remote_store();
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(submit(&lj, "quick", &[]).await);
    }
    let (worker, peak) = one_slot_worker(&lj, worker_config());
    let mut most_held = 0;
    while lj.store().get(ids[39]).await.unwrap().unwrap().state != JobState::Completed {
        most_held = most_held.max(worker.running());
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    for id in &ids {
        let job = wait_state(&lj, *id, JobState::Completed).await;
        assert_eq!(job.attempt, 1);
    }
    assert_eq!(peak.load(Ordering::SeqCst), 1, "more handlers than slots");
    assert!(
        most_held >= 2,
        "no job was claimed ahead (most held {most_held})"
    );
    assert_eq!(queue.requeues.load(Ordering::SeqCst), 0);
    worker.shutdown(Duration::from_secs(1)).await;
}

/// When handlers turn slow, a job claimed ahead goes back to the queue after `prefetch_wait`
/// (no attempt counted) and another worker runs it; while the handlers stay slow the first
/// worker does not claim it (or any other) ahead again, so nothing churns.
#[tokio::test(start_paused = true)]
async fn a_job_claimed_ahead_of_a_slow_handler_goes_back_to_the_queue() {
    let (queue, lj) = on_remote_store();
    let mut cfg = worker_config();
    cfg.claim_gather = Duration::ZERO;
    let (first, _) = one_slot_worker(&lj, cfg.clone());
    let (slow, waiting) = a_quick_job_behind_a_slow_one(&lj).await;
    assert_eq!(first.running(), 2, "the quick job was not claimed ahead");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(queue.requeues.load(Ordering::SeqCst), 1, "jobs churn");
    assert_eq!(first.running(), 1, "a job is held ahead of the slow one");
    assert_eq!(lj.queue().stats().await.unwrap().ready, 1);
    let (second, _) = one_slot_worker(&lj, cfg);
    let job = wait_state(&lj, waiting, JobState::Completed).await;
    assert_eq!(job.attempt, 1, "going back counted an attempt");
    assert_eq!(
        lj.store().get(slow).await.unwrap().unwrap().state,
        JobState::Running,
        "the quick job waited for the slow one"
    );
    second.shutdown(Duration::from_secs(1)).await;
    first.shutdown(Duration::from_secs(20)).await;
    wait_state(&lj, slow, JobState::Completed).await;
}

/// Reads from an in-process store are not worth hiding: however short the handlers, nothing
/// is claimed ahead of them.
#[tokio::test(start_paused = true)]
async fn nothing_is_claimed_ahead_of_an_in_process_store() {
    let (queue, lj) = on_counting_queue(true);
    let (worker, _) = one_slot_worker(&lj, worker_config());
    let (_, waiting) = a_quick_job_behind_a_slow_one(&lj).await;
    assert_eq!(worker.running(), 1, "a job was claimed ahead");
    assert_eq!(lj.queue().stats().await.unwrap().ready, 1);
    wait_state(&lj, waiting, JobState::Completed).await;
    assert_eq!(queue.requeues.load(Ordering::SeqCst), 0);
    worker.shutdown(Duration::from_secs(1)).await;
}

/// A graceful shutdown gives a job claimed ahead back at once, its attempt not counted.
#[tokio::test(start_paused = true)]
async fn shutdown_gives_back_a_job_claimed_ahead() {
    let (_queue, lj) = on_remote_store();
    let mut cfg = worker_config();
    cfg.prefetch_wait = Duration::from_secs(60);
    let (worker, _) = one_slot_worker(&lj, cfg);
    let (slow, waiting) = a_quick_job_behind_a_slow_one(&lj).await;
    assert_eq!(worker.running(), 2, "the quick job was not claimed ahead");
    worker.shutdown(Duration::from_secs(30)).await;
    wait_state(&lj, slow, JobState::Completed).await;
    let job = lj.store().get(waiting).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Queued, 0));
    assert_eq!(lj.queue().stats().await.unwrap().ready, 1);
}

/// A graceful shutdown waits for the outcomes still being written (here, an ack that has not
/// answered yet), past the grace period too: the job is completed and acked, not left to its
/// lease's expiry.
#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_outcomes_being_written() {
    let (queue, lj) = on_counting_queue(false);
    let id = submit(&lj, "quick", &[]).await;
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("quick", |_, _: serde_json::Value| async { Ok(None) })
        .start();
    wait_state(&lj, id, JobState::Completed).await;
    let opener = tokio::spawn({
        let queue = Arc::clone(&queue);
        async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            queue.acks_open.send_replace(true);
        }
    });
    let started = Instant::now();
    worker.shutdown(Duration::from_secs(1)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "shutdown returned before the ack was written"
    );
    opener.await.unwrap();
    assert_eq!(lj.queue().stats().await.unwrap(), QueueStats::default());
}

/// Slots freed a few milliseconds apart are claimed together (one claim, and one batch for each
/// later step), and with no gathering each is claimed on its own.
#[tokio::test(start_paused = true)]
async fn slots_freed_together_are_claimed_together() {
    for (gather, expected) in [
        (Duration::from_millis(5), vec![8, 8]),
        (Duration::ZERO, vec![8, 2, 2, 2, 2]),
    ] {
        let (queue, lj) = on_counting_queue(true);
        let mut ids = Vec::new();
        for _ in 0..16 {
            ids.push(submit(&lj, "staggered", &[]).await);
        }
        let mut cfg = worker_config();
        cfg.concurrency = 8;
        cfg.claim_gather = gather;
        let started = AtomicUsize::new(0);
        let started = Arc::new(started);
        let worker = lj
            .worker()
            .config(cfg)
            .handle("staggered", move |_, _: serde_json::Value| {
                // Two jobs end at each of four instants a millisecond apart.
                let n = started.fetch_add(1, Ordering::SeqCst) as u64;
                async move {
                    tokio::time::sleep(Duration::from_millis(1000 + n % 4)).await;
                    Ok(None)
                }
            })
            .start();
        for id in &ids {
            wait_state(&lj, *id, JobState::Completed).await;
        }
        assert_eq!(*queue.claims.lock().unwrap(), expected, "gather {gather:?}");
        worker.shutdown(Duration::from_secs(1)).await;
    }
}

/// Twenty jobs that outlive their lease several times: one extend call per heartbeat carries all
/// twenty leases, and no lease is lost.
#[tokio::test(start_paused = true)]
async fn one_extend_call_per_heartbeat_keeps_every_lease() {
    let (queue, lj) = on_counting_queue(true);
    let mut cfg = worker_config();
    cfg.concurrency = 20;
    let worker = lj
        .worker()
        .config(cfg)
        .handle("long", |_, _: serde_json::Value| async {
            tokio::time::sleep(Duration::from_secs(35)).await;
            Ok(None)
        })
        .start();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(submit(&lj, "long", &[]).await);
    }
    for id in &ids {
        let job = wait_state(&lj, *id, JobState::Completed).await;
        assert_eq!(job.attempt, 1, "a lease was lost and the job ran twice");
    }
    let calls = queue.extend_calls.load(Ordering::SeqCst);
    assert!(
        (10..=14).contains(&calls),
        "{calls} extend calls over ~35 s at a 3 s heartbeat"
    );
    assert_eq!(queue.largest_extend.load(Ordering::SeqCst), 20);
    worker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn completed_event_carries_a_working_download_url() {
    let lj = facade(config(1));
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("zip", |ctx, _: serde_json::Value| async move {
            let meta = ctx
                .blobs()
                .put(
                    "results/r.zip",
                    byte_stream(&b"PK..."[..]),
                    PutOptions::default(),
                )
                .await
                .map_err(|e| JobError::storage(e.to_string()))?;
            Ok(Some(JobResult {
                blob_key: meta.key,
                size: meta.size,
                file_name: "r.zip".into(),
                content_type: Some("application/zip".into()),
            }))
        })
        .start();
    let id = submit(&lj, "zip", &[]).await;
    let (_, mut events) = lj.subscribe(id, OWNER, 0).await.unwrap();
    let completed = loop {
        let event = events.next().await.unwrap().unwrap();
        if event.is_terminal() {
            break event;
        }
    };
    match completed.payload {
        EventPayload::Completed {
            download_url, size, ..
        } => {
            assert!(
                download_url
                    .unwrap()
                    .starts_with("http://test/files/results/r.zip?expires=")
            );
            assert_eq!(size, Some(5));
        }
        other => panic!("{other:?}"),
    }
    let url = lj.download_url(id, OWNER).await.unwrap();
    assert_eq!((url.size, url.file_name.as_str()), (5, "r.zip"));
    worker.shutdown(Duration::from_secs(1)).await;
}

/// A queue whose tokens went backwards (reset behind the store's back) fails the job loudly
/// instead of dropping it or looping on it.
#[tokio::test(start_paused = true)]
async fn a_fencing_token_older_than_the_jobs_fails_the_job_instead_of_losing_it() {
    let lj = facade(config(3));
    let mut job = longjob_core::Job::new("k", OWNER, serde_json::json!(null));
    job.lease_token = 1_000;
    lj.store().insert(&job, Duration::ZERO).await.unwrap();
    lj.queue().push(job.id, Duration::ZERO).await.unwrap();
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("k", |_, _: serde_json::Value| async { Ok(None) })
        .start();
    let failed = wait_state(&lj, job.id, JobState::Failed).await;
    assert!(failed.error.unwrap().message.contains("fencing token"));
    assert_eq!(lj.queue().stats().await.unwrap(), QueueStats::default());
    worker.shutdown(Duration::from_secs(1)).await;
}

/// The in-memory store, decorated as tests need: reads that take `read_delay` of tokio's clock
/// (a remote store's round trip), and with `lose_an_answer` the first completing write done
/// but its answer lost (a store that dies between writing and answering).
#[derive(Debug, Default)]
struct TestStore {
    inner: MemoryJobStore,
    read_delay: Duration,
    lose_an_answer: bool,
    lost: AtomicBool,
}

#[async_trait]
impl longjob_core::JobStore for TestStore {
    async fn insert(
        &self,
        job: &longjob_core::Job,
        ttl: Duration,
    ) -> BackendResult<longjob_core::store::Inserted> {
        self.inner.insert(job, ttl).await
    }
    async fn get(&self, id: JobId) -> BackendResult<Option<longjob_core::Job>> {
        if !self.read_delay.is_zero() {
            tokio::time::sleep(self.read_delay).await;
        }
        self.inner.get(id).await
    }
    async fn update(&self, job: &longjob_core::Job) -> BackendResult<longjob_core::Job> {
        let written = self.inner.update(job).await?;
        if self.lose_an_answer
            && job.state == JobState::Completed
            && !self.lost.swap(true, Ordering::SeqCst)
        {
            return Err(longjob_core::BackendError::Unavailable {
                backend: "test",
                message: "connection reset after the write".into(),
                source: None,
            });
        }
        Ok(written)
    }
    async fn list_by_owner(
        &self,
        owner: &str,
        limit: usize,
    ) -> BackendResult<Vec<longjob_core::Job>> {
        self.inner.list_by_owner(owner, limit).await
    }
    async fn find_by_idempotency_key(
        &self,
        owner: &str,
        key: &str,
    ) -> BackendResult<Option<longjob_core::Job>> {
        self.inner.find_by_idempotency_key(owner, key).await
    }
    async fn count_by_owner(
        &self,
        owner: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> BackendResult<longjob_core::store::OwnerCounts> {
        self.inner.count_by_owner(owner, since).await
    }
    async fn purge_finished(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> BackendResult<Vec<longjob_core::Job>> {
        self.inner.purge_finished(before, limit).await
    }
    async fn health(&self) -> BackendResult<()> {
        Ok(())
    }
}

/// The completing write lands but its answer is lost: the retry recognises its own write, so the
/// job completes once and its `completed` event is still published.
#[tokio::test(start_paused = true)]
async fn a_write_whose_answer_was_lost_is_recognised_and_the_outcome_still_announced() {
    let lj = LongJob::builder()
        .store(Arc::new(TestStore {
            lose_an_answer: true,
            ..TestStore::default()
        }))
        .config(config(3))
        .build();
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("k", |_, _: serde_json::Value| async { Ok(None) })
        .start();
    let id = submit(&lj, "k", &[]).await;
    let (_, mut events) = lj.subscribe(id, OWNER, 0).await.unwrap();
    let terminal = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let event = events.next().await.unwrap().unwrap();
            if event.is_terminal() {
                break event;
            }
        }
    })
    .await
    .expect("no terminal event was published");
    assert_eq!(terminal.payload.type_name(), "completed");
    let job = lj.status(id, OWNER).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 1));
    assert_eq!(lj.queue().stats().await.unwrap(), QueueStats::default());
    worker.shutdown(Duration::from_secs(1)).await;
}

/// An in-memory bus, slowed down: the `processing` event takes 200 ms, and progress events wait
/// while `progress_open` holds false. Counts the calls of `publish`, those of `publish_many`
/// (`progress_calls`, with the `publish` calls of progress events), and those that carry an
/// outcome; with `lose_outcome_reply`, the first outcome is published but its caller gets a
/// timeout, as when a reply is lost.
#[derive(Debug)]
struct SlowBus {
    inner: MemoryProgressBus,
    progress_open: tokio::sync::watch::Sender<bool>,
    single_calls: AtomicUsize,
    progress_calls: AtomicUsize,
    lose_outcome_reply: AtomicBool,
    outcome_calls: AtomicUsize,
}

impl SlowBus {
    fn new(progress_open: bool) -> Self {
        Self {
            inner: MemoryProgressBus::default(),
            progress_open: tokio::sync::watch::Sender::new(progress_open),
            single_calls: AtomicUsize::new(0),
            progress_calls: AtomicUsize::new(0),
            lose_outcome_reply: AtomicBool::new(false),
            outcome_calls: AtomicUsize::new(0),
        }
    }

    async fn delay(&self, payload: &EventPayload) {
        match payload {
            EventPayload::Status {
                status: JobState::Running,
                ..
            } => tokio::time::sleep(Duration::from_millis(200)).await,
            EventPayload::Progress { .. } => {
                let _ = self.progress_open.subscribe().wait_for(|open| *open).await;
            }
            _ => {}
        }
    }
}

impl SlowBus {
    /// The answer to a call that published `published`, an outcome among them if `outcome`.
    fn reply<T>(&self, outcome: bool, published: T) -> BackendResult<T> {
        if outcome {
            self.outcome_calls.fetch_add(1, Ordering::SeqCst);
            if self.lose_outcome_reply.swap(false, Ordering::SeqCst) {
                return Err(longjob_core::BackendError::Timeout {
                    backend: "test",
                    after: Duration::from_millis(1),
                });
            }
        }
        Ok(published)
    }
}

#[async_trait]
impl longjob_core::ProgressBus for SlowBus {
    async fn publish(
        &self,
        job: JobId,
        payload: EventPayload,
    ) -> BackendResult<longjob_core::JobEvent> {
        self.delay(&payload).await;
        self.single_calls.fetch_add(1, Ordering::SeqCst);
        if matches!(payload, EventPayload::Progress { .. }) {
            self.progress_calls.fetch_add(1, Ordering::SeqCst);
        }
        let outcome = payload.is_terminal();
        let published = self.inner.publish(job, payload).await?;
        self.reply(outcome, published)
    }
    async fn publish_many(
        &self,
        job: JobId,
        payloads: Vec<EventPayload>,
    ) -> BackendResult<Vec<longjob_core::JobEvent>> {
        if let Some(first) = payloads.first() {
            self.delay(first).await;
        }
        self.progress_calls.fetch_add(1, Ordering::SeqCst);
        let outcome = payloads.last().is_some_and(EventPayload::is_terminal);
        let published = self.inner.publish_many(job, payloads).await?;
        self.reply(outcome, published)
    }
    async fn subscribe(
        &self,
        job: JobId,
        after_seq: u64,
    ) -> BackendResult<longjob_core::bus::EventStream> {
        self.inner.subscribe(job, after_seq).await
    }
    async fn signal_cancel(&self, job: JobId) -> BackendResult<()> {
        self.inner.signal_cancel(job).await
    }
    async fn cancel_signals(&self) -> BackendResult<longjob_core::bus::CancelStream> {
        self.inner.cancel_signals().await
    }
    async fn purge(&self, job: JobId) -> BackendResult<()> {
        self.inner.purge(job).await
    }
    async fn purge_before(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        limit: u64,
    ) -> BackendResult<u64> {
        self.inner.purge_before(before, limit).await
    }
    async fn health(&self) -> BackendResult<()> {
        self.inner.health().await
    }
}

/// A job's events as the names of their types (statuses by their state), up to its outcome.
async fn event_names(events: &mut longjob_core::bus::EventStream) -> (Vec<String>, Vec<u64>) {
    let (mut names, mut currents) = (Vec::new(), Vec::new());
    while let Some(Ok(event)) = events.next().await {
        names.push(match &event.payload {
            EventPayload::Status { status, .. } => status.to_string(),
            other => other.type_name().to_owned(),
        });
        if let EventPayload::Progress { progress } = &event.payload {
            currents.push(progress.current);
        }
        if event.is_terminal() {
            break;
        }
    }
    (names, currents)
}

/// A progress report does not wait for its event: while the bus holds progress events back,
/// the handler goes on until the queue of unsent events is full (then it waits: memory stays
/// bounded). The events then go out in order, several in one call, and before the outcome.
#[tokio::test(start_paused = true)]
async fn progress_reports_do_not_wait_for_the_bus() {
    let bus = Arc::new(SlowBus::new(false));
    let lj = LongJob::builder()
        .bus(bus.clone())
        .config(config(1))
        .build();
    let mut cfg = worker_config();
    cfg.progress_interval = Duration::ZERO;
    let reported = Arc::new(AtomicU32::new(0));
    let worker = lj
        .worker()
        .config(cfg)
        .handle("chatty", {
            let reported = Arc::clone(&reported);
            move |ctx, _: serde_json::Value| {
                let reported = Arc::clone(&reported);
                async move {
                    for i in 1..=200 {
                        ctx.progress(i, 200).await;
                        reported.store(u32::try_from(i).unwrap(), Ordering::SeqCst);
                    }
                    Ok(None)
                }
            }
        })
        .start();
    let id = submit(&lj, "chatty", &[]).await;
    let (_, mut events) = lj.subscribe(id, OWNER, 0).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let done = reported.load(Ordering::SeqCst);
    assert!(
        (64..200).contains(&done),
        "{done} of 200 reports returned while the bus held every event back"
    );
    bus.progress_open.send_replace(true);
    let (names, currents) = event_names(&mut events).await;
    assert_eq!(names.len(), 203, "{names:?}");
    assert_eq!(names[..2], ["queued", "processing"]);
    assert_eq!(names[202], "completed");
    assert_eq!(currents, (1..=200).collect::<Vec<u64>>());
    let calls = bus.progress_calls.load(Ordering::SeqCst);
    assert!(calls <= 20, "200 progress events took {calls} calls");
    worker.shutdown(Duration::from_secs(1)).await;
}

/// An outcome event whose publish is retried after its reply was lost is told once: published
/// alone, or with the `processing` event held for it (then retried alone).
#[tokio::test]
async fn an_outcome_published_again_after_a_lost_reply_is_told_once() {
    for hold in [Duration::ZERO, WorkerConfig::default().start_hold] {
        an_outcome_published_again_is_told_once(hold).await;
    }
}

async fn an_outcome_published_again_is_told_once(hold: Duration) {
    let bus = Arc::new(SlowBus::new(true));
    bus.lose_outcome_reply.store(true, Ordering::SeqCst);
    let lj = LongJob::builder()
        .bus(bus.clone())
        .config(config(1))
        .build();
    let mut cfg = worker_config();
    cfg.start_hold = hold;
    let worker = lj
        .worker()
        .config(cfg)
        .handle("quick", |_, _: serde_json::Value| async move { Ok(None) })
        .start();
    let id = submit(&lj, "quick", &[]).await;
    let (_, mut events) = lj.subscribe(id, OWNER, 0).await.unwrap();
    let (names, _) = event_names(&mut events).await;
    assert_eq!(names, ["queued", "processing", "completed"]);
    // Once the worker has retried, the job's events still end with one outcome.
    tokio::time::timeout(Duration::from_secs(10), async {
        while bus.outcome_calls.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the outcome publish was retried");
    let mut all = longjob_core::ProgressBus::subscribe(&bus.inner, id, 0)
        .await
        .unwrap();
    let mut seqs = Vec::new();
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_millis(300), all.next()).await
    {
        seqs.push((event.seq, event.payload.type_name()));
    }
    assert_eq!(
        seqs,
        [(1, "status"), (2, "status"), (3, "completed")],
        "the job's retained events, hold {hold:?}"
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

/// The `processing` event is sent while the handler runs; a handler reporting progress at once
/// still has its progress events follow it, however slow the bus is with it.
#[tokio::test(start_paused = true)]
async fn progress_follows_the_processing_event_on_a_slow_bus() {
    let lj = LongJob::builder()
        .bus(Arc::new(SlowBus::new(true)))
        .config(config(1))
        .build();
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("eager", |ctx, _: serde_json::Value| async move {
            ctx.progress(1, 2).await;
            Ok(None)
        })
        .start();
    let id = submit(&lj, "eager", &[]).await;
    let (_, mut events) = lj.subscribe(id, OWNER, 0).await.unwrap();
    let (names, _) = event_names(&mut events).await;
    assert_eq!(names, ["queued", "processing", "progress", "completed"]);
    worker.shutdown(Duration::from_secs(1)).await;
}

/// A handler that returns within `start_hold` has its `processing` event, its progress
/// and its outcome published in one call; with no hold, the `processing` event and the outcome
/// go out on their own.
#[tokio::test]
async fn a_short_jobs_events_go_out_with_its_outcome_in_one_call() {
    for (hold, single, many) in [
        (WorkerConfig::default().start_hold, 1, 1),
        (Duration::ZERO, 3, 1),
    ] {
        let bus = Arc::new(SlowBus::new(true));
        let lj = LongJob::builder()
            .bus(bus.clone())
            .config(config(1))
            .build();
        let mut cfg = worker_config();
        cfg.start_hold = hold;
        cfg.progress_interval = Duration::ZERO;
        let worker = lj
            .worker()
            .config(cfg)
            .handle("short", |ctx, _: serde_json::Value| async move {
                ctx.progress(1, 2).await;
                ctx.progress(2, 2).await;
                Ok(None)
            })
            .start();
        let id = submit(&lj, "short", &[]).await;
        let (_, mut events) = lj.subscribe(id, OWNER, 0).await.unwrap();
        let (names, currents) = event_names(&mut events).await;
        assert_eq!(
            names,
            ["queued", "processing", "progress", "progress", "completed"],
            "hold {hold:?}"
        );
        assert_eq!(currents, [1, 2]);
        // `publish` carried the submit's `queued` event (and, with no hold, `processing` and
        // the outcome); `publish_many` the rest.
        assert_eq!(
            (
                bus.single_calls.load(Ordering::SeqCst),
                bus.progress_calls.load(Ordering::SeqCst)
            ),
            (single, many),
            "publish and publish_many calls, hold {hold:?}"
        );
        worker.shutdown(Duration::from_secs(1)).await;
    }
}

/// A handler still running when `start_hold` ends has its `processing` event published
/// then, while it runs.
#[tokio::test]
async fn a_longer_jobs_processing_event_is_not_held_until_its_end() {
    let lj = facade(config(1));
    let release = Arc::new(tokio::sync::Notify::new());
    let worker = lj
        .worker()
        .config(worker_config())
        .handle("long", {
            let release = Arc::clone(&release);
            move |_, _: serde_json::Value| {
                let release = Arc::clone(&release);
                async move {
                    release.notified().await;
                    Ok(None)
                }
            }
        })
        .start();
    let id = submit(&lj, "long", &[]).await;
    let (_, mut events) = lj.subscribe(id, OWNER, 0).await.unwrap();
    // The handler waits for `release`: both events come while it runs.
    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("the processing event came while the handler ran")
            .expect("the stream goes on")
            .unwrap();
        if let EventPayload::Status { status, .. } = event.payload {
            statuses.push(status);
        }
    }
    assert_eq!(statuses, [JobState::Queued, JobState::Running]);
    release.notify_one();
    let (rest, _) = event_names(&mut events).await;
    assert_eq!(rest, ["completed"]);
    worker.shutdown(Duration::from_secs(1)).await;
}
