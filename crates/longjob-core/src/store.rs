//! The [`JobStore`] trait: the source of truth for jobs.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{BackendResult, Job, JobId};

/// What [`JobStore::insert`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// The job was stored; here it is as stored (version 1).
    New(Job),
    /// A job of the same owner with the same idempotency key is still live: nothing was stored
    /// and here is that job.
    Existing(Job),
}

impl Inserted {
    /// The job, new or existing.
    pub fn job(&self) -> &Job {
        match self {
            Self::New(job) | Self::Existing(job) => job,
        }
    }

    /// Whether a new job was stored.
    pub const fn is_new(&self) -> bool {
        matches!(self, Self::New(_))
    }
}

/// Per-owner limits that [`JobStore::insert_within`] keeps.
///
/// ```
/// use chrono::{Duration, Utc};
/// use longjob_core::store::{OwnerCounts, OwnerQuota, QuotaHit};
///
/// let quota = OwnerQuota {
///     since: Utc::now() - Duration::hours(1),
///     max_created_since: Some(10),
///     max_active: Some(2),
/// };
/// let counts = OwnerCounts { created_since: 3, active: 2 };
/// assert_eq!(quota.check(&counts), Some(QuotaHit::Active { limit: 2 }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerQuota {
    /// Where the window of [`max_created_since`](Self::max_created_since) starts.
    pub since: DateTime<Utc>,
    /// At most this many jobs created at or after `since` (the new one not counted).
    pub max_created_since: Option<u64>,
    /// At most this many unfinished jobs (the new one not counted).
    pub max_active: Option<u64>,
}

impl OwnerQuota {
    /// The limit a new job would break, given the owner's counts; the jobs-created limit is
    /// checked first.
    pub fn check(&self, counts: &OwnerCounts) -> Option<QuotaHit> {
        if let Some(limit) = self.max_created_since {
            if counts.created_since >= limit {
                return Some(QuotaHit::CreatedSince { limit });
            }
        }
        if let Some(limit) = self.max_active {
            if counts.active >= limit {
                return Some(QuotaHit::Active { limit });
            }
        }
        None
    }
}

/// The per-owner limit that refused an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaHit {
    /// The owner created `limit` jobs since the quota's `since` already.
    CreatedSince {
        /// The limit.
        limit: u64,
    },
    /// The owner has `limit` unfinished jobs already.
    Active {
        /// The limit.
        limit: u64,
    },
}

/// How many jobs an owner has, for quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerCounts {
    /// Jobs created at or after the `since` given.
    pub created_since: u64,
    /// Jobs not in a terminal state.
    pub active: u64,
}

/// The source of truth for jobs.
///
/// Semantics every implementation keeps (the [test kit](crate::testkit) checks them):
/// - **Compare-and-set.** [`update`](Self::update) writes only if the job's `version` equals the
///   stored one, and stores it with `version + 1`; otherwise [`BackendError::Conflict`]. A stale
///   writer never overwrites silently.
/// - **Fencing.** [`update`](Self::update) rejects a job whose `lease_token` is smaller than the
///   stored one with [`BackendError::Fenced`]: its writer lost its lease to a newer worker.
/// - **Idempotency.** [`insert`](Self::insert) of a job with an idempotency key returns the
///   existing job when the same owner used the same key less than the given time-to-live ago.
///
/// [`BackendError::Conflict`]: crate::BackendError::Conflict
/// [`BackendError::Fenced`]: crate::BackendError::Fenced
#[async_trait]
pub trait JobStore: fmt::Debug + Send + Sync + 'static {
    /// Stores a new job at version 1. With an idempotency key still live for the same owner
    /// (created less than `idempotency_ttl` ago), stores nothing and returns the existing job.
    /// A job whose id exists already is [`AlreadyExists`](crate::BackendError::AlreadyExists).
    async fn insert(&self, job: &Job, idempotency_ttl: Duration) -> BackendResult<Inserted>;

    /// Like [`insert`](Self::insert), but stores nothing and answers `Err(hit)` when the new
    /// job would break one of the owner's limits in `quota`. A live idempotency key still
    /// returns its job, whatever the quota.
    ///
    /// Every backend of this crate and its sister crates checks and inserts in one atomic step,
    /// so concurrent submits of one owner, from any number of processes, never pass a limit
    /// together. The default implementation is **not** atomic (it counts, then inserts): a
    /// backend whose writes can race must override it.
    async fn insert_within(
        &self,
        job: &Job,
        idempotency_ttl: Duration,
        quota: &OwnerQuota,
    ) -> BackendResult<Result<Inserted, QuotaHit>> {
        if let Some(key) = &job.idempotency_key {
            if let Some(existing) = self.find_by_idempotency_key(&job.owner, key).await? {
                return Ok(Ok(Inserted::Existing(existing)));
            }
        }
        let counts = self.count_by_owner(&job.owner, quota.since).await?;
        if let Some(hit) = quota.check(&counts) {
            return Ok(Err(hit));
        }
        self.insert(job, idempotency_ttl).await.map(Ok)
    }

    /// Stores many new jobs that carry no idempotency key, in as few round trips as the backend
    /// allows. The default calls [`insert`](Self::insert) for each.
    async fn insert_many(&self, jobs: &[Job]) -> BackendResult<()> {
        for job in jobs {
            self.insert(job, Duration::ZERO).await?;
        }
        Ok(())
    }

    /// The job, if it exists.
    async fn get(&self, id: JobId) -> BackendResult<Option<Job>>;

    /// Writes `job` if its `version` is the stored one and its `lease_token` is not older than
    /// the stored one; returns it as stored, with the version bumped.
    async fn update(&self, job: &Job) -> BackendResult<Job>;

    /// The owner's jobs, newest first, at most `limit`.
    async fn list_by_owner(&self, owner: &str, limit: usize) -> BackendResult<Vec<Job>>;

    /// The owner's job with this idempotency key, if the key is still held by a job.
    async fn find_by_idempotency_key(&self, owner: &str, key: &str) -> BackendResult<Option<Job>>;

    /// How many jobs the owner created since `since`, and how many are not finished.
    async fn count_by_owner(&self, owner: &str, since: DateTime<Utc>)
    -> BackendResult<OwnerCounts>;

    /// Deletes up to `limit` jobs in a terminal state that finished before `finished_before`, and
    /// returns them (so the caller can delete their results and events).
    async fn purge_finished(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> BackendResult<Vec<Job>>;

    /// Answers when the backend is reachable.
    async fn health(&self) -> BackendResult<()>;
}
