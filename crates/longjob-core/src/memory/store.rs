use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::lock;
use crate::store::{Inserted, OwnerCounts};
use crate::{BackendError, BackendResult, Job, JobId, JobStore};

/// A [`JobStore`] in process memory.
///
/// ```
/// # tokio_test_block(async {
/// use std::time::Duration;
/// use longjob_core::{Job, JobStore, memory::MemoryJobStore};
///
/// let store = MemoryJobStore::new();
/// let job = Job::new("report", "alice", serde_json::json!({}));
/// let stored = store.insert(&job, Duration::ZERO).await.unwrap();
/// assert_eq!(stored.job().version, 1);
/// # });
/// # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Default)]
pub struct MemoryJobStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<JobId, Job>,
    /// (owner, key) → (job, expiry of the key)
    idempotency: HashMap<(String, String), (JobId, DateTime<Utc>)>,
    /// Per owner, so quotas and listings cost the owner's jobs, not everybody's.
    owners: HashMap<String, Owner>,
}

#[derive(Debug, Default)]
struct Owner {
    /// Sorted by creation time (jobs arrive in that order, so inserts append), so a quota count
    /// is a binary search.
    by_creation: Vec<(DateTime<Utc>, JobId)>,
    active: u64,
}

impl MemoryJobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Inner {
    fn insert(
        &mut self,
        job: &Job,
        idempotency_ttl: Duration,
        now: DateTime<Utc>,
    ) -> BackendResult<Inserted> {
        if let Some(key) = &job.idempotency_key {
            let slot = (job.owner.clone(), key.clone());
            if let Some((existing, expires)) = self.idempotency.get(&slot) {
                if *expires > now {
                    if let Some(existing) = self.jobs.get(existing) {
                        return Ok(Inserted::Existing(existing.clone()));
                    }
                }
            }
        }
        if self.jobs.contains_key(&job.id) {
            return Err(BackendError::AlreadyExists(job.id));
        }
        let mut stored = job.clone();
        stored.version = 1;
        if let Some(key) = &job.idempotency_key {
            let ttl = chrono::Duration::from_std(idempotency_ttl).unwrap_or(chrono::Duration::MAX);
            let expires = now
                .checked_add_signed(ttl)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            self.idempotency
                .insert((job.owner.clone(), key.clone()), (job.id, expires));
        }
        let owner = self.owners.entry(job.owner.clone()).or_default();
        let entry = (job.created_at, job.id);
        let at = owner.by_creation.partition_point(|e| *e <= entry);
        owner.by_creation.insert(at, entry);
        owner.active += u64::from(!job.state.is_terminal());
        self.jobs.insert(job.id, stored.clone());
        Ok(Inserted::New(stored))
    }
}

#[async_trait]
impl JobStore for MemoryJobStore {
    async fn insert(&self, job: &Job, idempotency_ttl: Duration) -> BackendResult<Inserted> {
        lock(&self.inner).insert(job, idempotency_ttl, Utc::now())
    }

    async fn insert_many(&self, jobs: &[Job]) -> BackendResult<()> {
        let mut inner = lock(&self.inner);
        let now = Utc::now();
        for job in jobs {
            inner.insert(job, Duration::ZERO, now)?;
        }
        Ok(())
    }

    async fn get(&self, id: JobId) -> BackendResult<Option<Job>> {
        Ok(lock(&self.inner).jobs.get(&id).cloned())
    }

    async fn update(&self, job: &Job) -> BackendResult<Job> {
        let mut inner = lock(&self.inner);
        let stored = inner
            .jobs
            .get_mut(&job.id)
            .ok_or(BackendError::NotFound(job.id))?;
        if stored.version != job.version {
            return Err(BackendError::Conflict {
                id: job.id,
                expected: job.version,
                actual: stored.version,
            });
        }
        if job.lease_token < stored.lease_token {
            return Err(BackendError::Fenced {
                id: job.id,
                token: job.lease_token,
                current: stored.lease_token,
            });
        }
        let mut next = job.clone();
        next.version = stored.version + 1;
        let (was, is) = (!stored.state.is_terminal(), !next.state.is_terminal());
        *stored = next.clone();
        if was != is {
            if let Some(owner) = inner.owners.get_mut(&job.owner) {
                owner.active = if is {
                    owner.active + 1
                } else {
                    owner.active.saturating_sub(1)
                };
            }
        }
        Ok(next)
    }

    async fn list_by_owner(&self, owner: &str, limit: usize) -> BackendResult<Vec<Job>> {
        let inner = lock(&self.inner);
        let Some(index) = inner.owners.get(owner) else {
            return Ok(Vec::new());
        };
        let mut ids: Vec<JobId> = index.by_creation.iter().map(|(_, id)| *id).collect();
        ids.sort_unstable_by_key(|id| std::cmp::Reverse(*id));
        Ok(ids
            .iter()
            .take(limit)
            .filter_map(|id| inner.jobs.get(id).cloned())
            .collect())
    }

    async fn find_by_idempotency_key(&self, owner: &str, key: &str) -> BackendResult<Option<Job>> {
        let inner = lock(&self.inner);
        let now = Utc::now();
        Ok(inner
            .idempotency
            .get(&(owner.to_owned(), key.to_owned()))
            .filter(|(_, expires)| *expires > now)
            .and_then(|(id, _)| inner.jobs.get(id).cloned()))
    }

    async fn count_by_owner(
        &self,
        owner: &str,
        since: DateTime<Utc>,
    ) -> BackendResult<OwnerCounts> {
        let inner = lock(&self.inner);
        let Some(index) = inner.owners.get(owner) else {
            return Ok(OwnerCounts::default());
        };
        let before = index
            .by_creation
            .partition_point(|(created, _)| *created < since);
        Ok(OwnerCounts {
            created_since: (index.by_creation.len() - before) as u64,
            active: index.active,
        })
    }

    async fn purge_finished(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> BackendResult<Vec<Job>> {
        let mut inner = lock(&self.inner);
        let ids: Vec<JobId> = inner
            .jobs
            .values()
            .filter(|j| {
                j.state.is_terminal() && j.finished_at.is_some_and(|at| at < finished_before)
            })
            .map(|j| j.id)
            .take(limit)
            .collect();
        let purged: Vec<Job> = ids.iter().filter_map(|id| inner.jobs.remove(id)).collect();
        let gone: HashSet<JobId> = ids.into_iter().collect();
        let owners: HashSet<&str> = purged.iter().map(|j| j.owner.as_str()).collect();
        for name in owners {
            if let Some(owner) = inner.owners.get_mut(name) {
                owner.by_creation.retain(|(_, id)| !gone.contains(id));
                if owner.by_creation.is_empty() {
                    inner.owners.remove(name);
                }
            }
        }
        inner.idempotency.retain(|_, (id, _)| !gone.contains(id));
        Ok(purged)
    }

    async fn health(&self) -> BackendResult<()> {
        Ok(())
    }
}
