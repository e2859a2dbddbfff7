use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::lock;
use crate::store::{Inserted, OwnerCounts};
use crate::{
    BackendError, BackendResult, ItemRecord, Job, JobError, JobId, JobResult, JobState, JobStore,
    Progress,
};

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
    /// Boxed, so the table's slack (up to half of it after a resize) costs a pointer per slot
    /// rather than a whole job.
    jobs: HashMap<JobId, Box<Stored>>,
    /// (owner, key) → (job, expiry of the key)
    idempotency: HashMap<IdempotencySlot, (JobId, DateTime<Utc>)>,
    /// Per owner, so quotas and listings cost the owner's jobs, not everybody's. The key is the
    /// one `Arc` every job of the owner shares.
    owners: HashMap<Arc<str>, Owner>,
    /// The job kinds seen, so every job of a kind shares one string.
    kinds: HashSet<Arc<str>>,
}

/// An owner and one of its idempotency keys.
type IdempotencySlot = (Arc<str>, Box<str>);

#[derive(Debug, Default)]
struct Owner {
    /// Sorted by creation time (jobs arrive in that order, so inserts append), so a quota count
    /// is a binary search.
    by_creation: Vec<(DateTime<Utc>, JobId)>,
    active: u64,
}

/// A job as this store keeps it: the [`Job`] less its redundancies, about a quarter of its
/// size. The payload is kept as JSON text, since a `serde_json` object holds a B-tree node of
/// eleven slots even for one field (about 700 bytes for `{"file_ids": [70000]}` against 20);
/// owner and kind are shared with every job of the same owner or kind. A [`Job`] is rebuilt
/// on every read, which costs about what the clone a read needs anyway did.
#[derive(Debug)]
struct Stored {
    kind: Arc<str>,
    owner: Arc<str>,
    payload: Box<str>,
    items: Box<[ItemRecord]>,
    error: Option<Box<JobError>>,
    result: Option<Box<JobResult>>,
    idempotency_key: Option<Box<str>>,
    progress: Progress,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    run_at: Option<DateTime<Utc>>,
    lease_token: u64,
    version: u64,
    attempt: u32,
    max_attempts: u32,
    state: JobState,
}

/// The `Arc` in `set` equal to `s`, added when missing.
fn intern(set: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
    if let Some(shared) = set.get(s) {
        return Arc::clone(shared);
    }
    let shared: Arc<str> = Arc::from(s);
    set.insert(Arc::clone(&shared));
    shared
}

/// `previous` when it holds `s` already, else a new `Arc`.
fn reuse(previous: &Arc<str>, s: &str) -> Arc<str> {
    if &**previous == s {
        Arc::clone(previous)
    } else {
        Arc::from(s)
    }
}

fn payload_text(payload: &serde_json::Value) -> BackendResult<Box<str>> {
    // A `Value` always serializes (its keys are strings); the error is mapped all the same.
    serde_json::to_string(payload)
        .map(String::into_boxed_str)
        .map_err(|e| BackendError::InvalidArgument(format!("payload not serializable: {e}")))
}

impl Stored {
    /// `job` as kept, with the given shared owner and kind.
    fn new(job: &Job, kind: Arc<str>, owner: Arc<str>) -> BackendResult<Self> {
        Ok(Self {
            kind,
            owner,
            payload: payload_text(&job.payload)?,
            items: job.items.clone().into_boxed_slice(),
            error: job.error.clone().map(Box::new),
            result: job.result.clone().map(Box::new),
            idempotency_key: job.idempotency_key.as_deref().map(Box::from),
            progress: job.progress,
            created_at: job.created_at,
            updated_at: job.updated_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            run_at: job.run_at,
            lease_token: job.lease_token,
            version: job.version,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            state: job.state,
        })
    }

    /// The job with id `id` as callers see it.
    fn to_job(&self, id: JobId) -> BackendResult<Job> {
        let payload = serde_json::from_str(&self.payload)
            .map_err(|e| BackendError::corrupt("memory", format!("payload of job {id}: {e}")))?;
        Ok(Job {
            id,
            kind: self.kind.to_string(),
            owner: self.owner.to_string(),
            payload,
            state: self.state,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            progress: self.progress,
            items: self.items.to_vec(),
            error: self.error.as_deref().cloned(),
            result: self.result.as_deref().cloned(),
            idempotency_key: self.idempotency_key.as_deref().map(str::to_owned),
            created_at: self.created_at,
            updated_at: self.updated_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            run_at: self.run_at,
            lease_token: self.lease_token,
            version: self.version,
        })
    }
}

impl MemoryJobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Inner {
    fn get(&self, id: JobId) -> BackendResult<Option<Job>> {
        self.jobs.get(&id).map(|s| s.to_job(id)).transpose()
    }

    fn insert(
        &mut self,
        job: &Job,
        idempotency_ttl: Duration,
        now: DateTime<Utc>,
    ) -> BackendResult<Inserted> {
        if let Some(key) = &job.idempotency_key {
            if let Some(existing) = self.live_idempotent(&job.owner, key, now) {
                if let Some(existing) = self.get(existing)? {
                    return Ok(Inserted::Existing(existing));
                }
            }
        }
        if self.jobs.contains_key(&job.id) {
            return Err(BackendError::AlreadyExists(job.id));
        }
        let kind = intern(&mut self.kinds, &job.kind);
        let owner_name = match self.owners.get_key_value(job.owner.as_str()) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(job.owner.as_str()),
        };
        let mut stored = Stored::new(job, kind, Arc::clone(&owner_name))?;
        stored.version = 1;
        if let Some(key) = &job.idempotency_key {
            let ttl = chrono::Duration::from_std(idempotency_ttl).unwrap_or(chrono::Duration::MAX);
            let expires = now
                .checked_add_signed(ttl)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            self.idempotency.insert(
                (Arc::clone(&owner_name), Box::from(key.as_str())),
                (job.id, expires),
            );
        }
        let owner = self.owners.entry(owner_name).or_default();
        let entry = (job.created_at, job.id);
        let at = owner.by_creation.partition_point(|e| *e <= entry);
        owner.by_creation.insert(at, entry);
        owner.active += u64::from(!job.state.is_terminal());
        self.jobs.insert(job.id, Box::new(stored));
        let mut inserted = job.clone();
        inserted.version = 1;
        Ok(Inserted::New(inserted))
    }

    /// The job holding the owner's key, while the key lives.
    fn live_idempotent(&self, owner: &str, key: &str, now: DateTime<Utc>) -> Option<JobId> {
        // Keyed by owned strings, so a lookup by borrowed ones builds a key; it happens only for
        // requests that carry an idempotency key.
        let slot = (Arc::<str>::from(owner), Box::<str>::from(key));
        self.idempotency
            .get(&slot)
            .filter(|(_, expires)| *expires > now)
            .map(|(id, _)| *id)
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
        lock(&self.inner).get(id)
    }

    async fn update(&self, job: &Job) -> BackendResult<Job> {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
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
        let kind = reuse(&stored.kind, &job.kind);
        let owner = reuse(&stored.owner, &job.owner);
        let mut next = Stored::new(job, kind, owner)?;
        next.version = stored.version + 1;
        let (was, is) = (!stored.state.is_terminal(), !next.state.is_terminal());
        **stored = next;
        if was != is {
            if let Some(owner) = inner.owners.get_mut(job.owner.as_str()) {
                owner.active = if is {
                    owner.active + 1
                } else {
                    owner.active.saturating_sub(1)
                };
            }
        }
        let mut written = job.clone();
        written.version += 1;
        Ok(written)
    }

    async fn list_by_owner(&self, owner: &str, limit: usize) -> BackendResult<Vec<Job>> {
        let inner = lock(&self.inner);
        let Some(index) = inner.owners.get(owner) else {
            return Ok(Vec::new());
        };
        let mut ids: Vec<JobId> = index.by_creation.iter().map(|(_, id)| *id).collect();
        ids.sort_unstable_by_key(|id| std::cmp::Reverse(*id));
        let mut jobs = Vec::with_capacity(limit.min(ids.len()));
        for id in ids.iter().take(limit) {
            if let Some(job) = inner.get(*id)? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    async fn find_by_idempotency_key(&self, owner: &str, key: &str) -> BackendResult<Option<Job>> {
        let inner = lock(&self.inner);
        match inner.live_idempotent(owner, key, Utc::now()) {
            Some(id) => inner.get(id),
            None => Ok(None),
        }
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
            .iter()
            .filter(|(_, j)| {
                j.state.is_terminal() && j.finished_at.is_some_and(|at| at < finished_before)
            })
            .map(|(id, _)| *id)
            .take(limit)
            .collect();
        let mut purged = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(job) = inner.get(*id)? {
                purged.push(job);
            }
        }
        for id in &ids {
            inner.jobs.remove(id);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What a job costs here is mostly this record: keep it in mimalloc's 224-byte size class.
    #[test]
    fn a_stored_job_is_small() {
        assert!(
            std::mem::size_of::<Stored>() <= 224,
            "{}",
            std::mem::size_of::<Stored>()
        );
    }

    #[tokio::test]
    async fn payload_round_trips_through_its_text() {
        let store = MemoryJobStore::new();
        let payload = serde_json::json!({"z": [1, -2, 3.5, "x", null, true], "a": {"b": {}}});
        let job = Job::new("k", "o", payload.clone());
        store.insert(&job, Duration::ZERO).await.unwrap();
        let got = store.get(job.id).await.unwrap().unwrap();
        assert_eq!(got.payload, payload);
    }
}
