//! The [`LongJob`] facade: the operations an API needs, over any four backends.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::blob::BlobStore;
use crate::bus::EventStream;
use crate::memory::{MemoryBlobStore, MemoryJobStore, MemoryProgressBus, MemoryQueue};
use crate::signing::UrlSigner;
use crate::store::{Inserted, OwnerQuota, QuotaHit};
use crate::worker::WorkerBuilder;
use crate::{
    BackendError, EventPayload, Job, JobId, JobResult, JobState, JobStore, ProgressBus, Queue,
    RetryPolicy, Timeouts,
};

/// Settings of a [`LongJob`], with defaults that work.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LongJobConfig {
    /// Retries of failed attempts. Default: 3 attempts, backoff from 1 s to 60 s with full jitter.
    pub retry: RetryPolicy,
    /// Deadlines. Default: [`Timeouts::default`].
    pub timeouts: Timeouts,
    /// How long a download URL works. Default 1 h.
    pub presign_ttl: Duration,
    /// How long an idempotency key returns the same job. Default 24 h.
    pub idempotency_ttl: Duration,
    /// Jobs one owner may create per rolling hour (`None`: no limit). Default 10.
    pub jobs_per_hour: Option<u32>,
    /// Unfinished jobs one owner may have at once (`None`: no limit). Default none.
    pub max_active_per_owner: Option<u32>,
    /// How long finished jobs, their events and results are kept. Default 24 h.
    ///
    /// [`LongJob::purge_expired`] (which a worker runs every
    /// [`purge_interval`](crate::WorkerConfig::purge_interval)) also sweeps the bus of every
    /// event older than this, unfinished jobs' included, and of its other records that old
    /// (PostgreSQL's cancel requests), through [`ProgressBus::purge_before`].
    pub retention: Duration,
}

impl Default for LongJobConfig {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            timeouts: Timeouts::default(),
            presign_ttl: Duration::from_secs(3600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            jobs_per_hour: Some(10),
            max_active_per_owner: None,
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// What went wrong with a facade operation, classified for the HTTP layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LongJobError {
    /// No such job, or not the caller's (never tell the difference).
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The job's state does not allow the operation.
    #[error("job {id} is {state}: cannot {action}")]
    InvalidState {
        /// The job.
        id: JobId,
        /// Its state.
        state: JobState,
        /// What was asked (`cancel`, `retry`, `download`).
        action: &'static str,
    },
    /// The job's result has expired or was deleted.
    #[error("the result of job {0} has expired or was deleted")]
    Gone(JobId),
    /// An owner's quota is used up.
    #[error("quota exceeded: {message}")]
    QuotaExceeded {
        /// Which quota.
        message: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The request is not acceptable.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A job to submit.
///
/// ```
/// use longjob_core::SubmitRequest;
/// let request = SubmitRequest::new("download", "alice", serde_json::json!({"fileIds": [70000]}))
///     .items(["70000"])
///     .idempotency_key(Some("order-42".to_owned()));
/// assert_eq!(request.kind, "download");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubmitRequest {
    /// Which handler runs it.
    pub kind: String,
    /// Who submits it.
    pub owner: String,
    /// The handler's input.
    pub payload: serde_json::Value,
    /// Ids of its items, recorded as pending.
    pub items: Vec<String>,
    /// The same key from the same owner returns the same job while the key lives.
    pub idempotency_key: Option<String>,
    /// Attempts allowed (default: the retry policy's).
    pub max_attempts: Option<u32>,
    /// Do not run before this time.
    pub run_at: Option<DateTime<Utc>>,
}

impl SubmitRequest {
    /// A request for a job of `kind` by `owner` with `payload`.
    pub fn new(
        kind: impl Into<String>,
        owner: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            kind: kind.into(),
            owner: owner.into(),
            payload,
            items: Vec::new(),
            idempotency_key: None,
            max_attempts: None,
            run_at: None,
        }
    }

    /// Sets the item ids.
    pub fn items<I>(mut self, ids: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.items = ids.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: Option<String>) -> Self {
        self.idempotency_key = key;
        self
    }

    /// Sets the attempts allowed.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Delays the job until `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }
}

/// The outcome of [`LongJob::submit`].
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The job (the existing one when an idempotency key matched).
    pub job: Job,
    /// Whether a new job was created.
    pub created: bool,
}

/// A fresh download URL of a completed job's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadUrl {
    /// The presigned URL.
    pub url: String,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// Its time-to-live.
    pub expires_in: Duration,
    /// The result's size in bytes.
    pub size: u64,
    /// The file name offered.
    pub file_name: String,
}

/// The result of each backend's health check.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// Blob storage.
    pub storage: Result<(), String>,
    /// The job store.
    pub store: Result<(), String>,
    /// The queue.
    pub queue: Result<(), String>,
    /// The progress bus.
    pub bus: Result<(), String>,
}

impl HealthReport {
    /// Whether every check passed.
    pub fn is_healthy(&self) -> bool {
        self.storage.is_ok() && self.store.is_ok() && self.queue.is_ok() && self.bus.is_ok()
    }
}

pub(crate) struct Backends {
    pub(crate) store: Arc<dyn JobStore>,
    pub(crate) queue: Arc<dyn Queue>,
    pub(crate) bus: Arc<dyn ProgressBus>,
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) config: LongJobConfig,
}

/// Jobs over any combination of a [`JobStore`], a [`Queue`], a [`ProgressBus`] and a
/// [`BlobStore`]: submit, status, retry, cancel, download URL, subscribe, and workers.
///
/// Cheap to clone; clones share everything.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use longjob_core::{JobResult, LongJob, SubmitRequest, JobState};
/// use longjob_core::signing::UrlSigner;
///
/// let jobs = LongJob::in_memory(UrlSigner::random("http://127.0.0.1:3000/v1/download/files"));
/// let worker = jobs
///     .worker()
///     .handle("hello", |ctx, name: String| async move {
///         ctx.progress(1, 1).await;
///         let _ = name;
///         Ok(None::<JobResult>)
///     })
///     .start();
/// let submitted = jobs.submit(SubmitRequest::new("hello", "alice", serde_json::json!("world"))).await.unwrap();
/// let mut events = jobs.subscribe(submitted.job.id, "alice", 0).await.unwrap().1;
/// # use futures::StreamExt;
/// while let Some(Ok(event)) = events.next().await {
///     if event.is_terminal() { break; }
/// }
/// assert_eq!(jobs.status(submitted.job.id, "alice").await.unwrap().state, JobState::Completed);
/// worker.shutdown(std::time::Duration::from_secs(5)).await;
/// # });
/// ```
#[derive(Clone)]
pub struct LongJob {
    pub(crate) inner: Arc<Backends>,
}

impl std::fmt::Debug for LongJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongJob")
            .field("store", &self.inner.store)
            .field("queue", &self.inner.queue)
            .field("bus", &self.inner.bus)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`LongJob`]; every backend left unset is the in-memory one.
#[derive(Default)]
pub struct LongJobBuilder {
    store: Option<Arc<dyn JobStore>>,
    queue: Option<Arc<dyn Queue>>,
    bus: Option<Arc<dyn ProgressBus>>,
    blobs: Option<Arc<dyn BlobStore>>,
    config: LongJobConfig,
}

impl std::fmt::Debug for LongJobBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongJobBuilder").finish_non_exhaustive()
    }
}

impl LongJobBuilder {
    /// The job store.
    pub fn store(mut self, store: Arc<dyn JobStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The queue.
    pub fn queue(mut self, queue: Arc<dyn Queue>) -> Self {
        self.queue = Some(queue);
        self
    }

    /// The progress bus.
    pub fn bus(mut self, bus: Arc<dyn ProgressBus>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// The blob store.
    pub fn blobs(mut self, blobs: Arc<dyn BlobStore>) -> Self {
        self.blobs = Some(blobs);
        self
    }

    /// The settings.
    pub fn config(mut self, config: LongJobConfig) -> Self {
        self.config = config;
        self
    }

    /// Builds it. Backends not given are in memory (a memory blob store signing with a random
    /// key under `http://127.0.0.1:3000/v1/download/files`).
    pub fn build(self) -> LongJob {
        LongJob {
            inner: Arc::new(Backends {
                store: self
                    .store
                    .unwrap_or_else(|| Arc::new(MemoryJobStore::new())),
                queue: self.queue.unwrap_or_else(|| Arc::new(MemoryQueue::new())),
                bus: self
                    .bus
                    .unwrap_or_else(|| Arc::new(MemoryProgressBus::default())),
                blobs: self.blobs.unwrap_or_else(|| {
                    Arc::new(MemoryBlobStore::new(UrlSigner::random(
                        "http://127.0.0.1:3000/v1/download/files",
                    )))
                }),
                config: self.config,
            }),
        }
    }
}

/// How many times a read-modify-write of the facade retries on a version conflict.
const CAS_RETRIES: usize = 16;

/// Finished jobs, and old events, deleted per call of a purge.
const PURGE_BATCH: usize = 500;

impl LongJob {
    /// A builder.
    pub fn builder() -> LongJobBuilder {
        LongJobBuilder::default()
    }

    /// Everything in memory, with blobs signed by `signer`.
    pub fn in_memory(signer: UrlSigner) -> Self {
        Self::builder()
            .blobs(Arc::new(MemoryBlobStore::new(signer)))
            .build()
    }

    /// The job store.
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.inner.store
    }

    /// The queue.
    pub fn queue(&self) -> &Arc<dyn Queue> {
        &self.inner.queue
    }

    /// The progress bus.
    pub fn bus(&self) -> &Arc<dyn ProgressBus> {
        &self.inner.bus
    }

    /// The blob store.
    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.inner.blobs
    }

    /// The settings.
    pub fn config(&self) -> &LongJobConfig {
        &self.inner.config
    }

    /// A builder of a worker that runs this facade's jobs.
    pub fn worker(&self) -> WorkerBuilder {
        WorkerBuilder::new(self.clone())
    }

    async fn publish(&self, job: &Job, payload: EventPayload) {
        if let Err(e) = self.inner.bus.publish(job.id, payload).await {
            tracing::warn!(job_id = %job.id, error = %e, "could not publish an event");
        }
    }

    fn new_job(&self, request: SubmitRequest) -> Result<Job, LongJobError> {
        if request.kind.is_empty() || request.owner.is_empty() {
            return Err(LongJobError::Invalid(
                "kind and owner must not be empty".into(),
            ));
        }
        if request
            .idempotency_key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > 255)
        {
            return Err(LongJobError::Invalid(
                "an idempotency key has 1 to 255 characters".into(),
            ));
        }
        let attempts = request
            .max_attempts
            .unwrap_or(self.inner.config.retry.max_attempts);
        let mut job = Job::new(request.kind, request.owner, request.payload)
            .with_items(request.items)
            .with_max_attempts(attempts);
        job.idempotency_key = request.idempotency_key;
        job.run_at = request.run_at;
        Ok(job)
    }

    fn delay_until(at: Option<DateTime<Utc>>) -> Duration {
        at.and_then(|at| (at - Utc::now()).to_std().ok())
            .unwrap_or_default()
    }

    /// Submits a job: stores it, publishes its first status event (`queued`) and queues it.
    /// With an idempotency key the owner already used, returns that job instead
    /// (`created: false`). Fails with [`LongJobError::QuotaExceeded`] past the owner's quotas;
    /// a job stored but not queued (the queue failed) is marked failed, and the error returned.
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, LongJobError> {
        let config = &self.inner.config;
        if let Some(key) = &request.idempotency_key {
            if let Some(job) = self
                .inner
                .store
                .find_by_idempotency_key(&request.owner, key)
                .await?
            {
                return Ok(Submitted {
                    job,
                    created: false,
                });
            }
        }
        let job = self.new_job(request)?;
        let inserted = if config.jobs_per_hour.is_some() || config.max_active_per_owner.is_some() {
            let quota = OwnerQuota {
                since: Utc::now() - chrono::Duration::hours(1),
                max_created_since: config.jobs_per_hour.map(u64::from),
                max_active: config.max_active_per_owner.map(u64::from),
            };
            match self
                .inner
                .store
                .insert_within(&job, config.idempotency_ttl, &quota)
                .await?
            {
                Ok(inserted) => inserted,
                Err(QuotaHit::CreatedSince { limit }) => {
                    return Err(LongJobError::QuotaExceeded {
                        message: format!("at most {limit} jobs per hour"),
                        retry_after: Duration::from_secs(60),
                    });
                }
                Err(QuotaHit::Active { limit }) => {
                    return Err(LongJobError::QuotaExceeded {
                        message: format!("at most {limit} unfinished jobs at once"),
                        retry_after: Duration::from_secs(5),
                    });
                }
            }
        } else {
            self.inner
                .store
                .insert(&job, config.idempotency_ttl)
                .await?
        };
        let job = match inserted {
            Inserted::Existing(job) => {
                return Ok(Submitted {
                    job,
                    created: false,
                });
            }
            Inserted::New(job) => job,
        };
        // Before the push: no worker holds the job yet, so `queued` comes first in its events
        // whatever the timing.
        self.publish(&job, EventPayload::status_of(&job)).await;
        if let Err(e) = self
            .inner
            .queue
            .push(job.id, Self::delay_until(job.run_at))
            .await
        {
            // The job is stored but no worker will see it: fail it, so it is not left queued.
            self.fail_unqueued(job.clone(), &e).await;
            return Err(e.into());
        }
        Ok(Submitted { job, created: true })
    }

    async fn fail_unqueued(&self, mut job: Job, cause: &BackendError) {
        let now = Utc::now();
        // Queued → Running → Failed is the only path to Failed; the attempt is not counted.
        if job.start(job.lease_token, now).is_ok() {
            job.attempt = job.attempt.saturating_sub(1);
            let error = crate::JobError::internal(format!("could not be queued: {cause}"));
            let _ = job.fail(error.clone(), now);
            match self.inner.store.update(&job).await {
                // Its `queued` event is out: so is its end.
                Ok(job) => {
                    let attempt = job.attempt;
                    self.publish(&job, EventPayload::Failed { error, attempt })
                        .await;
                }
                Err(e) => {
                    tracing::error!(job_id = %job.id, error = %e, "job stored but neither queued nor failed");
                }
            }
        }
    }

    /// Submits many jobs at once, without idempotency keys or quotas, in as few backend round
    /// trips as the backends allow (for bulk loads and benchmarks). Each job gets its first
    /// `status` event, as with [`submit`](Self::submit); if the jobs cannot be queued they are
    /// marked failed, so none sits queued where no worker will see it.
    pub async fn submit_batch(
        &self,
        requests: Vec<SubmitRequest>,
    ) -> Result<Vec<Job>, LongJobError> {
        use futures::StreamExt;
        /// Events published at once (backends that gather calls send them in a few batches).
        const PUBLISHING: usize = 1024;
        let mut jobs: Vec<Job> = requests
            .into_iter()
            .map(|mut r| {
                r.idempotency_key = None;
                self.new_job(r)
            })
            .collect::<Result<_, _>>()?;
        self.inner.store.insert_many(&jobs).await?;
        for job in &mut jobs {
            // As stored (`JobStore::insert`), so the caller and a later write see its version.
            job.version = 1;
        }
        // Before the push: no worker holds these jobs yet, so `queued` comes first in their
        // events whatever the timing.
        futures::stream::iter(&jobs)
            .for_each_concurrent(PUBLISHING, |job| {
                self.publish(job, EventPayload::status_of(job))
            })
            .await;
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        if let Err(e) = self.inner.queue.push_many(&ids, Duration::ZERO).await {
            futures::stream::iter(&jobs)
                .for_each_concurrent(PUBLISHING, |job| self.fail_unqueued(job.clone(), &e))
                .await;
            return Err(e.into());
        }
        Ok(jobs)
    }

    /// The job, if it exists and belongs to `owner`.
    pub async fn status(&self, id: JobId, owner: &str) -> Result<Job, LongJobError> {
        match self.inner.store.get(id).await? {
            Some(job) if job.owner == owner => Ok(job),
            _ => Err(LongJobError::NotFound(id)),
        }
    }

    /// Read-modify-write of a job with retries on version conflicts.
    async fn modify(
        &self,
        id: JobId,
        owner: &str,
        action: &'static str,
        change: impl Fn(&mut Job) -> bool,
    ) -> Result<Job, LongJobError> {
        for _ in 0..CAS_RETRIES {
            let mut job = self.status(id, owner).await?;
            if !change(&mut job) {
                return Err(LongJobError::InvalidState {
                    id,
                    state: job.state,
                    action,
                });
            }
            match self.inner.store.update(&job).await {
                Ok(job) => return Ok(job),
                Err(BackendError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LongJobError::Backend(BackendError::Unavailable {
            backend: "store",
            message: format!("job {id} kept changing; gave up after {CAS_RETRIES} tries"),
            source: None,
        }))
    }

    /// Cancels a queued, retrying or running job. A running handler is told to stop, in whichever
    /// process it runs.
    pub async fn cancel(&self, id: JobId, owner: &str) -> Result<Job, LongJobError> {
        let job = self
            .modify(id, owner, "cancel", |job| job.cancel(Utc::now()).is_ok())
            .await?;
        if let Err(e) = self.inner.bus.signal_cancel(id).await {
            // The worker still sees the cancel at its next store write.
            tracing::warn!(job_id = %id, error = %e, "could not signal the cancel");
        }
        self.publish(&job, EventPayload::Cancelled {}).await;
        Ok(job)
    }

    /// Runs a failed or cancelled job again, with a fresh budget of attempts; items that
    /// completed are not redone.
    pub async fn retry(&self, id: JobId, owner: &str) -> Result<Job, LongJobError> {
        let extra = self.inner.config.retry.max_attempts;
        let job = self
            .modify(id, owner, "retry", |job| {
                job.requeue(extra, Utc::now()).is_ok()
            })
            .await?;
        self.inner.queue.push(id, Duration::ZERO).await?;
        self.publish(&job, EventPayload::status_of(&job)).await;
        Ok(job)
    }

    /// A fresh presigned URL of a completed job's result.
    pub async fn download_url(&self, id: JobId, owner: &str) -> Result<DownloadUrl, LongJobError> {
        let job = self.status(id, owner).await?;
        if job.state != JobState::Completed {
            return Err(LongJobError::InvalidState {
                id,
                state: job.state,
                action: "download",
            });
        }
        let Some(result) = job.result else {
            return Err(LongJobError::Gone(id));
        };
        if self.inner.blobs.head(&result.blob_key).await?.is_none() {
            return Err(LongJobError::Gone(id));
        }
        self.presign(&result).await.map_err(Into::into)
    }

    pub(crate) async fn presign(&self, result: &JobResult) -> Result<DownloadUrl, BackendError> {
        let ttl = self.inner.config.presign_ttl;
        let url = self
            .inner
            .blobs
            .presign_get(&result.blob_key, ttl, &result.file_name)
            .await?;
        Ok(DownloadUrl {
            url: url.url,
            expires_at: url.expires_at,
            expires_in: ttl,
            size: result.size,
            file_name: result.file_name.clone(),
        })
    }

    /// The job as it is now, and its events after `after_seq` (retained ones first, then live).
    pub async fn subscribe(
        &self,
        id: JobId,
        owner: &str,
        after_seq: u64,
    ) -> Result<(Job, EventStream), LongJobError> {
        // Subscribe first, so nothing published after the snapshot is missed.
        let events = self.inner.bus.subscribe(id, after_seq).await?;
        let job = self.status(id, owner).await?;
        Ok((job, events))
    }

    /// The owner's jobs, newest first.
    pub async fn list(&self, owner: &str, limit: usize) -> Result<Vec<Job>, LongJobError> {
        Ok(self.inner.store.list_by_owner(owner, limit).await?)
    }

    /// Checks every backend, each within `timeout`.
    pub async fn health(&self, timeout: Duration) -> HealthReport {
        async fn check(
            timeout: Duration,
            fut: impl std::future::Future<Output = Result<(), BackendError>>,
        ) -> Result<(), String> {
            match tokio::time::timeout(timeout, fut).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        }
        let b = &self.inner;
        let (storage, store, queue, bus) = tokio::join!(
            check(timeout, b.blobs.health()),
            check(timeout, b.store.health()),
            check(timeout, b.queue.health()),
            check(timeout, b.bus.health()),
        );
        HealthReport {
            storage,
            store,
            queue,
            bus,
        }
    }

    /// Deletes finished jobs older than the retention, with their results and events, then
    /// sweeps the bus of every event older than the retention, whatever its job (unfinished
    /// jobs' included, and those of jobs whose own purge failed), and of its other records that
    /// old (PostgreSQL's cancel requests): [`ProgressBus::purge_before`] in batches of 500 until
    /// a batch comes back short. Returns how many jobs were purged.
    ///
    /// A store or bus error is returned (a worker's purge loop logs it and tries again at its
    /// next round); what was purged before it stays purged. A failed delete of one job's result
    /// or events is only logged, and the rest go on.
    pub async fn purge_expired(&self) -> Result<usize, LongJobError> {
        let retention = chrono::Duration::from_std(self.inner.config.retention)
            .unwrap_or(chrono::Duration::MAX);
        let cutoff = Utc::now()
            .checked_sub_signed(retention)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut purged = 0;
        loop {
            let jobs = self.inner.store.purge_finished(cutoff, PURGE_BATCH).await?;
            if jobs.is_empty() {
                break;
            }
            purged += jobs.len();
            // The records are gone already: a failed delete is logged and the rest go on, so one
            // bad object does not orphan a whole batch (a storage lifecycle rule catches strays).
            for job in jobs {
                if let Some(result) = &job.result {
                    if let Err(e) = self.inner.blobs.delete(&result.blob_key).await {
                        tracing::warn!(job_id = %job.id, key = %result.blob_key, error = %e, "result not deleted");
                    }
                }
                if let Err(e) = self.inner.bus.purge(job.id).await {
                    tracing::warn!(job_id = %job.id, error = %e, "events not purged");
                }
            }
        }
        // Events of jobs that are not finished (or whose purge above failed) and the bus's
        // other records, by age alone.
        let batch = PURGE_BATCH as u64;
        loop {
            let swept = self.inner.bus.purge_before(cutoff, batch).await?;
            if swept < batch {
                break;
            }
        }
        Ok(purged)
    }

    /// Waits until the job is terminal (by its events), returning it. For tests and tools.
    pub async fn wait_finished(&self, id: JobId, owner: &str) -> Result<Job, LongJobError> {
        use futures::StreamExt;
        let (job, mut events) = self.subscribe(id, owner, 0).await?;
        if job.state.is_terminal() {
            return Ok(job);
        }
        loop {
            // Events can be missed only if the bus retains too few; re-check the store now and then.
            match tokio::time::timeout(Duration::from_millis(500), events.next()).await {
                Ok(Some(Ok(e))) if e.is_terminal() => return self.status(id, owner).await,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => return self.status(id, owner).await,
                Err(_) => {
                    let job = self.status(id, owner).await?;
                    if job.state.is_terminal() {
                        return Ok(job);
                    }
                }
            }
        }
    }
}
