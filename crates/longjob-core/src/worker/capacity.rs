//! What a job holds of the worker's capacity, from its claim to its ack, and when claiming jobs
//! ahead of free handler slots pays.
//!
//! A job's path through a worker: claimed (a claim permit), running its handler (a claim permit
//! and a handler permit), then writing its outcome (a finishing permit). Handlers are bounded
//! by the concurrency; claims by the concurrency plus the prefetch, so up to `prefetch` jobs can
//! be claimed and read while every handler slot is taken, and start the moment one frees: the
//! next job's claim and read are then off the path between two handlers. That matters only
//! when handlers are short (a claim's round trip is a large part of a job) and the backend is
//! remote (an in-process store answers faster than a job claimed ahead is woken). When
//! handlers are long, a job claimed ahead would sit idle in this worker while another could run
//! it. So the worker claims ahead only while its handlers return within `prefetch_wait` and
//! reads take [`ROUND_TRIP_WORTH_HIDING`] or more, and a job claimed ahead that waits longer
//! than `prefetch_wait` for a slot goes back to the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::WorkerConfig;

/// No more slots of each kind than this, whatever the configuration asks (a semaphore's limit
/// is far above it; a worker will never need as many).
const MOST_SLOTS: usize = 1 << 24;

/// Jobs writing their outcome, per handler slot. Outcome writes are cheap and batched: the more
/// of them in flight, the fewer backend calls per job (on Redis, N=40 000, C=50, P=0, medians of
/// three runs: 16.5k jobs/s with one per slot, 17.9k with two, 18.8k with four; in a second
/// round, four 17.8k and eight 18.2k, within the noise). The bound keeps outcomes from piling
/// up without limit while the backend is slow.
const FINISHING_PER_SLOT: usize = 4;

/// Claiming ahead hides a job's claim and read; it pays only when they take at least this long
/// on average. A job claimed ahead costs its worker a wait and a wake-up (a few µs), which an
/// in-process store's read (a few µs itself) does not repay: the reference server on its
/// in-memory backends answered `initiate` 8–10 % slower with it.
const ROUND_TRIP_WORTH_HIDING: Duration = Duration::from_micros(50);

/// The worker's slots, shared by its claim loop and its jobs.
pub(crate) struct Capacity {
    /// Jobs claimed and not past their handler yet: the concurrency plus the prefetch.
    pub(crate) claims: Arc<Semaphore>,
    /// The claim slots in all.
    pub(crate) claim_slots: usize,
    /// Handlers running: at most the concurrency.
    handlers: Arc<Semaphore>,
    /// Jobs writing their outcome: at most [`FINISHING_PER_SLOT`] times the concurrency.
    finishing: Arc<Semaphore>,
    /// Jobs that may be claimed beyond the concurrency.
    pub(crate) prefetch: usize,
    prefetch_wait: Duration,
    /// How long recent handlers ran, in µs: a moving average, `u64::MAX` until one returned.
    recent_us: AtomicU64,
    /// How long recent reads of a claimed job took, in µs: a moving average, 0 until one did.
    read_us: AtomicU64,
    /// A job claimed ahead waited past `prefetch_wait` and went back: claim none ahead until a
    /// handler returns within it.
    gave_back: AtomicBool,
}

impl Capacity {
    pub(crate) fn new(config: &WorkerConfig) -> Self {
        let concurrency = config.concurrency.clamp(1, MOST_SLOTS);
        let prefetch = config.prefetch.unwrap_or(concurrency).min(MOST_SLOTS);
        Self {
            claims: Arc::new(Semaphore::new(concurrency + prefetch)),
            claim_slots: concurrency + prefetch,
            handlers: Arc::new(Semaphore::new(concurrency)),
            finishing: Arc::new(Semaphore::new(concurrency * FINISHING_PER_SLOT)),
            prefetch,
            prefetch_wait: config.prefetch_wait,
            recent_us: AtomicU64::new(u64::MAX),
            read_us: AtomicU64::new(0),
            gave_back: AtomicBool::new(false),
        }
    }

    /// Whether claiming ahead pays now: recent handlers returned within `prefetch_wait`, so a
    /// job claimed ahead waits less than that for its slot, and the backend's round trips are
    /// long enough to be worth hiding.
    pub(crate) fn prefetch_pays(&self) -> bool {
        self.prefetch > 0
            && !self.gave_back.load(Ordering::Relaxed)
            && self.recent_us.load(Ordering::Relaxed) < micros(self.prefetch_wait)
            && self.read_us.load(Ordering::Relaxed) >= micros(ROUND_TRIP_WORTH_HIDING)
    }

    /// Takes the time a job held its handler slot into the moving average: its start write
    /// as well as its handler, since that whole time is what a job claimed ahead waits on.
    fn handler_ran(&self, took: Duration) {
        average_in(&self.recent_us, took, u64::MAX);
        if took < self.prefetch_wait {
            self.gave_back.store(false, Ordering::Relaxed);
        }
    }

    /// Takes the time a claimed job's read took into its moving average.
    pub(crate) fn job_read(&self, took: Duration) {
        average_in(&self.read_us, took, 0);
    }
}

/// Moves the moving average (weight 1/8) in `average` towards `sample`; `unset` means no
/// sample yet. A lost race between two jobs loses one sample of an average: no harm.
fn average_in(average: &AtomicU64, sample: Duration, unset: u64) {
    let sample = micros(sample);
    let before = average.load(Ordering::Relaxed);
    let now = if before == unset {
        sample
    } else {
        before - before / 8 + sample / 8
    };
    average.store(now, Ordering::Relaxed);
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX - 1)
}

/// What one job holds of the worker's capacity; dropping it gives everything back.
pub(crate) struct Slot {
    /// Held from the claim until the handler returns.
    claim: Option<OwnedSemaphorePermit>,
    /// Held while the handler runs, with the time it started.
    handler: Option<(OwnedSemaphorePermit, Instant)>,
    /// Held while the outcome is written.
    finishing: Option<OwnedSemaphorePermit>,
    capacity: Arc<Capacity>,
}

impl Slot {
    pub(crate) fn claimed(claim: OwnedSemaphorePermit, capacity: Arc<Capacity>) -> Self {
        Self {
            claim: Some(claim),
            handler: None,
            finishing: None,
            capacity,
        }
    }

    /// Takes a handler slot for the job. Answers `false` when the job must go back to the queue
    /// instead: it waited past `prefetch_wait` for a slot (it was claimed ahead of handlers that
    /// turned out slow), or the worker stopped claiming while it waited.
    pub(crate) async fn start(&mut self, stopping: &CancellationToken) -> bool {
        if self.handler.is_some() {
            return true;
        }
        let handlers = Arc::clone(&self.capacity.handlers);
        let permit = match Arc::clone(&handlers).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let wait =
                    tokio::time::timeout(self.capacity.prefetch_wait, handlers.acquire_owned());
                tokio::select! {
                    waited = wait => match waited {
                        Ok(Ok(permit)) => permit,
                        // Timed out (or, never, the semaphore closed).
                        _ => {
                            self.capacity.gave_back.store(true, Ordering::Relaxed);
                            return false;
                        }
                    },
                    () = stopping.cancelled() => return false,
                }
            }
        };
        self.handler = Some((permit, Instant::now()));
        true
    }

    /// The handler has returned: gives its handler slot back, and trades the claim slot for a
    /// finishing one (waiting for one if as many jobs are finishing already), so the claimer can
    /// claim another job.
    pub(crate) async fn handler_done(&mut self) {
        let Some((_, since)) = self.handler.take() else {
            return;
        };
        self.capacity.handler_ran(since.elapsed());
        // The handler slot is free at once; the claim slot once the outcome has a finishing
        // one, so no more jobs are claimed while outcomes pile up. (The semaphore is never
        // closed; should it be, the job keeps its claim slot.)
        if let Ok(permit) = Arc::clone(&self.capacity.finishing).acquire_owned().await {
            self.finishing = Some(permit);
            self.claim = None;
        }
    }
}
