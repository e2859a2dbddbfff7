//! The job record every store keeps, and the operations that change it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::state::{InvalidTransition, JobState, Transition, next_state};
use crate::{JobError, JobId};

/// What happened to one item of a job (one file of a download).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    /// Not processed yet (or to be processed again after a retry).
    Pending,
    /// Done; a retry does not redo it.
    Completed,
    /// Deliberately left out (for example: not available); a retry does not redo it.
    Skipped,
    /// Failed; a retry redoes it.
    Failed,
}

impl ItemStatus {
    /// Whether the item is finished for good: a retry leaves it alone.
    pub const fn is_done(self) -> bool {
        matches!(self, Self::Completed | Self::Skipped)
    }
}

/// The record of one item of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemRecord {
    /// The item's id within its job (a download's file id).
    pub id: String,
    /// Its outcome so far.
    pub status: ItemStatus,
    /// Its size in bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Why it failed or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ItemRecord {
    /// A pending item.
    pub fn pending(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            status: ItemStatus::Pending,
            size: None,
            error: None,
        }
    }
}

/// A snapshot of a job's progress.
///
/// Serialized as the API's progress object, with a derived `percentage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", into = "ProgressWire", from = "ProgressWire")]
pub struct Progress {
    /// Units processed so far, whatever their outcome.
    pub current: u64,
    /// Units in all (0 when unknown).
    pub total: u64,
    /// Bytes produced so far.
    pub bytes_done: u64,
    /// Estimated time remaining, in milliseconds.
    pub eta_ms: Option<u64>,
}

impl Progress {
    /// `current / total` as a percentage with one decimal (0 when the total is unknown).
    ///
    /// ```
    /// use longjob_core::Progress;
    /// let p = Progress { current: 2, total: 3, ..Progress::default() };
    /// assert_eq!(p.percentage(), 66.7);
    /// ```
    pub fn percentage(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let ratio = self.current.min(self.total) as f64 / self.total as f64;
        (ratio * 1000.0).round() / 10.0
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProgressWire {
    current: u64,
    total: u64,
    #[serde(default)]
    percentage: f64,
    #[serde(default)]
    bytes_done: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    estimated_time_remaining_ms: Option<u64>,
}

impl From<Progress> for ProgressWire {
    fn from(p: Progress) -> Self {
        Self {
            current: p.current,
            total: p.total,
            percentage: p.percentage(),
            bytes_done: p.bytes_done,
            estimated_time_remaining_ms: p.eta_ms,
        }
    }
}

impl From<ProgressWire> for Progress {
    fn from(w: ProgressWire) -> Self {
        Self {
            current: w.current,
            total: w.total,
            bytes_done: w.bytes_done,
            eta_ms: w.estimated_time_remaining_ms,
        }
    }
}

/// Where a completed job's result lives in blob storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    /// The blob's key.
    pub blob_key: String,
    /// Its size in bytes.
    pub size: u64,
    /// The file name offered to the downloader.
    pub file_name: String,
    /// Its media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// A job, as every [`JobStore`](crate::JobStore) keeps it.
///
/// Its state changes only through the methods below, which ask [`next_state`] and keep the
/// record's other fields consistent with the state. `version` is the store's: every write
/// compares it and bumps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Which handler runs it.
    pub kind: String,
    /// Who submitted it; only they can see it.
    pub owner: String,
    /// The handler's input.
    pub payload: serde_json::Value,
    /// Where it is in its life.
    pub state: JobState,
    /// Attempts started so far.
    pub attempt: u32,
    /// Attempts allowed before it fails for good.
    pub max_attempts: u32,
    /// The latest progress written to the store.
    pub progress: Progress,
    /// Per-item records (a download's files).
    #[serde(default)]
    pub items: Vec<ItemRecord>,
    /// The last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// The result, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
    /// The submitter's idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// When it was submitted.
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub created_at: DateTime<Utc>,
    /// When it was last written.
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub updated_at: DateTime<Utc>,
    /// When its latest attempt started.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::rfc3339::serialize_opt",
        deserialize_with = "crate::rfc3339::deserialize_opt"
    )]
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal state.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::rfc3339::serialize_opt",
        deserialize_with = "crate::rfc3339::deserialize_opt"
    )]
    pub finished_at: Option<DateTime<Utc>>,
    /// When it runs next (a delayed submit, or the next attempt while retrying).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::rfc3339::serialize_opt",
        deserialize_with = "crate::rfc3339::deserialize_opt"
    )]
    pub run_at: Option<DateTime<Utc>>,
    /// The fencing token of the lease that last started it. A write carrying a smaller token is
    /// rejected by the store: its writer lost the lease.
    #[serde(default)]
    pub lease_token: u64,
    /// Compare-and-set version, bumped by every write.
    #[serde(default)]
    pub version: u64,
}

impl Job {
    /// A new queued job of `kind` for `owner`, with one attempt allowed until
    /// [`with_max_attempts`](Self::with_max_attempts) says otherwise.
    ///
    /// ```
    /// use longjob_core::{Job, JobState};
    ///
    /// let job = Job::new("report", "alice", serde_json::json!({"month": 11}))
    ///     .with_items(["a", "b"])
    ///     .with_max_attempts(3);
    /// assert_eq!(job.state, JobState::Queued);
    /// assert_eq!(job.progress.total, 2);
    /// ```
    pub fn new(
        kind: impl Into<String>,
        owner: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        let now = Utc::now();
        Self {
            id: JobId::new(),
            kind: kind.into(),
            owner: owner.into(),
            payload,
            state: JobState::Queued,
            attempt: 0,
            max_attempts: 1,
            progress: Progress::default(),
            items: Vec::new(),
            error: None,
            result: None,
            idempotency_key: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            run_at: None,
            lease_token: 0,
            version: 0,
        }
    }

    /// Sets the attempts allowed (at least 1).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Sets pending item records, one per id.
    pub fn with_items<I>(mut self, ids: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.items = ids.into_iter().map(ItemRecord::pending).collect();
        self.recount_items();
        self
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Delays the first run until `at`.
    pub fn with_run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Whether another attempt may start.
    pub const fn has_attempts_left(&self) -> bool {
        self.attempt < self.max_attempts
    }

    fn transition(&mut self, t: Transition, now: DateTime<Utc>) -> Result<(), InvalidTransition> {
        self.state = next_state(self.state, t)?;
        self.updated_at = now;
        Ok(())
    }

    /// A worker holding the lease `lease_token` starts an attempt.
    pub fn start(&mut self, lease_token: u64, now: DateTime<Utc>) -> Result<(), InvalidTransition> {
        self.transition(Transition::Start, now)?;
        self.attempt = self.attempt.saturating_add(1);
        self.lease_token = lease_token;
        self.started_at = Some(now);
        self.finished_at = None;
        self.run_at = None;
        Ok(())
    }

    /// The handler succeeded, with an optional result blob.
    pub fn complete(
        &mut self,
        result: Option<JobResult>,
        now: DateTime<Utc>,
    ) -> Result<(), InvalidTransition> {
        self.transition(Transition::Complete, now)?;
        self.result = result;
        self.error = None;
        self.finished_at = Some(now);
        self.progress.eta_ms = Some(0);
        Ok(())
    }

    /// The job fails for good with `error`.
    pub fn fail(&mut self, error: JobError, now: DateTime<Utc>) -> Result<(), InvalidTransition> {
        self.transition(Transition::Fail, now)?;
        self.error = Some(error);
        self.finished_at = Some(now);
        self.progress.eta_ms = None;
        Ok(())
    }

    /// The attempt failed with `error`; the next one runs at `run_at`.
    pub fn schedule_retry(
        &mut self,
        error: JobError,
        run_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), InvalidTransition> {
        self.transition(Transition::ScheduleRetry, now)?;
        self.error = Some(error);
        self.run_at = Some(run_at);
        self.progress.eta_ms = None;
        Ok(())
    }

    /// The owner cancels the job.
    pub fn cancel(&mut self, now: DateTime<Utc>) -> Result<(), InvalidTransition> {
        self.transition(Transition::Cancel, now)?;
        self.finished_at = Some(now);
        self.run_at = None;
        self.progress.eta_ms = None;
        Ok(())
    }

    /// The owner asks a failed or cancelled job to run again, with `extra_attempts` more attempts.
    /// Items that completed or were skipped stay done; the others become pending again.
    pub fn requeue(
        &mut self,
        extra_attempts: u32,
        now: DateTime<Utc>,
    ) -> Result<(), InvalidTransition> {
        self.transition(Transition::Requeue, now)?;
        self.max_attempts = self.attempt.saturating_add(extra_attempts.max(1));
        self.error = None;
        self.result = None;
        self.finished_at = None;
        self.run_at = None;
        for item in &mut self.items {
            if !item.status.is_done() {
                item.status = ItemStatus::Pending;
                item.error = None;
            }
        }
        self.recount_items();
        self.progress.eta_ms = None;
        Ok(())
    }

    /// Records the outcome of the item `id` (ignored when no such item exists) and recounts
    /// the progress. Returns whether the item exists.
    pub fn record_item(
        &mut self,
        id: &str,
        status: ItemStatus,
        size: Option<u64>,
        error: Option<String>,
    ) -> bool {
        let Some(item) = self.items.iter_mut().find(|i| i.id == id) else {
            return false;
        };
        item.status = status;
        item.size = size.or(item.size);
        item.error = error;
        self.recount_items();
        true
    }

    /// Sets `progress.current` and `progress.total` from the item records (when there are any).
    pub fn recount_items(&mut self) {
        recount(&self.items, &mut self.progress);
    }
}

/// Sets `progress.current`, `total` and `bytes_done` from `items` (when there are any): items
/// processed whatever their outcome, all items, and the sizes of the completed ones.
pub fn recount(items: &[ItemRecord], progress: &mut Progress) {
    if items.is_empty() {
        return;
    }
    progress.total = items.len() as u64;
    progress.current = items
        .iter()
        .filter(|i| i.status != ItemStatus::Pending)
        .count() as u64;
    progress.bytes_done = items
        .iter()
        .filter(|i| i.status == ItemStatus::Completed)
        .filter_map(|i| i.size)
        .sum();
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Start(u64),
        Complete,
        Fail,
        Retry,
        Cancel,
        Requeue(u32),
        Item(usize, ItemStatus),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..100).prop_map(Op::Start),
            Just(Op::Complete),
            Just(Op::Fail),
            Just(Op::Retry),
            Just(Op::Cancel),
            (0u32..4).prop_map(Op::Requeue),
            (
                0usize..4,
                prop_oneof![
                    Just(ItemStatus::Pending),
                    Just(ItemStatus::Completed),
                    Just(ItemStatus::Skipped),
                    Just(ItemStatus::Failed)
                ]
            )
                .prop_map(|(i, s)| Op::Item(i, s)),
        ]
    }

    fn apply(job: &mut Job, op: &Op) -> Result<(), InvalidTransition> {
        let now = Utc::now();
        match op {
            Op::Start(token) => job.start(*token, now),
            Op::Complete => job.complete(None, now),
            Op::Fail => job.fail(JobError::internal("x"), now),
            Op::Retry => job.schedule_retry(JobError::network("x"), now, now),
            Op::Cancel => job.cancel(now),
            Op::Requeue(n) => job.requeue(*n, now),
            Op::Item(i, status) => {
                let id = i.to_string();
                job.record_item(&id, *status, Some(10), None);
                Ok(())
            }
        }
    }

    fn check_invariants(job: &Job) {
        use JobState as S;
        assert_eq!(
            job.state.is_terminal(),
            job.finished_at.is_some(),
            "{job:?}"
        );
        match job.state {
            S::Running => assert!(job.started_at.is_some() && job.attempt >= 1),
            S::Retrying => assert!(job.run_at.is_some() && job.error.is_some()),
            S::Failed => assert!(job.error.is_some()),
            S::Completed => assert!(job.error.is_none()),
            S::Queued => assert!(job.error.is_none() && job.result.is_none()),
            S::Cancelled => {}
        }
        assert!(job.progress.current <= job.progress.total);
        assert_eq!(job.progress.total, job.items.len() as u64);
    }

    proptest! {
        #[test]
        fn random_operations_never_reach_an_illegal_state(ops in proptest::collection::vec(op(), 0..60)) {
            let mut job = Job::new("k", "o", serde_json::Value::Null).with_items(["0", "1", "2"]);
            for op in &ops {
                let before = job.clone();
                match apply(&mut job, op) {
                    Ok(()) => {
                        if let Some(t) = transition_of(op) {
                            prop_assert_eq!(Ok(job.state), next_state(before.state, t));
                        }
                    }
                    // A refused operation leaves the job exactly as it was.
                    Err(_) => prop_assert_eq!(&job, &before),
                }
                check_invariants(&job);
            }
        }
    }

    fn transition_of(op: &Op) -> Option<Transition> {
        Some(match op {
            Op::Start(_) => Transition::Start,
            Op::Complete => Transition::Complete,
            Op::Fail => Transition::Fail,
            Op::Retry => Transition::ScheduleRetry,
            Op::Cancel => Transition::Cancel,
            Op::Requeue(_) => Transition::Requeue,
            Op::Item(..) => return None,
        })
    }

    #[test]
    fn random_walks_reach_every_state() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let mut reached = std::collections::HashSet::new();
        for _ in 0..200 {
            let ops = proptest::collection::vec(op(), 0..30)
                .new_tree(&mut runner)
                .expect("strategy")
                .current();
            let mut job = Job::new("k", "o", serde_json::Value::Null);
            reached.insert(job.state);
            for op in &ops {
                let _ = apply(&mut job, op);
                reached.insert(job.state);
            }
        }
        assert_eq!(
            reached.len(),
            JobState::ALL.len(),
            "reached only {reached:?}"
        );
    }

    #[test]
    fn requeue_keeps_done_items_and_resets_the_rest() {
        let now = Utc::now();
        let mut job = Job::new("k", "o", serde_json::Value::Null).with_items(["a", "b", "c"]);
        job.start(1, now).unwrap();
        job.record_item("a", ItemStatus::Completed, Some(5), None);
        job.record_item("b", ItemStatus::Failed, None, Some("boom".into()));
        job.record_item("c", ItemStatus::Skipped, None, Some("missing".into()));
        job.fail(JobError::network("x"), now).unwrap();
        assert_eq!(job.progress.current, 3);
        job.requeue(3, now).unwrap();
        let statuses: Vec<_> = job.items.iter().map(|i| i.status).collect();
        assert_eq!(
            statuses,
            [
                ItemStatus::Completed,
                ItemStatus::Pending,
                ItemStatus::Skipped
            ]
        );
        assert_eq!(job.progress.current, 2);
        assert_eq!(job.max_attempts, 4);
    }

    #[test]
    fn serializes_running_as_processing() {
        let mut job = Job::new("k", "o", serde_json::Value::Null);
        job.start(1, Utc::now()).unwrap();
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["state"], "processing");
        let back: Job = serde_json::from_value(json).unwrap();
        assert_eq!(back, job);
    }
}
