//! The [`Queue`] trait: delivering job ids to workers under leases.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::{BackendResult, JobId};

/// A worker's claim on one job: the job is its until the lease expires, is acked or requeued.
///
/// `token` is a fencing token: it grows with every delivery (of any job, or at least of this
/// job), so a store can tell the newest claimer from a stale one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The job leased.
    pub job_id: JobId,
    /// The fencing token of this delivery.
    pub token: u64,
    /// Whether the job comes back because an earlier lease on it expired (its worker was lost,
    /// maybe while running it), rather than from a push. A worker records such a job's start
    /// before running it, so a job that brings its workers down uses up its attempts.
    pub redelivered: bool,
}

/// Sizes of a queue, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs that can be claimed now.
    pub ready: u64,
    /// Jobs waiting for their time.
    pub delayed: u64,
    /// Jobs leased to workers.
    pub leased: u64,
}

/// Delivers job ids to workers with leases.
///
/// Semantics every implementation keeps (the [test kit](crate::testkit) checks them):
/// - A job id is in the queue at most once: pushing an id that is already waiting only moves its
///   due time; pushing an id that is leased revokes the lease and makes it wait again.
/// - [`claim`](Self::claim) hands each due job to exactly one claimer, with a new fencing token
///   larger than any earlier token of that job. It never hands out a job before its due time.
/// - A lease not extended within its time-to-live expires, and its job can be claimed again: a
///   crashed worker loses no job. Once that happens the old lease's `ack`, `extend` and
///   `requeue` return `false`, and the job's next lease says
///   [`redelivered`](Lease::redelivered); a lease of a pushed or requeued job does not.
/// - `claim` waits up to `wait` when nothing is due, and is woken by new work rather than by
///   tight polling.
#[async_trait]
pub trait Queue: fmt::Debug + Send + Sync + 'static {
    /// Makes `job` claimable after `delay` (now when zero).
    async fn push(&self, job: JobId, delay: Duration) -> BackendResult<()>;

    /// Pushes many jobs at once, in as few round trips as the backend allows. The default calls
    /// [`push`](Self::push) for each.
    async fn push_many(&self, jobs: &[JobId], delay: Duration) -> BackendResult<()> {
        for job in jobs {
            self.push(*job, delay).await?;
        }
        Ok(())
    }

    /// Leases up to `max` due jobs for `lease_ttl`, oldest due first. When none is due, waits up
    /// to `wait` for one; returns an empty batch if none came.
    async fn claim(
        &self,
        max: usize,
        lease_ttl: Duration,
        wait: Duration,
    ) -> BackendResult<Vec<Lease>>;

    /// Extends each lease still held to `ttl` from now, in one call however many. The answer
    /// says, lease by lease in the same order, whether it is still held.
    async fn extend(&self, leases: &[Lease], ttl: Duration) -> BackendResult<Vec<bool>>;

    /// Removes the job for good. `false` if the lease was no longer held.
    async fn ack(&self, lease: &Lease) -> BackendResult<bool>;

    /// Gives the job back, claimable again after `delay`. `false` if the lease was no longer held.
    async fn requeue(&self, lease: &Lease, delay: Duration) -> BackendResult<bool>;

    /// How many jobs wait, wait for their time, and are leased.
    async fn stats(&self) -> BackendResult<QueueStats>;

    /// Answers when the backend is reachable.
    async fn health(&self) -> BackendResult<()>;
}
