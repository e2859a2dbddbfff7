//! What a handler sees of its job: progress, items, blobs, cancellation, deadline.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::blob::BlobStore;
use crate::memory::lock;
use crate::{
    BackendError, EventPayload, ItemRecord, ItemStatus, Job, JobId, LongJob, Progress, Timeouts,
};

use super::StopReason;

/// The handler's view of its running job. Cheap to clone.
///
/// Progress reports are rate-limited (the worker's `progress_interval` for events, its
/// `store_flush_interval` for the store), so a handler may report in a tight loop. A report
/// does not wait for its event to reach the bus: events are queued (up to 64; past that a
/// report waits for room) and sent in order, several in one round trip, before the attempt's
/// outcome event.
#[derive(Clone)]
pub struct JobContext {
    inner: Arc<ContextInner>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("job_id", &self.inner.job_id)
            .field("attempt", &self.inner.attempt)
            .finish_non_exhaustive()
    }
}

pub(crate) struct ContextInner {
    pub(crate) job_id: JobId,
    pub(crate) attempt: u32,
    pub(crate) owner: String,
    pub(crate) lease_token: u64,
    pub(crate) lj: LongJob,
    pub(crate) cancel: CancellationToken,
    pub(crate) stop_reason: Mutex<Option<StopReason>>,
    pub(crate) deadline: Instant,
    pub(crate) progress_interval: Duration,
    pub(crate) flush_interval: Duration,
    pub(crate) started: Instant,
    /// Fired (a one-shot latch) once the attempt's `processing` event is published, given up,
    /// or held for the outcome: progress events wait for it, so they follow it whatever the bus.
    pub(crate) start_announced: CancellationToken,
    /// Fired once the handler has returned (or was stopped) and its last progress is queued.
    pub(crate) handler_ended: CancellationToken,
    /// The `processing` event, when the handler returned before it was published
    /// ([`WorkerConfig::start_hold`](super::WorkerConfig::start_hold)): it goes out
    /// with the queued progress events and the outcome, in one call.
    pub(crate) held_start: Mutex<Option<EventPayload>>,
    /// The attempt's start is not in the store yet: the job there is still queued, and our
    /// `stored` copy is the job as started, unwritten
    /// ([`WorkerConfig::start_hold`](super::WorkerConfig::start_hold)). Changed
    /// only under the `stored` lock.
    pub(crate) start_unwritten: std::sync::atomic::AtomicBool,
    /// The progress events on their way to the bus.
    pub(crate) progress_events: ProgressQueue,
    pub(crate) state: Mutex<Tracked>,
    /// Our latest stored copy of the job; also serializes our own writes.
    pub(crate) stored: tokio::sync::Mutex<Job>,
}

/// Most progress events queued for the bus per attempt: past it, a report waits for room.
const PROGRESS_QUEUE: usize = 64;

/// A handler's progress events go to the bus through this queue, so a report does not wait
/// for a round trip. [`JobContext::send_progress`], polled by the attempt's own task next to
/// the handler (no task of its own: no spawn, no wake-up from another thread), sends whatever
/// has queued up in one [`publish_many`](crate::ProgressBus::publish_many), in order, after the
/// `processing` event, until the queue is closed and drained; the outcome follows. When the
/// `processing` event is held for the outcome, the queued events wait too, and go out with it.
#[derive(Default)]
pub(crate) struct ProgressQueue {
    state: Mutex<QueueState>,
    /// Wakes the sender: events queued, or the queue closed.
    queued: Notify,
    /// Wakes reporters waiting for room.
    room: Notify,
}

#[derive(Default)]
struct QueueState {
    events: VecDeque<EventPayload>,
    /// The attempt is concluding: later reports send no event.
    closed: bool,
}

pub(crate) struct Tracked {
    pub(crate) items: Vec<ItemRecord>,
    pub(crate) progress: Progress,
    pub(crate) last_event: Option<Instant>,
    /// A progress change happened that no event has carried yet (rate limit).
    pub(crate) unsent: bool,
    pub(crate) last_flush: Instant,
    pub(crate) dirty: bool,
}

impl JobContext {
    pub(crate) fn new(inner: ContextInner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn inner(&self) -> &ContextInner {
        &self.inner
    }

    /// The job's id.
    pub fn job_id(&self) -> JobId {
        self.inner.job_id
    }

    /// This attempt's number (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Who submitted the job.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The item records as they are now.
    pub fn items(&self) -> Vec<ItemRecord> {
        lock(&self.inner.state).items.clone()
    }

    /// Ids of the items still to do: pending, or failed in an earlier attempt. A retry redoes
    /// only these.
    pub fn pending_items(&self) -> Vec<String> {
        lock(&self.inner.state)
            .items
            .iter()
            .filter(|i| !i.status.is_done())
            .map(|i| i.id.clone())
            .collect()
    }

    /// The blob store, for results and sources.
    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        self.inner.lj.blobs()
    }

    /// The deadlines in force.
    pub fn timeouts(&self) -> &Timeouts {
        &self.inner.lj.config().timeouts
    }

    /// When this attempt times out.
    pub fn deadline(&self) -> Instant {
        self.inner.deadline
    }

    /// Fires when the job is cancelled, its lease is lost, or the worker shuts down. A handler
    /// that checks it between steps stops promptly; one that does not is dropped at its next
    /// await point anyway.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    /// Whether the handler should stop.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Reports `current` of `total` units done (for jobs without item records).
    pub async fn progress(&self, current: u64, total: u64) {
        self.update(|t| {
            t.progress.current = current;
            t.progress.total = total;
        })
        .await;
    }

    /// Adds `bytes` to the bytes produced.
    pub async fn add_bytes(&self, bytes: u64) {
        self.update(|t| t.progress.bytes_done = t.progress.bytes_done.saturating_add(bytes))
            .await;
    }

    /// Records item `id` as completed, with its size.
    pub async fn item_completed(&self, id: &str, size: u64) {
        self.record(id, ItemStatus::Completed, Some(size), None)
            .await;
    }

    /// Records item `id` as failed: a retry redoes it.
    pub async fn item_failed(&self, id: &str, error: impl Into<String>) {
        self.record(id, ItemStatus::Failed, None, Some(error.into()))
            .await;
    }

    /// Records item `id` as skipped (for example, not available): a retry does not redo it.
    pub async fn item_skipped(&self, id: &str, reason: impl Into<String>) {
        self.record(id, ItemStatus::Skipped, None, Some(reason.into()))
            .await;
    }

    async fn record(&self, id: &str, status: ItemStatus, size: Option<u64>, error: Option<String>) {
        self.update(|t| {
            if let Some(item) = t.items.iter_mut().find(|i| i.id == id) {
                item.status = status;
                item.size = size.or(item.size);
                item.error = error;
            }
            let Tracked {
                items, progress, ..
            } = t;
            crate::job::recount(items, progress);
        })
        .await;
    }

    async fn update(&self, change: impl FnOnce(&mut Tracked)) {
        let now = Instant::now();
        let (event, flush) = {
            let mut t = lock(&self.inner.state);
            change(&mut t);
            t.dirty = true;
            let p = &mut t.progress;
            if p.current > 0 && p.total >= p.current {
                let elapsed = now.duration_since(self.inner.started).as_millis() as u64;
                p.eta_ms = Some(elapsed.saturating_mul(p.total - p.current) / p.current);
            }
            let event = t
                .last_event
                .is_none_or(|at| now.duration_since(at) >= self.inner.progress_interval);
            if event {
                t.last_event = Some(now);
            }
            t.unsent = !event;
            let flush = now.duration_since(t.last_flush) >= self.inner.flush_interval;
            (event.then_some(t.progress), flush)
        };
        if let Some(progress) = event {
            self.publish_progress(progress).await;
        }
        if flush {
            self.flush().await;
        }
    }

    /// Publishes the latest progress if the rate limit held it back, so subscribers see the
    /// last report before the attempt's end.
    pub(crate) async fn publish_unsent_progress(&self) {
        let progress = {
            let mut t = lock(&self.inner.state);
            if !std::mem::take(&mut t.unsent) {
                return;
            }
            t.progress
        };
        self.publish_progress(progress).await;
    }

    /// Queues a progress event (see [`ProgressQueue`]); waits only when the queue is full.
    async fn publish_progress(&self, progress: Progress) {
        let queue = &self.inner.progress_events;
        let payload = EventPayload::Progress { progress };
        loop {
            // Registered before the check, so room made in between is not missed.
            let room = queue.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = lock(&queue.state);
                if state.closed {
                    return;
                }
                if state.events.len() < PROGRESS_QUEUE {
                    state.events.push_back(payload);
                    queue.queued.notify_one();
                    return;
                }
            }
            room.await;
        }
    }

    /// Sends the queued progress events until the queue is closed and drained. The attempt's
    /// task polls it alongside the handler.
    pub(crate) async fn send_progress(&self) {
        let queue = &self.inner.progress_events;
        self.inner.start_announced.cancelled().await;
        if lock(&self.inner.held_start).is_some() {
            // The handler is done and its events go out with the outcome.
            return;
        }
        loop {
            let queued = queue.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            let (batch, closed): (Vec<EventPayload>, bool) = {
                let mut state = lock(&queue.state);
                (state.events.drain(..).collect(), state.closed)
            };
            if !batch.is_empty() {
                queue.room.notify_waiters();
                // Best effort: the store holds the progress too.
                if let Err(e) = self
                    .inner
                    .lj
                    .bus()
                    .publish_many(self.inner.job_id, batch)
                    .await
                {
                    tracing::warn!(job_id = %self.inner.job_id, error = %e, "progress events not published");
                }
                continue;
            }
            if closed {
                return;
            }
            queued.await;
        }
    }

    /// Stops queueing progress events: [`send_progress`](Self::send_progress) sends the
    /// queued ones and returns.
    pub(crate) fn close_progress(&self) {
        let queue = &self.inner.progress_events;
        lock(&queue.state).closed = true;
        queue.queued.notify_one();
        queue.room.notify_waiters();
    }

    /// The events held back for the outcome (the `processing` event, then the progress events
    /// queued behind it), or none when the `processing` event went out on its own.
    pub(crate) fn take_held_events(&self) -> Vec<EventPayload> {
        let Some(start) = lock(&self.inner.held_start).take() else {
            return Vec::new();
        };
        let queued = std::mem::take(&mut lock(&self.inner.progress_events.state).events);
        let mut events = Vec::with_capacity(queued.len() + 2);
        events.push(start);
        events.extend(queued);
        events
    }

    /// Writes the tracked items and progress into `job`.
    pub(crate) fn apply_tracked(&self, job: &mut Job) {
        let t = lock(&self.inner.state);
        job.items.clone_from(&t.items);
        job.progress = t.progress;
    }

    /// Takes `written` as our stored copy (`stored` is that copy, locked). Our copy is always
    /// the started job, so any write of it records the start too.
    pub(crate) fn keep_written(&self, stored: &mut Job, written: Job) {
        *stored = written;
        self.inner
            .start_unwritten
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Whether the attempt's start is not in the store yet.
    pub(crate) fn start_unwritten(&self) -> bool {
        self.inner
            .start_unwritten
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn stop(&self, reason: StopReason) {
        lock(&self.inner.stop_reason).get_or_insert(reason);
        self.inner.cancel.cancel();
    }

    pub(crate) fn stop_reason(&self) -> Option<StopReason> {
        *lock(&self.inner.stop_reason)
    }

    /// Writes items and progress to the store (compare-and-set on our copy). A conflict means
    /// someone else wrote the job: if it was cancelled or taken over, the handler is stopped.
    pub(crate) async fn flush(&self) {
        let mut stored = self.inner.stored.lock().await;
        {
            let mut t = lock(&self.inner.state);
            if !t.dirty {
                return;
            }
            t.dirty = false;
            t.last_flush = Instant::now();
        }
        for _ in 0..4 {
            let mut next = stored.clone();
            self.apply_tracked(&mut next);
            next.updated_at = Utc::now();
            match self.inner.lj.store().update(&next).await {
                Ok(written) => {
                    self.keep_written(&mut stored, written);
                    return;
                }
                Err(BackendError::Conflict { .. }) => {
                    match self.inner.lj.store().get(self.inner.job_id).await {
                        Ok(Some(current)) => {
                            if current.lease_token != self.inner.lease_token {
                                self.stop(StopReason::LeaseLost);
                                return;
                            }
                            if current.state != crate::JobState::Running {
                                self.stop(StopReason::Cancelled);
                                return;
                            }
                            *stored = current;
                        }
                        Ok(None) => {
                            self.stop(StopReason::Cancelled);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(job_id = %self.inner.job_id, error = %e, "progress not flushed");
                            return;
                        }
                    }
                }
                Err(BackendError::Fenced { .. }) => {
                    self.stop(StopReason::LeaseLost);
                    return;
                }
                Err(e) => {
                    // Flushed again at the next report or at the end of the attempt.
                    lock(&self.inner.state).dirty = true;
                    tracing::warn!(job_id = %self.inner.job_id, error = %e, "progress not flushed");
                    return;
                }
            }
        }
    }
}
