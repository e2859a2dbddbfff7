//! The worker runtime: claims jobs in batches, runs their handlers under leases, heartbeats all
//! leases in one call per interval, enforces timeouts, retries, cancellation and graceful
//! shutdown.

mod capacity;
mod context;
mod run;

pub use context::JobContext;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::id::IdMap;
use crate::memory::lock;
use crate::{JobError, JobResult, Lease, LongJob};
use capacity::{Capacity, Slot};

/// Why a running handler was stopped before it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// Its owner cancelled the job.
    Cancelled,
    /// The worker lost the lease (expired, or revoked): another worker may own the job now.
    LeaseLost,
    /// The worker is shutting down and the grace period ran out.
    Shutdown,
}

/// Settings of a worker, with defaults that work.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Handlers run at once. Default 16.
    ///
    /// A job's slot is free again as soon as its handler returns: writing its outcome, its
    /// event and its ack happen after, for up to four times this many jobs at once (their
    /// leases still held and heartbeated). So a slow backend round trip delays the next job's
    /// start less, and outcomes of many jobs share one batch.
    pub concurrency: usize,
    /// Most jobs claimed in one call. Default: the concurrency.
    pub claim_batch: Option<usize>,
    /// Most jobs claimed ahead of free handler slots. Default: the concurrency; 0 turns it off.
    ///
    /// A job claimed ahead is leased and read while every handler is busy, and starts the
    /// moment one returns: the next job's claim and read are off the path between two
    /// handlers, which is most of a short job's time. The worker claims ahead only while its
    /// handlers return within [`prefetch_wait`](Self::prefetch_wait) (with longer jobs the
    /// round trips saved are noise, and a job held here waiting would be better run by another
    /// worker) and reading a job takes 50 µs or more (an in-process store answers faster than
    /// a job claimed ahead is woken). Its lease is held and heartbeated like a running job's.
    pub prefetch: Option<usize>,
    /// How long a job claimed ahead waits for a handler slot before it goes back to the queue
    /// (no attempt counted), and the longest handler run time (as a recent average) for which
    /// the worker claims ahead at all. Default 50 ms.
    pub prefetch_wait: Duration,
    /// A lease's time-to-live. Default 30 s.
    pub lease_ttl: Duration,
    /// How often all leases are extended (one call). Default 10 s.
    pub heartbeat_interval: Duration,
    /// How long one claim waits for work when the queue is empty. Default 5 s.
    pub claim_wait: Duration,
    /// While jobs run, how long the claimer waits for more free slots to claim them together
    /// (one claim, and one batch for each later step). Default 5 ms; zero claims at once.
    pub claim_gather: Duration,
    /// The least time between two progress events of one job. Default 250 ms.
    pub progress_interval: Duration,
    /// How long an attempt's start waits for the handler to return before it is recorded: its
    /// write to the store (state `running`, the attempt counted, the lease's token) and its
    /// `processing` event, with the progress events queued behind it. Default 20 ms; zero
    /// records the start before the handler runs.
    ///
    /// A handler that returns within it has its start written with its outcome, in one store
    /// write, and its `processing` event, progress events and outcome published together, in
    /// one [`publish_many`](crate::ProgressBus::publish_many) call once the outcome is written:
    /// one write and one backend call a short job instead of two or three. A longer handler's
    /// start is written, then its `processing` event published, this much after it starts;
    /// until then the store shows the job queued. A cancel or a takeover seen by that write
    /// stops the handler. Held events are best effort, as progress events are: if that call
    /// fails, only the outcome is retried (alone, so an outcome already told is not told
    /// twice), and an attempt that ends with no outcome to announce (cancelled, or its lease
    /// lost) drops them.
    ///
    /// A worker lost within the hold leaves no trace of the attempt in the store, so that
    /// attempt is not counted. The job's next lease says
    /// [`redelivered`](crate::Lease::redelivered), and a redelivered job's start is written
    /// before its handler runs: a job that keeps bringing its workers down gets one run more
    /// than its attempts, then fails as lost.
    pub start_hold: Duration,
    /// The least time between two progress writes of one job to the store. Default 1 s.
    pub store_flush_interval: Duration,
    /// How often finished jobs past their retention are purged (`None`: never). Default 60 s.
    pub purge_interval: Option<Duration>,
    /// How long a job of a kind this worker has no handler for waits before it is offered
    /// again. Such a job is given back untouched (no attempt counted), not failed: in a fleet
    /// where workers differ (a rolling deploy that adds a kind, or pools for different kinds on
    /// one queue), another worker may have its handler. Default 5 s.
    pub foreign_kind_delay: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            claim_batch: None,
            prefetch: None,
            prefetch_wait: Duration::from_millis(50),
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            claim_wait: Duration::from_secs(5),
            claim_gather: Duration::from_millis(5),
            progress_interval: Duration::from_millis(250),
            start_hold: Duration::from_millis(20),
            store_flush_interval: Duration::from_secs(1),
            purge_interval: Some(Duration::from_secs(60)),
            foreign_kind_delay: Duration::from_secs(5),
        }
    }
}

/// What a handler returns: an optional result blob, or a classified error.
pub type HandlerResult = Result<Option<JobResult>, JobError>;

type ErasedHandler =
    Arc<dyn Fn(JobContext, serde_json::Value) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// Builds a worker: its settings and one handler per job kind.
pub struct WorkerBuilder {
    lj: LongJob,
    config: WorkerConfig,
    handlers: HashMap<String, ErasedHandler>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("config", &self.config)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    pub(crate) fn new(lj: LongJob) -> Self {
        Self {
            lj,
            config: WorkerConfig::default(),
            handlers: HashMap::new(),
        }
    }

    /// Replaces the settings.
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets how many jobs run at once (at least 1).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.config.concurrency = concurrency.max(1);
        self
    }

    /// Registers the handler of jobs of `kind`. Its input is the job's payload, deserialized;
    /// a payload that does not deserialize fails the job with a `validation` error.
    pub fn handle<I, F, Fut>(mut self, kind: impl Into<String>, handler: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        F: Fn(JobContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: ErasedHandler = Arc::new(move |ctx, payload| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let input: I = serde_json::from_value(payload)
                    .map_err(|e| JobError::validation(format!("invalid job input: {e}")))?;
                handler(ctx, input).await
            })
        });
        self.handlers.insert(kind.into(), erased);
        self
    }

    /// Starts the worker on the current tokio runtime.
    pub fn start(self) -> WorkerHandle {
        let shared = Arc::new(Shared {
            lj: self.lj,
            capacity: Arc::new(Capacity::new(&self.config)),
            config: self.config,
            handlers: self.handlers,
            running: Mutex::new(IdMap::default()),
            foreign_kinds: Mutex::new(std::collections::HashSet::new()),
            stop_claiming: CancellationToken::new(),
        });
        let stop_all = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(heartbeat_loop(Arc::clone(&shared), stop_all.clone()));
        tasks.spawn(cancel_listener(Arc::clone(&shared), stop_all.clone()));
        if let Some(every) = shared.config.purge_interval {
            tasks.spawn(purge_loop(Arc::clone(&shared), every, stop_all.clone()));
        }
        let jobs = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let claimer = tokio::spawn(claim_loop(Arc::clone(&shared), Arc::clone(&jobs)));
        WorkerHandle {
            shared,
            stop_all,
            claimer,
            tasks,
            jobs,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) lj: LongJob,
    pub(crate) config: WorkerConfig,
    pub(crate) handlers: HashMap<String, ErasedHandler>,
    /// Jobs running here: their lease and their context (to stop them).
    pub(crate) running: Mutex<IdMap<(Lease, Option<JobContext>)>>,
    /// Kinds without a handler here that were met already: each is logged as a warning once,
    /// not at every offer of each of its jobs.
    pub(crate) foreign_kinds: Mutex<std::collections::HashSet<String>>,
    /// The worker's slots: claimed, running, finishing.
    pub(crate) capacity: Arc<Capacity>,
    /// Cancelled when the worker stops claiming (a graceful shutdown): the claim loop ends, and
    /// jobs claimed ahead and not started go back.
    pub(crate) stop_claiming: CancellationToken,
}

/// A running worker. Dropping it aborts its tasks without releasing leases (as a crash would);
/// call [`shutdown`](Self::shutdown) to stop gracefully.
pub struct WorkerHandle {
    shared: Arc<Shared>,
    stop_all: CancellationToken,
    claimer: tokio::task::JoinHandle<()>,
    tasks: JoinSet<()>,
    jobs: Arc<tokio::sync::Mutex<JoinSet<()>>>,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("running", &self.running())
            .finish_non_exhaustive()
    }
}

impl WorkerHandle {
    /// How many jobs this worker holds now: claimed ahead, running, or writing their outcome.
    pub fn running(&self) -> usize {
        lock(&self.shared.running).len()
    }

    /// Stops claiming, lets running jobs finish within `grace`, then stops the rest and
    /// releases their leases (their jobs run again elsewhere, the interrupted attempt not counted).
    pub async fn shutdown(mut self, grace: Duration) {
        self.shared.stop_claiming.cancel();
        let _ = (&mut self.claimer).await;
        let jobs = Arc::clone(&self.jobs);
        let mut jobs = jobs.lock().await;
        let drained =
            tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            let contexts: Vec<JobContext> = lock(&self.shared.running)
                .values()
                .filter_map(|(_, ctx)| ctx.clone())
                .collect();
            tracing::info!(
                jobs = contexts.len(),
                "grace period over: releasing running jobs"
            );
            for ctx in contexts {
                ctx.stop(StopReason::Shutdown);
            }
            while jobs.join_next().await.is_some() {}
        }
        self.stop_all.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops everything at once without releasing leases or writing anything, as a crash would.
    /// For tests of recovery.
    pub async fn abort(mut self) {
        self.claimer.abort();
        self.jobs.lock().await.abort_all();
        self.tasks.abort_all();
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.claimer.abort();
        if let Ok(mut jobs) = self.jobs.try_lock() {
            jobs.abort_all();
        }
        self.stop_all.cancel();
    }
}

/// Sleeps with exponential backoff after a backend error, up to 5 s.
fn backoff(failures: u32) -> Duration {
    let ceiling = Duration::from_millis(100)
        .saturating_mul(1 << failures.min(6))
        .min(Duration::from_secs(5));
    Duration::from_nanos(rand::random_range(
        ceiling.as_nanos() as u64 / 2..=ceiling.as_nanos() as u64,
    ))
}

async fn claim_loop(shared: Arc<Shared>, jobs: Arc<tokio::sync::Mutex<JoinSet<()>>>) {
    let stop = &shared.stop_claiming;
    let config = &shared.config;
    let capacity = &shared.capacity;
    let slots = Arc::clone(&capacity.claims);
    let batch = config.claim_batch.unwrap_or(config.concurrency).max(1);
    let prefetch = u32::try_from(capacity.prefetch).unwrap_or(u32::MAX);
    // While claiming ahead does not pay, this holds the prefetch's share of the claim slots, so
    // no more jobs are claimed than handlers can run.
    let mut reserve = None;
    let mut failures = 0u32;
    loop {
        if capacity.prefetch_pays() {
            reserve = None;
        } else if reserve.is_none() && prefetch > 0 {
            reserve = tokio::select! {
                permits = Arc::clone(&slots).acquire_many_owned(prefetch) => match permits { Ok(p) => Some(p), Err(_) => return },
                () = stop.cancelled() => return,
            };
        }
        let usable = capacity.claim_slots - reserve.as_ref().map_or(0, |r| r.num_permits());
        let first = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
            () = stop.cancelled() => return,
        };
        if reserve.is_none() && prefetch > 0 && !capacity.prefetch_pays() {
            // It stopped paying while we waited (a job claimed ahead went back): take the
            // reserve first, or the slot that job freed would claim it again.
            drop(first);
            continue;
        }
        let mut permits = vec![first];
        // While jobs run, slots come back one by one; claiming each at once would split the work
        // into batches of one, and every later step of a job (reads, writes, events, acks) with
        // it. A short wait gathers the slots freed meanwhile into one claim.
        let gather_until = tokio::time::Instant::now() + config.claim_gather;
        while permits.len() < batch {
            match Arc::clone(&slots).try_acquire_owned() {
                Ok(p) => permits.push(p),
                // Some slots are held by jobs, which will give them back soon.
                Err(_) if slots.available_permits() + permits.len() < usable => {
                    let next =
                        tokio::time::timeout_at(gather_until, Arc::clone(&slots).acquire_owned());
                    match next.await {
                        Ok(Ok(p)) => permits.push(p),
                        _ => break,
                    }
                }
                Err(_) => break,
            }
        }
        let claimed = tokio::select! {
            r = shared.lj.queue().claim(permits.len(), config.lease_ttl, config.claim_wait) => r,
            () = stop.cancelled() => return,
        };
        let leases = match claimed {
            Ok(leases) => {
                failures = 0;
                leases
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, failures, "claim failed; backing off");
                tokio::select! {
                    () = tokio::time::sleep(backoff(failures)) => continue,
                    () = stop.cancelled() => return,
                }
            }
        };
        let mut jobs = jobs.lock().await;
        while jobs.try_join_next().is_some() {}
        for (lease, permit) in leases.into_iter().zip(permits) {
            lock(&shared.running).insert(lease.job_id, (lease, None));
            let shared = Arc::clone(&shared);
            let mut slot = Slot::claimed(permit, Arc::clone(&shared.capacity));
            // Boxed: the job's future is several KB, and a task moves its future (and
            // swaps its stage when it ends) by value; a box keeps those moves a pointer.
            jobs.spawn(Box::pin(async move {
                run::run_job(&shared, lease, &mut slot).await;
                lock(&shared.running).remove(&lease.job_id);
                drop(slot);
            }));
        }
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut interval = tokio::time::interval(shared.config.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = stop.cancelled() => return,
        }
        let leases: Vec<Lease> = lock(&shared.running).values().map(|(l, _)| *l).collect();
        if leases.is_empty() {
            continue;
        }
        match shared
            .lj
            .queue()
            .extend(&leases, shared.config.lease_ttl)
            .await
        {
            Ok(held) => {
                for (lease, held) in leases.iter().zip(held) {
                    if !held {
                        tracing::warn!(job_id = %lease.job_id, "lease lost; stopping the handler");
                        let ctx = lock(&shared.running)
                            .get(&lease.job_id)
                            .and_then(|(_, c)| c.clone());
                        if let Some(ctx) = ctx {
                            ctx.stop(StopReason::LeaseLost);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, leases = leases.len(), "heartbeat failed"),
        }
    }
}

async fn cancel_listener(shared: Arc<Shared>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let signals = tokio::select! {
            s = shared.lj.bus().cancel_signals() => s,
            () = stop.cancelled() => return,
        };
        match signals {
            Ok(mut signals) => loop {
                let next = tokio::select! {
                    n = signals.next() => n,
                    () = stop.cancelled() => return,
                };
                match next {
                    Some(Ok(job)) => {
                        failures = 0;
                        let ctx = lock(&shared.running).get(&job).and_then(|(_, c)| c.clone());
                        if let Some(ctx) = ctx {
                            tracing::info!(job_id = %job, "cancel requested; stopping the handler");
                            ctx.stop(StopReason::Cancelled);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cancel signals interrupted");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot listen for cancel signals"),
        }
        failures = failures.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(backoff(failures)) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn purge_loop(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        match shared.lj.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "purged finished jobs past their retention"),
            Err(e) => tracing::warn!(error = %e, "purge failed"),
        }
    }
}
