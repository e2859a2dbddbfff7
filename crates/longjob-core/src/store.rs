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
