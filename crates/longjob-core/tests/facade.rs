//! The `LongJob` facade on the in-memory backends: ownership, idempotency, quotas, states.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use longjob_core::blob::{PutOptions, byte_stream};
use longjob_core::memory::{MemoryProgressBus, MemoryQueue};
use longjob_core::queue::QueueStats;
use longjob_core::{
    BackendError, BackendResult, EventPayload, JobEvent, JobId, JobResult, JobState, Lease,
    LongJob, LongJobConfig, LongJobError, ProgressBus, Queue, SubmitRequest,
};

fn facade(config: LongJobConfig) -> LongJob {
    LongJob::builder().config(config).build()
}

fn request(owner: &str) -> SubmitRequest {
    SubmitRequest::new("k", owner, serde_json::json!({}))
}

fn no_quota() -> LongJobConfig {
    let mut c = LongJobConfig::default();
    c.jobs_per_hour = None;
    c
}

#[tokio::test]
async fn another_owners_job_is_not_found_whatever_the_operation() {
    let lj = facade(no_quota());
    let id = lj.submit(request("alice")).await.unwrap().job.id;
    assert!(matches!(
        lj.status(id, "bob").await,
        Err(LongJobError::NotFound(_))
    ));
    assert!(matches!(
        lj.cancel(id, "bob").await,
        Err(LongJobError::NotFound(_))
    ));
    assert!(matches!(
        lj.retry(id, "bob").await,
        Err(LongJobError::NotFound(_))
    ));
    assert!(matches!(
        lj.download_url(id, "bob").await,
        Err(LongJobError::NotFound(_))
    ));
    assert!(matches!(
        lj.subscribe(id, "bob", 0).await,
        Err(LongJobError::NotFound(_))
    ));
    assert!(matches!(
        lj.status(JobId::new(), "alice").await,
        Err(LongJobError::NotFound(_))
    ));
    assert_eq!(
        lj.status(id, "alice").await.unwrap().state,
        JobState::Queued
    );
    // Bob's cancel did nothing.
    assert_eq!(lj.list("alice", 10).await.unwrap().len(), 1);
    assert!(lj.list("bob", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_job() {
    let lj = facade(no_quota());
    let key = Some("order-42".to_owned());
    let first = lj
        .submit(request("alice").idempotency_key(key.clone()))
        .await
        .unwrap();
    let second = lj
        .submit(request("alice").idempotency_key(key.clone()))
        .await
        .unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.job.id, second.job.id);
    let bobs = lj
        .submit(request("bob").idempotency_key(key))
        .await
        .unwrap();
    assert!(bobs.created);
    assert_eq!(
        lj.queue().stats().await.unwrap().ready,
        2,
        "the repeat was not queued again"
    );
    let empty = lj
        .submit(request("alice").idempotency_key(Some(String::new())))
        .await;
    assert!(matches!(empty, Err(LongJobError::Invalid(_))));
}

#[tokio::test]
async fn quotas_per_owner_are_enforced() {
    let mut config = LongJobConfig::default();
    config.jobs_per_hour = Some(3);
    let lj = facade(config);
    for _ in 0..3 {
        lj.submit(request("alice")).await.unwrap();
    }
    let over = lj.submit(request("alice")).await;
    assert!(
        matches!(over, Err(LongJobError::QuotaExceeded { .. })),
        "{over:?}"
    );
    lj.submit(request("bob")).await.unwrap();

    let mut config = no_quota();
    config.max_active_per_owner = Some(2);
    let lj = facade(config);
    let a = lj.submit(request("alice")).await.unwrap().job.id;
    lj.submit(request("alice")).await.unwrap();
    assert!(matches!(
        lj.submit(request("alice")).await,
        Err(LongJobError::QuotaExceeded { .. })
    ));
    lj.cancel(a, "alice").await.unwrap();
    lj.submit(request("alice")).await.unwrap();
}

#[tokio::test]
async fn cancel_retry_and_download_refuse_the_wrong_states() {
    let lj = facade(no_quota());
    let id = lj.submit(request("alice")).await.unwrap().job.id;
    let refused = lj.retry(id, "alice").await;
    assert!(matches!(
        refused,
        Err(LongJobError::InvalidState {
            state: JobState::Queued,
            ..
        })
    ));
    let refused = lj.download_url(id, "alice").await;
    assert!(matches!(
        refused,
        Err(LongJobError::InvalidState {
            action: "download",
            ..
        })
    ));
    lj.cancel(id, "alice").await.unwrap();
    assert!(matches!(
        lj.cancel(id, "alice").await,
        Err(LongJobError::InvalidState { .. })
    ));
    let retried = lj.retry(id, "alice").await.unwrap();
    assert_eq!(retried.state, JobState::Queued);
}

async fn completed_job(lj: &LongJob) -> JobId {
    let worker = lj
        .worker()
        .handle("k", |ctx, _: serde_json::Value| async move {
            ctx.blobs()
                .put(
                    "results/x.zip",
                    byte_stream(&b"PK"[..]),
                    PutOptions::default(),
                )
                .await
                .unwrap();
            Ok(Some(JobResult {
                blob_key: "results/x.zip".into(),
                size: 2,
                file_name: "x.zip".into(),
                content_type: None,
            }))
        })
        .start();
    let id = lj.submit(request("alice")).await.unwrap().job.id;
    let job = lj.wait_finished(id, "alice").await.unwrap();
    assert_eq!(job.state, JobState::Completed);
    worker.shutdown(Duration::from_secs(5)).await;
    id
}

#[tokio::test]
async fn a_deleted_result_is_gone() {
    let lj = facade(no_quota());
    let id = completed_job(&lj).await;
    let url = lj.download_url(id, "alice").await.unwrap();
    assert_eq!(url.expires_in, Duration::from_secs(3600));
    lj.blobs().delete("results/x.zip").await.unwrap();
    assert!(matches!(
        lj.download_url(id, "alice").await,
        Err(LongJobError::Gone(_))
    ));
}

#[tokio::test]
async fn purge_deletes_jobs_results_and_events_past_the_retention() {
    let mut config = no_quota();
    config.retention = Duration::ZERO;
    let lj = facade(config);
    let id = completed_job(&lj).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(lj.purge_expired().await.unwrap(), 1);
    assert!(matches!(
        lj.status(id, "alice").await,
        Err(LongJobError::NotFound(_))
    ));
    assert!(lj.blobs().head("results/x.zip").await.unwrap().is_none());
    let report = lj.health(Duration::from_secs(1)).await;
    assert!(report.is_healthy(), "{report:?}");
}

/// The in-memory queue, for tests of submitting: with `down`, its pushes fail and its health
/// check times out, as a backend that is down; with `bus`, it records at each push whether the
/// job's `queued` event was out already.
#[derive(Debug, Default)]
struct TestQueue {
    inner: MemoryQueue,
    down: bool,
    bus: Option<MemoryProgressBus>,
    queued_first: std::sync::Mutex<Vec<bool>>,
}

impl TestQueue {
    fn down() -> Self {
        Self {
            down: true,
            ..Self::default()
        }
    }
}

#[async_trait]
impl Queue for TestQueue {
    async fn push(&self, job: JobId, delay: Duration) -> BackendResult<()> {
        if let Some(bus) = &self.bus {
            let mut events = bus.subscribe(job, 0).await?;
            let first = tokio::time::timeout(Duration::from_millis(100), events.next()).await;
            self.queued_first.lock().unwrap().push(matches!(
                first,
                Ok(Some(Ok(JobEvent {
                    payload: EventPayload::Status {
                        status: JobState::Queued,
                        ..
                    },
                    ..
                })))
            ));
        }
        if self.down {
            return Err(BackendError::Unavailable {
                backend: "test",
                message: "down".into(),
                source: None,
            });
        }
        self.inner.push(job, delay).await
    }
    async fn claim(&self, max: usize, ttl: Duration, wait: Duration) -> BackendResult<Vec<Lease>> {
        self.inner.claim(max, ttl, wait).await
    }
    async fn extend(&self, leases: &[Lease], ttl: Duration) -> BackendResult<Vec<bool>> {
        self.inner.extend(leases, ttl).await
    }
    async fn ack(&self, lease: &Lease) -> BackendResult<bool> {
        self.inner.ack(lease).await
    }
    async fn requeue(&self, lease: &Lease, delay: Duration) -> BackendResult<bool> {
        self.inner.requeue(lease, delay).await
    }
    async fn stats(&self) -> BackendResult<QueueStats> {
        self.inner.stats().await
    }
    async fn health(&self) -> BackendResult<()> {
        if self.down {
            return Err(BackendError::Timeout {
                backend: "test",
                after: Duration::from_secs(1),
            });
        }
        self.inner.health().await
    }
}

#[tokio::test]
async fn a_job_that_cannot_be_queued_is_not_left_queued() {
    let lj = LongJob::builder()
        .queue(Arc::new(TestQueue::down()))
        .config(no_quota())
        .build();
    let err = lj.submit(request("alice")).await.unwrap_err();
    assert!(
        matches!(err, LongJobError::Backend(BackendError::Unavailable { .. })),
        "{err:?}"
    );
    let jobs = lj.list("alice", 10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].state,
        JobState::Failed,
        "a stored job no worker will see must not stay queued"
    );
    assert_eq!(jobs[0].attempt, 0);
    assert_eq!(event_names(&lj, jobs[0].id).await, ["queued", "failed"]);
    let report = lj.health(Duration::from_secs(1)).await;
    assert!(!report.is_healthy() && report.queue.is_err() && report.store.is_ok());
}

/// The names of the job's retained events (statuses by their state), as far as they go.
async fn event_names(lj: &LongJob, id: JobId) -> Vec<String> {
    let (_, mut events) = lj.subscribe(id, "alice", 0).await.unwrap();
    let mut names = Vec::new();
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_millis(100), events.next()).await
    {
        names.push(match event.payload {
            EventPayload::Status { status, .. } => status.to_string(),
            other => other.type_name().to_owned(),
        });
    }
    names
}

/// A job's `queued` event is out before any worker can take it (before its push), so it is
/// its first event whatever the timing, submitted alone or in a batch.
#[tokio::test]
async fn the_queued_event_is_out_before_the_push() {
    let bus = MemoryProgressBus::default();
    let queue = Arc::new(TestQueue {
        bus: Some(bus.clone()),
        ..TestQueue::default()
    });
    let lj = LongJob::builder()
        .bus(Arc::new(bus))
        .queue(queue.clone())
        .config(no_quota())
        .build();
    lj.submit(request("alice")).await.unwrap();
    lj.submit_batch(vec![request("alice"), request("alice")])
        .await
        .unwrap();
    assert_eq!(*queue.queued_first.lock().unwrap(), [true, true, true]);
}

#[tokio::test]
async fn jobs_of_a_batch_that_cannot_be_queued_are_not_left_queued() {
    let lj = LongJob::builder()
        .queue(Arc::new(TestQueue::down()))
        .config(no_quota())
        .build();
    let err = lj
        .submit_batch(vec![request("alice"), request("alice")])
        .await
        .unwrap_err();
    assert!(
        matches!(err, LongJobError::Backend(BackendError::Unavailable { .. })),
        "{err:?}"
    );
    let jobs = lj.list("alice", 10).await.unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs.iter()
            .all(|job| job.state == JobState::Failed && job.attempt == 0),
        "{jobs:?}"
    );
    for job in &jobs {
        assert_eq!(event_names(&lj, job.id).await, ["queued", "failed"]);
    }
}

#[tokio::test]
async fn jobs_of_a_batch_get_their_queued_event_as_single_ones_do() {
    let lj = facade(no_quota());
    let single = lj.submit(request("alice")).await.unwrap().job.id;
    let batch = lj
        .submit_batch(vec![request("alice"), request("alice")])
        .await
        .unwrap();
    for job in &batch {
        assert_eq!(lj.status(job.id, "alice").await.unwrap(), *job, "as stored");
    }
    for id in std::iter::once(single).chain(batch.iter().map(|job| job.id)) {
        assert_eq!(event_names(&lj, id).await, ["queued"]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_job_submitted_for_later_waits_for_its_time() {
    let lj = facade(no_quota());
    let at = chrono::Utc::now() + chrono::Duration::seconds(30);
    lj.submit(request("alice").run_at(at)).await.unwrap();
    let stats = lj.queue().stats().await.unwrap();
    assert_eq!((stats.ready, stats.delayed), (0, 1));
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(lj.queue().stats().await.unwrap().ready, 1);
}
