//! One job's attempt, from its lease to its ack.

use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tracing::Instrument;

use super::context::{ContextInner, Tracked};
use super::{JobContext, Shared, Slot, StopReason, backoff};
use crate::memory::lock;
use crate::{BackendError, EventPayload, Job, JobError, JobResult, JobState, Lease, RetryDecision};

/// How an attempt ended.
enum Outcome {
    Done(Result<Option<JobResult>, JobError>),
    Stopped(StopReason),
}

pub(crate) async fn run_job(shared: &Shared, lease: Lease, slot: &mut Slot) {
    let span = tracing::info_span!("job", job_id = %lease.job_id, token = lease.token);
    async {
        if let Err(e) = attempt(shared, lease, slot).await {
            // The lease expires and the job runs again elsewhere: at least once, never lost.
            tracing::warn!(error = %e, "attempt abandoned on a backend error");
        }
    }
    .instrument(span)
    .await;
}

/// Retries a backend call on transient errors for up to about a lease's time-to-live.
async fn persist<T, F, Fut>(shared: &Shared, mut call: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BackendError>>,
{
    let give_up = Instant::now() + shared.config.lease_ttl;
    let mut failures = 0;
    loop {
        match call().await {
            Err(e) if e.is_transient() && Instant::now() < give_up => {
                failures += 1;
                tracing::debug!(error = %e, failures, "transient backend error; retrying");
                tokio::time::sleep(backoff(failures)).await;
            }
            other => return other,
        }
    }
}

/// Writes `job` with compare-and-set, retrying transient errors. A retry that meets a conflict
/// may be meeting our own first write, which landed before its answer was lost: when the stored
/// job is exactly that write, it counts as done.
async fn persist_update(shared: &Shared, job: &Job) -> Result<Job, BackendError> {
    let store = shared.lj.store();
    let tries = std::sync::atomic::AtomicU32::new(0);
    let written = persist(shared, || {
        tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        store.update(job)
    })
    .await;
    match written {
        Err(BackendError::Conflict { actual, .. })
            if tries.load(std::sync::atomic::Ordering::Relaxed) > 1
                && actual == job.version + 1 =>
        {
            match persist(shared, || store.get(job.id)).await? {
                Some(stored)
                    if stored.version == job.version + 1
                        && stored.state == job.state
                        && stored.attempt == job.attempt
                        && stored.lease_token == job.lease_token =>
                {
                    Ok(stored)
                }
                _ => Err(BackendError::Conflict {
                    id: job.id,
                    expected: job.version,
                    actual,
                }),
            }
        }
        other => other,
    }
}

async fn attempt(shared: &Shared, lease: Lease, slot: &mut Slot) -> Result<(), BackendError> {
    let lj = &shared.lj;
    let queue = lj.queue();
    let reading = Instant::now();
    let read = persist(shared, || lj.store().get(lease.job_id)).await?;
    shared.capacity.job_read(reading.elapsed());
    let Some(mut job) = read else {
        tracing::warn!("leased job is not in the store; dropping it");
        persist(shared, || queue.ack(&lease)).await?;
        return Ok(());
    };
    if job.state.is_terminal() {
        // Cancelled while queued, or a duplicate delivery of a finished job.
        persist(shared, || queue.ack(&lease)).await?;
        return Ok(());
    }
    if job.lease_token > lease.token {
        let ours = [lease];
        let held = persist(shared, || queue.extend(&ours, shared.config.lease_ttl)).await?;
        if held.first() != Some(&true) {
            // A newer lease owns the job; ours was revoked.
            return Ok(());
        }
        // We hold the newest lease, yet the job carries a larger token: the queue's token counter
        // went backwards (its data was reset behind the store's back). Fail loudly rather than
        // loop or drop the job.
        tracing::error!(
            stored = job.lease_token,
            "fencing token older than the job's: was the queue reset?"
        );
        let error = JobError::internal(
            "the queue issued a fencing token older than the job's; was the queue's data reset?",
        );
        return finish_start_failure(shared, lease, job, error).await;
    }
    let Some(handler) = shared.handlers.get(&job.kind).cloned() else {
        // Another worker may have this kind's handler (workers of a fleet can differ): give the
        // job back as it is rather than fail it.
        if remember_foreign_kind(&mut lock(&shared.foreign_kinds), &job.kind) {
            tracing::warn!(kind = %job.kind, "no handler for this kind here; giving its jobs back");
        } else {
            tracing::debug!(kind = %job.kind, "no handler for this kind here; giving the job back");
        }
        persist(shared, || {
            queue.requeue(&lease, shared.config.foreign_kind_delay)
        })
        .await?;
        return Ok(());
    };
    if !job.has_attempts_left() {
        // Taken over after its worker was lost on the last attempt.
        let error = JobError::internal("the worker running the last attempt was lost");
        return finish_start_failure(shared, lease, job, error).await;
    }
    if !slot.start(&shared.stop_claiming).await {
        // Claimed ahead, and no handler slot came free in time (or the worker is stopping):
        // another worker may run it sooner.
        tracing::debug!("no handler slot in time for a job claimed ahead; giving it back");
        persist(shared, || queue.requeue(&lease, Duration::ZERO)).await?;
        return Ok(());
    }
    if job.start(lease.token, Utc::now()).is_err() {
        persist(shared, || queue.ack(&lease)).await?;
        return Ok(());
    }
    // The start is written once the handler outlasts the hold, or with the outcome of a handler
    // that does not (`start_hold`): one store write a short job instead of two. A job
    // back from an expired lease may be what brought its last worker down: its start is written
    // first, so such a job uses up its attempts.
    let hold = shared.config.start_hold;
    let defer_start = !hold.is_zero() && !lease.redelivered;
    if !defer_start {
        job = match persist_update(shared, &job).await {
            Ok(job) => job,
            Err(BackendError::Conflict { .. } | BackendError::Fenced { .. }) => {
                // Someone wrote the job since we read it (a cancel, a newer lease): look again shortly.
                persist(shared, || queue.requeue(&lease, Duration::from_millis(50))).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
    }
    tracing::info!(attempt = job.attempt, kind = %job.kind, deferred = defer_start, "attempt started");
    // The `processing` event goes out while the handler starts, not before: one round trip
    // less per job; or, if the handler returns within `start_hold`, with the outcome.
    // The handler's progress events wait for it (`start_announced`), and so does the outcome.
    let start_payload = EventPayload::status_of(&job);

    let timeout = lj.config().timeouts.job;
    // The job itself moves into the context, which keeps it as last written.
    let (job_id, payload) = (job.id, job.payload.clone());
    let started = Instant::now();
    let ctx = JobContext::new(ContextInner {
        job_id,
        attempt: job.attempt,
        owner: job.owner.clone(),
        lease_token: lease.token,
        lj: lj.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
        stop_reason: Mutex::new(None),
        deadline: started + timeout,
        progress_interval: shared.config.progress_interval,
        flush_interval: shared.config.store_flush_interval,
        started,
        start_announced: tokio_util::sync::CancellationToken::new(),
        handler_ended: tokio_util::sync::CancellationToken::new(),
        held_start: Mutex::new(None),
        start_unwritten: std::sync::atomic::AtomicBool::new(defer_start),
        progress_events: super::context::ProgressQueue::default(),
        state: Mutex::new(Tracked {
            items: job.items.clone(),
            progress: job.progress,
            last_event: None,
            unsent: false,
            last_flush: started,
            dirty: false,
        }),
        stored: tokio::sync::Mutex::new(job),
    });
    if let Some(entry) = lock(&shared.running).get_mut(&job_id) {
        entry.1 = Some(ctx.clone());
    }
    let run = handler(ctx.clone(), payload);
    let run = async {
        let outcome = tokio::select! {
            r = tokio::time::timeout(timeout, run) => match r {
                Ok(r) => Outcome::Done(r),
                Err(_) => Outcome::Done(Err(JobError::timeout(format!("the attempt exceeded its timeout of {} s", timeout.as_secs())))),
            },
            () = ctx.cancellation().cancelled() => Outcome::Stopped(ctx.stop_reason().unwrap_or(StopReason::Cancelled)),
        };
        if matches!(outcome, Outcome::Done(_)) {
            ctx.publish_unsent_progress().await;
        }
        // The outcome follows the progress events queued until now.
        ctx.close_progress();
        ctx.inner().handler_ended.cancel();
        // The slot is free once the handler is, even before its `processing` event is out.
        slot.handler_done().await;
        outcome
    };
    let start_event = async {
        // A handler that returns within the hold has its events go out with its outcome.
        let held = !hold.is_zero()
            && tokio::select! {
                biased;
                () = ctx.inner().handler_ended.cancelled() => true,
                () = tokio::time::sleep(hold) => false,
            };
        if held {
            *lock(&ctx.inner().held_start) = Some(start_payload);
        } else if write_deferred_start(shared, &ctx).await {
            let _ = lj.bus().publish(job_id, start_payload).await;
        }
        ctx.inner().start_announced.cancel();
    };
    let ((), outcome, ()) = tokio::join!(start_event, run, ctx.send_progress());
    // A handler that returned after being stopped is treated as stopped.
    let outcome = match (outcome, ctx.stop_reason()) {
        (Outcome::Done(_), Some(reason)) => Outcome::Stopped(reason),
        (outcome, _) => outcome,
    };
    conclude(shared, lease, &ctx, outcome).await
}

/// Writes the start of an attempt whose handler outlasted the hold (a no-op when it is written
/// already). Returns whether the job is still ours to run; if not, the handler is stopped.
async fn write_deferred_start(shared: &Shared, ctx: &JobContext) -> bool {
    let inner = ctx.inner();
    let mut stored = inner.stored.lock().await;
    if !ctx.start_unwritten() {
        return true;
    }
    let mut next = stored.clone();
    ctx.apply_tracked(&mut next);
    match persist_update(shared, &next).await {
        Ok(written) => {
            ctx.keep_written(&mut stored, written);
            true
        }
        Err(BackendError::Conflict { .. }) => {
            // Written since we read it: cancelled, most likely (the outcome's handling looks).
            ctx.stop(StopReason::Cancelled);
            false
        }
        Err(BackendError::Fenced { .. }) => {
            ctx.stop(StopReason::LeaseLost);
            false
        }
        Err(e) => {
            // Unrecorded, the attempt must not go on: the lease expires and the job comes back,
            // redelivered, to a worker that records its start first.
            tracing::warn!(error = %e, "could not record the attempt's start; leaving the job");
            ctx.stop(StopReason::LeaseLost);
            false
        }
    }
}

/// Most kinds without a handler remembered per worker: past it, new ones are logged at debug
/// level only, so a queue full of odd kinds cannot grow the worker's memory.
const FOREIGN_KINDS_REMEMBERED: usize = 256;

/// Whether `kind` is met for the first time (and remembered) here.
fn remember_foreign_kind(seen: &mut std::collections::HashSet<String>, kind: &str) -> bool {
    seen.len() < FOREIGN_KINDS_REMEMBERED && !seen.contains(kind) && seen.insert(kind.to_owned())
}

/// Fails a job that cannot start here, for good.
async fn finish_start_failure(
    shared: &Shared,
    lease: Lease,
    mut job: Job,
    error: JobError,
) -> Result<(), BackendError> {
    let lj = &shared.lj;
    let now = Utc::now();
    let stored_token = job.lease_token;
    if job.state != JobState::Running {
        let _ = job.start(lease.token, now);
    }
    job.lease_token = stored_token.max(lease.token);
    if job.fail(error.clone(), now).is_ok() {
        match persist_update(shared, &job).await {
            Ok(job) => {
                let payload = EventPayload::Failed {
                    error,
                    attempt: job.attempt,
                };
                return announce(
                    shared,
                    job.id,
                    Vec::new(),
                    payload,
                    persist(shared, || lj.queue().ack(&lease)),
                )
                .await;
            }
            Err(BackendError::Conflict { .. } | BackendError::Fenced { .. }) => {
                persist(shared, || lj.queue().requeue(&lease, Duration::ZERO)).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    persist(shared, || lj.queue().ack(&lease)).await?;
    Ok(())
}

/// Publishes an attempt's outcome, after the events `held` for it, while the lease is settled
/// (acked or requeued): the two are independent, so they share one round trip's wait. The
/// outcome is retried on transient errors, since a subscriber waits for it; failing that it is
/// logged, the store holding the truth. The held events are sent once, with the outcome in one
/// call: should that call fail, the outcome is retried alone, so that an outcome whose reply
/// was lost is not told twice (a terminal event published alone after a terminal one is not
/// added).
async fn announce(
    shared: &Shared,
    job_id: crate::JobId,
    held: Vec<EventPayload>,
    payload: EventPayload,
    settle: impl std::future::Future<Output = Result<bool, BackendError>>,
) -> Result<(), BackendError> {
    let bus = shared.lj.bus();
    let publish = async {
        if !held.is_empty() {
            let mut events = held;
            events.push(payload.clone());
            match bus.publish_many(job_id, events).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "held events not published; retrying the outcome alone")
                }
            }
        }
        if let Err(e) = persist(shared, || bus.publish(job_id, payload.clone())).await {
            tracing::warn!(error = %e, "outcome event not published");
        }
    };
    let ((), settled) = tokio::join!(publish, settle);
    settled.map(drop)
}

async fn conclude(
    shared: &Shared,
    lease: Lease,
    ctx: &JobContext,
    outcome: Outcome,
) -> Result<(), BackendError> {
    let lj = &shared.lj;
    let queue = lj.queue();
    let policy = lj.config().retry;
    match outcome {
        Outcome::Stopped(StopReason::LeaseLost) => {
            tracing::warn!("lease lost: leaving the job to its new owner");
            Ok(())
        }
        Outcome::Stopped(StopReason::Cancelled) => {
            let current = persist(shared, || lj.store().get(lease.job_id)).await?;
            match current {
                Some(job) if job.state == JobState::Running && job.lease_token == lease.token => {
                    // The signal was for an earlier run of this job: run it again.
                    release(shared, lease, ctx).await
                }
                Some(job) if job.state == JobState::Queued && ctx.start_unwritten() => {
                    // The same, for an attempt whose start was not written yet.
                    release(shared, lease, ctx).await
                }
                _ => {
                    tracing::info!("cancelled");
                    persist(shared, || queue.ack(&lease)).await.map(drop)
                }
            }
        }
        Outcome::Stopped(StopReason::Shutdown) => release(shared, lease, ctx).await,
        Outcome::Done(Ok(result)) => {
            let completed = write_final(shared, lease, ctx, |job| {
                job.complete(result.clone(), Utc::now()).is_ok()
            })
            .await?;
            if let Some(job) = completed {
                tracing::info!(attempt = job.attempt, "completed");
                let (download_url, expires_at) = match &job.result {
                    Some(result) => match lj.presign(result).await {
                        Ok(url) => (Some(url.url), Some(url.expires_at)),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not presign the result for the event");
                            (None, None)
                        }
                    },
                    None => (None, None),
                };
                let size = job.result.as_ref().map(|r| r.size);
                let payload = EventPayload::Completed {
                    download_url,
                    expires_at,
                    size,
                };
                announce(
                    shared,
                    job.id,
                    ctx.take_held_events(),
                    payload,
                    persist(shared, || queue.ack(&lease)),
                )
                .await?;
            } else if let Some(result) = result {
                // The job was cancelled or taken over meanwhile: its result is not wanted.
                let _ = lj.blobs().delete(&result.blob_key).await;
            }
            Ok(())
        }
        Outcome::Done(Err(error)) => {
            let attempt = ctx.attempt();
            // A job's attempt budget is set at submit; our copy of the job has it.
            let max_attempts = ctx.inner().stored.lock().await.max_attempts;
            match policy.decide(attempt, max_attempts, &error) {
                RetryDecision::RetryAfter(delay) => {
                    let run_at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                    let e = error.clone();
                    let retrying = write_final(shared, lease, ctx, move |job| {
                        job.schedule_retry(e.clone(), run_at, Utc::now()).is_ok()
                    })
                    .await?;
                    if let Some(job) = retrying {
                        tracing::info!(attempt, error = %error, ?delay, "attempt failed; retrying");
                        let payload = EventPayload::status_of(&job);
                        announce(
                            shared,
                            job.id,
                            ctx.take_held_events(),
                            payload,
                            persist(shared, || queue.requeue(&lease, delay)),
                        )
                        .await?;
                    }
                }
                RetryDecision::GiveUp => {
                    let e = error.clone();
                    let failed = write_final(shared, lease, ctx, move |job| {
                        job.fail(e.clone(), Utc::now()).is_ok()
                    })
                    .await?;
                    if let Some(job) = failed {
                        tracing::info!(attempt, error = %error, "failed");
                        let payload = EventPayload::Failed {
                            error,
                            attempt: job.attempt,
                        };
                        announce(
                            shared,
                            job.id,
                            ctx.take_held_events(),
                            payload,
                            persist(shared, || queue.ack(&lease)),
                        )
                        .await?;
                    }
                }
            }
            Ok(())
        }
    }
}

/// Gives the job back for another worker, without counting the interrupted attempt.
async fn release(shared: &Shared, lease: Lease, ctx: &JobContext) -> Result<(), BackendError> {
    let lj = &shared.lj;
    let released = write_final(shared, lease, ctx, |job| {
        let now = Utc::now();
        let ok = job
            .schedule_retry(
                JobError::internal("interrupted by a worker shutdown"),
                now,
                now,
            )
            .is_ok();
        if ok {
            job.attempt = job.attempt.saturating_sub(1);
        }
        ok
    })
    .await?;
    if let Some(job) = released {
        tracing::info!("released for another worker");
        let payload = EventPayload::status_of(&job);
        announce(
            shared,
            job.id,
            ctx.take_held_events(),
            payload,
            persist(shared, || lj.queue().requeue(&lease, Duration::ZERO)),
        )
        .await?;
    }
    Ok(())
}

/// Writes the attempt's end (items, progress and `change`) with compare-and-set, re-reading on
/// conflicts. Returns the job as written, or `None` when the job is no longer ours to write
/// (cancelled, or taken over by a newer lease); in the cancelled case the lease is acked.
async fn write_final(
    shared: &Shared,
    lease: Lease,
    ctx: &JobContext,
    change: impl Fn(&mut Job) -> bool,
) -> Result<Option<Job>, BackendError> {
    let lj = &shared.lj;
    // The job as last read, which each round changes into the write it sends: a conflict
    // reads it again, so no copy of it is kept aside.
    let mut job = ctx.inner().stored.lock().await.clone();
    for _ in 0..16 {
        if job.lease_token != lease.token {
            tracing::warn!(
                current = job.lease_token,
                "a newer lease owns the job; not writing"
            );
            return Ok(None);
        }
        if job.state != JobState::Running {
            tracing::info!(state = %job.state, "the job changed state meanwhile; not writing");
            if job.state.is_terminal() {
                persist(shared, || lj.queue().ack(&lease)).await?;
            }
            return Ok(None);
        }
        ctx.apply_tracked(&mut job);
        if !change(&mut job) {
            return Ok(None);
        }
        match persist_update(shared, &job).await {
            Ok(written) => return Ok(Some(written)),
            Err(BackendError::Conflict { .. }) => {
                match persist(shared, || lj.store().get(lease.job_id)).await? {
                    Some(current) => job = current,
                    None => return Ok(None),
                }
            }
            Err(BackendError::Fenced { current, .. }) => {
                tracing::warn!(current, "fenced: a newer lease owns the job");
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    }
    Err(BackendError::Unavailable {
        backend: "store",
        message: format!("job {} kept changing; final write gave up", lease.job_id),
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_kinds_are_remembered_up_to_a_bound() {
        let mut seen = std::collections::HashSet::new();
        assert!(remember_foreign_kind(&mut seen, "a"));
        assert!(!remember_foreign_kind(&mut seen, "a"));
        for i in 1..FOREIGN_KINDS_REMEMBERED {
            assert!(remember_foreign_kind(&mut seen, &format!("k{i}")));
        }
        assert!(!remember_foreign_kind(&mut seen, "one too many"));
        assert_eq!(seen.len(), FOREIGN_KINDS_REMEMBERED);
    }
}
