use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::lock;
use crate::id::IdMap;
use crate::store::{Inserted, OwnerCounts, OwnerQuota, QuotaHit};
use crate::{
    BackendError, BackendResult, ItemRecord, Job, JobError, JobId, JobResult, JobState, JobStore,
    Progress,
};

/// A [`JobStore`] in process memory.
///
/// Unbounded by default: every job is kept until
/// [`purge_finished`](JobStore::purge_finished) removes it. [`with_max_jobs`](Self::with_max_jobs)
/// bounds it, so a process under a sustained stream of submissions runs out of room gracefully
/// rather than out of memory: past the bound, finished jobs are evicted oldest first (before
/// their retention ends), and when every kept job is unfinished a new one is refused with
/// [`BackendError::Full`] (503 at the HTTP layer). A job costs about 400 bytes here, plus
/// about 400 for its events in the [`MemoryProgressBus`](super::MemoryProgressBus).
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
    jobs: IdMap<Box<Stored>>,
    /// (owner, key) → (job, expiry of the key)
    idempotency: HashMap<IdempotencySlot, (JobId, DateTime<Utc>)>,
    /// Per owner, so quotas and listings cost the owner's jobs, not everybody's. The key is the
    /// one `Arc` every job of the owner shares.
    owners: HashMap<Arc<str>, Owner>,
    /// The job kinds seen, so every job of a kind shares one string.
    kinds: HashSet<Arc<str>>,
    /// The finished jobs by finish time, so purges and evictions find the oldest without a scan.
    finished: BTreeSet<(DateTime<Utc>, JobId)>,
    /// At most this many jobs are kept (`None`: no bound).
    max_jobs: Option<usize>,
    /// Jobs evicted to make room, returned by the next purge so that the caller deletes their
    /// results and events too.
    evicted: Vec<Evicted>,
    /// Told of each eviction at once (see [`MemoryJobStore::on_evict`]).
    on_evict: Option<EvictHook>,
}

/// A function called with each evicted job's id.
#[derive(Clone)]
struct EvictHook(Arc<dyn Fn(JobId) + Send + Sync>);

impl std::fmt::Debug for EvictHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EvictHook")
    }
}

/// An owner and one of its idempotency keys.
type IdempotencySlot = (Arc<str>, Box<str>);

#[derive(Debug, Default)]
struct Owner {
    /// Sorted by creation time. Jobs arrive in that order, so inserts append, and the oldest
    /// leave first, so removals are near the front: a deque makes both cheap. A quota count is
    /// a binary search.
    by_creation: VecDeque<(DateTime<Utc>, JobId)>,
    active: u64,
}

/// What the purge after an eviction needs of the evicted job: who it was, and its result.
#[derive(Debug)]
struct Evicted {
    id: JobId,
    kind: Arc<str>,
    owner: Arc<str>,
    state: JobState,
    finished_at: Option<DateTime<Utc>>,
    result: Option<Box<JobResult>>,
}

impl Evicted {
    /// A stand-in for the evicted job: its id, owner, kind, state and result, the rest empty.
    fn to_job(&self) -> Job {
        let mut job = Job::new(&*self.kind, &*self.owner, serde_json::Value::Null);
        job.id = self.id;
        job.state = self.state;
        job.finished_at = self.finished_at;
        job.result = self.result.as_deref().cloned();
        job
    }
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
    /// `job` as kept, with its payload's text and the given shared owner and kind.
    fn new(job: &Job, payload: Box<str>, kind: Arc<str>, owner: Arc<str>) -> Self {
        Self {
            kind,
            owner,
            payload,
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
        }
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
    /// An empty store without bound.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that keeps at most `max_jobs` jobs (at least 1): past that, inserting
    /// evicts the finished job that finished first, or fails with [`BackendError::Full`] when
    /// no job is finished. Evicted jobs are returned by the next
    /// [`purge_finished`](JobStore::purge_finished), whatever their age, so the purge deletes
    /// their results and events as well.
    pub fn with_max_jobs(max_jobs: usize) -> Self {
        let store = Self::default();
        lock(&store.inner).max_jobs = Some(max_jobs.max(1));
        store
    }

    /// Calls `hook` with the id of each job evicted (see [`with_max_jobs`](Self::with_max_jobs)),
    /// as it is evicted, so that what else is kept for the job can go at once rather than at
    /// the next purge: typically its retained events,
    /// `store.on_evict(move |id| bus.forget(id))` with a
    /// [`MemoryProgressBus`](super::MemoryProgressBus). The next purge then returns only the
    /// evicted jobs that have a result, for their blobs. The hook runs under the store's lock:
    /// it must be quick and must not call the store.
    pub fn on_evict(self, hook: impl Fn(JobId) + Send + Sync + 'static) -> Self {
        lock(&self.inner).on_evict = Some(EvictHook(Arc::new(hook)));
        self
    }

    /// How many jobs it keeps now.
    pub fn len(&self) -> usize {
        lock(&self.inner).jobs.len()
    }

    /// Whether it keeps no job.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key of a job in [`Inner::finished`], when it has one.
fn finished_key(
    id: JobId,
    state: JobState,
    finished_at: Option<DateTime<Utc>>,
) -> Option<(DateTime<Utc>, JobId)> {
    finished_at
        .filter(|_| state.is_terminal())
        .map(|at| (at, id))
}

impl Inner {
    fn get(&self, id: JobId) -> BackendResult<Option<Job>> {
        self.jobs.get(&id).map(|s| s.to_job(id)).transpose()
    }

    /// Stores `job` (at version 1) as `payload`, its payload's text. Returns the existing job
    /// when the owner's idempotency key is live, `None` when stored.
    /// The owner's counts for quotas.
    fn counts(&self, owner: &str, since: DateTime<Utc>) -> OwnerCounts {
        let Some(index) = self.owners.get(owner) else {
            return OwnerCounts::default();
        };
        // Every job recent (an owner within its quota): no search.
        let before = if index.by_creation.front().is_none_or(|(c, _)| *c >= since) {
            0
        } else {
            index
                .by_creation
                .partition_point(|(created, _)| *created < since)
        };
        OwnerCounts {
            created_since: (index.by_creation.len() - before) as u64,
            active: index.active,
        }
    }

    fn insert(
        &mut self,
        job: &Job,
        payload: Box<str>,
        idempotency_ttl: Duration,
        now: DateTime<Utc>,
    ) -> BackendResult<Option<Job>> {
        if let Some(key) = &job.idempotency_key {
            if let Some(existing) = self.live_idempotent(&job.owner, key, now) {
                if let Some(existing) = self.get(existing)? {
                    return Ok(Some(existing));
                }
            }
        }
        if self.jobs.contains_key(&job.id) {
            return Err(BackendError::AlreadyExists(job.id));
        }
        self.make_room()?;
        let kind = intern(&mut self.kinds, &job.kind);
        let owner_name = match self.owners.get_key_value(job.owner.as_str()) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(job.owner.as_str()),
        };
        let mut stored = Stored::new(job, payload, kind, Arc::clone(&owner_name));
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
        // Jobs come in creation order: an append, without the binary search whose probes each
        // miss the cache once an owner has many jobs.
        if owner.by_creation.back().is_none_or(|last| *last <= entry) {
            owner.by_creation.push_back(entry);
        } else {
            let at = owner.by_creation.partition_point(|e| *e <= entry);
            owner.by_creation.insert(at, entry);
        }
        owner.active += u64::from(!job.state.is_terminal());
        if let Some(key) = finished_key(job.id, job.state, job.finished_at) {
            self.finished.insert(key);
        }
        self.jobs.insert(job.id, Box::new(stored));
        Ok(None)
    }

    /// Under a bound, evicts the oldest finished job when the store is full, or refuses.
    fn make_room(&mut self) -> BackendResult<()> {
        let Some(max) = self.max_jobs else {
            return Ok(());
        };
        while self.jobs.len() >= max {
            let Some((_, id)) = self.finished.pop_first() else {
                return Err(BackendError::Full {
                    backend: "memory",
                    message: format!(
                        "store full: it keeps at most {max} jobs and none of them is finished"
                    ),
                });
            };
            let Some(stored) = self.remove(id) else {
                continue;
            };
            if let Some(hook) = &self.on_evict {
                (hook.0)(id);
                if stored.result.is_none() {
                    // The hook saw to the rest: nothing is left for the purge to delete.
                    continue;
                }
            }
            // Only what the purge needs is kept, so evicting frees the job's memory.
            self.evicted.push(Evicted {
                id,
                kind: stored.kind,
                owner: stored.owner,
                state: stored.state,
                finished_at: stored.finished_at,
                result: stored.result,
            });
        }
        Ok(())
    }

    /// Removes a job and every index entry of it.
    fn remove(&mut self, id: JobId) -> Option<Box<Stored>> {
        let stored = self.jobs.remove(&id)?;
        if let Some(key) = finished_key(id, stored.state, stored.finished_at) {
            self.finished.remove(&key);
        }
        if let Some(key) = &stored.idempotency_key {
            let slot = (Arc::clone(&stored.owner), key.clone());
            if self
                .idempotency
                .get(&slot)
                .is_some_and(|(held, _)| *held == id)
            {
                self.idempotency.remove(&slot);
            }
        }
        if let Some(owner) = self.owners.get_mut(&stored.owner) {
            let entry = (stored.created_at, id);
            if let Ok(at) = owner.by_creation.binary_search(&entry) {
                owner.by_creation.remove(at);
            }
            if !stored.state.is_terminal() {
                owner.active = owner.active.saturating_sub(1);
            }
            if owner.by_creation.is_empty() {
                self.owners.remove(&stored.owner);
            }
        }
        Some(stored)
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

/// `now` for an insert: read only for idempotency keys, its only use there.
fn insert_clock(job: &Job) -> DateTime<Utc> {
    if job.idempotency_key.is_some() {
        Utc::now()
    } else {
        DateTime::<Utc>::MIN_UTC
    }
}

/// What an insert answers, given the live job holding the key if there was one.
fn inserted(job: &Job, existing: Option<Job>) -> Inserted {
    match existing {
        Some(existing) => Inserted::Existing(existing),
        None => {
            let mut inserted = job.clone();
            inserted.version = 1;
            Inserted::New(inserted)
        }
    }
}

#[async_trait]
impl JobStore for MemoryJobStore {
    async fn insert(&self, job: &Job, idempotency_ttl: Duration) -> BackendResult<Inserted> {
        // Serialized and cloned outside the lock, which every other call waits for.
        let payload = payload_text(&job.payload)?;
        let existing =
            lock(&self.inner).insert(job, payload, idempotency_ttl, insert_clock(job))?;
        Ok(inserted(job, existing))
    }

    async fn insert_within(
        &self,
        job: &Job,
        idempotency_ttl: Duration,
        quota: &OwnerQuota,
    ) -> BackendResult<Result<Inserted, QuotaHit>> {
        let payload = payload_text(&job.payload)?;
        let now = insert_clock(job);
        // One lock for the count and the insert: concurrent submits cannot pass together.
        let mut inner = lock(&self.inner);
        let key_held = job
            .idempotency_key
            .as_ref()
            .is_some_and(|key| inner.live_idempotent(&job.owner, key, now).is_some());
        if !key_held {
            if let Some(hit) = quota.check(&inner.counts(&job.owner, quota.since)) {
                return Ok(Err(hit));
            }
        }
        let existing = inner.insert(job, payload, idempotency_ttl, now)?;
        drop(inner);
        Ok(Ok(inserted(job, existing)))
    }

    async fn insert_many(&self, jobs: &[Job]) -> BackendResult<()> {
        let payloads = jobs
            .iter()
            .map(|job| payload_text(&job.payload))
            .collect::<BackendResult<Vec<_>>>()?;
        let mut inner = lock(&self.inner);
        let now = Utc::now();
        for (job, payload) in jobs.iter().zip(payloads) {
            inner.insert(job, payload, Duration::ZERO, now)?;
        }
        Ok(())
    }

    async fn get(&self, id: JobId) -> BackendResult<Option<Job>> {
        lock(&self.inner).get(id)
    }

    async fn update(&self, job: &Job) -> BackendResult<Job> {
        let payload = payload_text(&job.payload)?;
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
        let mut next = Stored::new(job, payload, kind, owner);
        next.version = stored.version + 1;
        let (was, is) = (!stored.state.is_terminal(), !next.state.is_terminal());
        let finished_before = finished_key(job.id, stored.state, stored.finished_at);
        let finished_after = finished_key(job.id, next.state, next.finished_at);
        **stored = next;
        if finished_before != finished_after {
            if let Some(key) = finished_before {
                inner.finished.remove(&key);
            }
            if let Some(key) = finished_after {
                inner.finished.insert(key);
            }
        }
        if was != is {
            if let Some(owner) = inner.owners.get_mut(job.owner.as_str()) {
                owner.active = if is {
                    owner.active + 1
                } else {
                    owner.active.saturating_sub(1)
                };
            }
        }
        drop(guard);
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
        Ok(lock(&self.inner).counts(owner, since))
    }

    async fn purge_finished(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> BackendResult<Vec<Job>> {
        let mut inner = lock(&self.inner);
        let evicted = inner.evicted.len().min(limit);
        let mut purged: Vec<Job> = inner.evicted.drain(..evicted).map(|e| e.to_job()).collect();
        while purged.len() < limit {
            let Some(&(at, id)) = inner.finished.first() else {
                break;
            };
            if at >= finished_before {
                break;
            }
            // Read before removal, so a job that cannot be read stays rather than vanishing.
            let job = inner.get(id)?;
            inner.remove(id);
            purged.extend(job);
        }
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

    fn finished(owner: &str, at: DateTime<Utc>) -> Job {
        let mut job = Job::new("k", owner, serde_json::Value::Null);
        job.start(1, at).unwrap();
        job.complete(
            Some(JobResult {
                blob_key: format!("results/{}.zip", job.id),
                size: 1,
                file_name: "x.zip".into(),
                content_type: None,
            }),
            at,
        )
        .unwrap();
        job
    }

    #[tokio::test]
    async fn a_full_store_evicts_the_oldest_finished_job_for_the_next_purge() {
        let store = MemoryJobStore::with_max_jobs(3);
        let now = Utc::now();
        let old = finished("a", now - chrono::Duration::seconds(20));
        let newer = finished("a", now - chrono::Duration::seconds(10));
        let active = Job::new("k", "a", serde_json::Value::Null);
        for job in [&newer, &old, &active] {
            store.insert(job, Duration::ZERO).await.unwrap();
        }
        let next = Job::new("k", "b", serde_json::Value::Null);
        store.insert(&next, Duration::ZERO).await.unwrap();
        assert_eq!(store.len(), 3);
        assert!(
            store.get(old.id).await.unwrap().is_none(),
            "the oldest finished goes"
        );
        for kept in [&newer, &active, &next] {
            assert!(store.get(kept.id).await.unwrap().is_some());
        }
        let counts = store
            .count_by_owner("a", now - chrono::Duration::hours(1))
            .await
            .unwrap();
        assert_eq!(
            counts,
            OwnerCounts {
                created_since: 2,
                active: 1
            }
        );
        // However young, the evicted job comes out of the next purge with its result, so the
        // purge deletes its result and events too.
        let purged = store
            .purge_finished(now - chrono::Duration::hours(1), 10)
            .await
            .unwrap();
        assert_eq!(purged.len(), 1);
        assert_eq!(purged[0].id, old.id);
        assert_eq!(purged[0].result, old.result);
        assert!(
            store
                .purge_finished(now - chrono::Duration::hours(1), 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn the_evict_hook_hears_of_each_eviction_and_the_purge_keeps_only_results() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let store = MemoryJobStore::with_max_jobs(1).on_evict({
            let heard = Arc::clone(&heard);
            move |id| lock(&heard).push(id)
        });
        let now = Utc::now();
        let with_result = finished("a", now);
        let mut without = Job::new("k", "a", serde_json::Value::Null);
        without.start(1, now).unwrap();
        without.fail(JobError::validation("x"), now).unwrap();
        let last = Job::new("k", "a", serde_json::Value::Null);
        for job in [&with_result, &without, &last] {
            store.insert(job, Duration::ZERO).await.unwrap();
        }
        assert_eq!(*lock(&heard), [with_result.id, without.id]);
        let purged = store.purge_finished(now, 10).await.unwrap();
        let ids: Vec<JobId> = purged.iter().map(|j| j.id).collect();
        assert_eq!(
            ids,
            [with_result.id],
            "only the job with a result is left to purge"
        );
    }

    #[tokio::test]
    async fn a_store_full_of_unfinished_jobs_refuses_until_one_finishes() {
        let store = MemoryJobStore::with_max_jobs(2);
        let mut first = Job::new("k", "a", serde_json::Value::Null);
        for job in [&first, &Job::new("k", "a", serde_json::Value::Null)] {
            store.insert(job, Duration::ZERO).await.unwrap();
        }
        let refused = store
            .insert(&Job::new("k", "a", serde_json::Value::Null), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(refused, BackendError::Full { .. }), "{refused}");
        assert!(refused.is_transient());
        assert!(refused.to_string().contains("store full"), "{refused}");

        first.version = 1;
        first.start(1, Utc::now()).unwrap();
        let mut first = store.update(&first).await.unwrap();
        first.fail(JobError::validation("x"), Utc::now()).unwrap();
        store.update(&first).await.unwrap();
        store
            .insert(&Job::new("k", "a", serde_json::Value::Null), Duration::ZERO)
            .await
            .unwrap();
        assert!(store.get(first.id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn purge_takes_the_oldest_finished_first_and_leaves_the_rest() {
        let store = MemoryJobStore::new();
        let now = Utc::now();
        let jobs: Vec<Job> = (0..5)
            .map(|i| finished("a", now - chrono::Duration::seconds(100 - i)))
            .collect();
        for job in jobs.iter().rev() {
            store.insert(job, Duration::ZERO).await.unwrap();
        }
        let purged = store.purge_finished(now, 2).await.unwrap();
        let ids: Vec<JobId> = purged.iter().map(|j| j.id).collect();
        assert_eq!(ids, [jobs[0].id, jobs[1].id]);
        assert_eq!(store.len(), 3);
        let listed = store.list_by_owner("a", 10).await.unwrap();
        assert_eq!(listed.len(), 3);
    }
}
