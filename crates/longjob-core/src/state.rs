//! Job states and the one pure function that decides every state change.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
///
/// ```text
/// Queued ──Start──▶ Running ──Complete──▶ Completed
///                    │  ▲ ──Fail──────▶ Failed ──Requeue──▶ Queued
///        ScheduleRetry  │ Start
///                    ▼  │
///                   Retrying
/// Queued | Retrying | Running ──Cancel──▶ Cancelled ──Requeue──▶ Queued
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// A worker holds a lease on it and runs its handler. Its API name is `processing`.
    #[serde(rename = "processing", alias = "running")]
    Running,
    /// An attempt failed; it waits for its next run.
    Retrying,
    /// Done; the result (if any) is in blob storage.
    Completed,
    /// Failed for good (validation error or attempts exhausted).
    Failed,
    /// Cancelled by its owner.
    Cancelled,
}

impl JobState {
    /// Every state, for tests and metrics.
    pub const ALL: [JobState; 6] = [
        Self::Queued,
        Self::Running,
        Self::Retrying,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// Whether no worker will touch the job again without a manual retry.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The name used in the API, in storage and in metrics (`queued`, `processing`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "processing",
            Self::Retrying => "retrying",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operation that changes a job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// A worker that holds a lease starts an attempt. Also allowed from `Running`: a worker that
    /// took over an expired lease starts a new attempt of a job whose previous worker was lost.
    Start,
    /// The handler succeeded.
    Complete,
    /// The attempt failed and no further attempt will be made.
    Fail,
    /// The attempt failed and another one is scheduled.
    ScheduleRetry,
    /// The owner cancelled the job.
    Cancel,
    /// The owner asked for a failed or cancelled job to run again (manual retry).
    Requeue,
}

impl Transition {
    /// Every transition, for tests.
    pub const ALL: [Transition; 6] = [
        Self::Start,
        Self::Complete,
        Self::Fail,
        Self::ScheduleRetry,
        Self::Cancel,
        Self::Requeue,
    ];
}

/// A transition that is not allowed from the job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {transition:?} a job that is {from}")]
pub struct InvalidTransition {
    /// The state the job was in.
    pub from: JobState,
    /// The transition asked for.
    pub transition: Transition,
}

/// The one function that decides every state change: the state `transition` leads to from `from`,
/// or why it is not allowed. Stores never invent their own transitions.
///
/// ```
/// use longjob_core::{next_state, JobState, Transition};
///
/// assert_eq!(next_state(JobState::Queued, Transition::Start), Ok(JobState::Running));
/// assert!(next_state(JobState::Completed, Transition::Cancel).is_err());
/// ```
pub const fn next_state(
    from: JobState,
    transition: Transition,
) -> Result<JobState, InvalidTransition> {
    use JobState as S;
    use Transition as T;
    let to = match (from, transition) {
        (S::Queued | S::Retrying | S::Running, T::Start) => S::Running,
        (S::Running, T::Complete) => S::Completed,
        (S::Running, T::Fail) => S::Failed,
        (S::Running, T::ScheduleRetry) => S::Retrying,
        (S::Queued | S::Retrying | S::Running, T::Cancel) => S::Cancelled,
        (S::Failed | S::Cancelled, T::Requeue) => S::Queued,
        _ => return Err(InvalidTransition { from, transition }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashSet, VecDeque};

    use super::*;

    #[test]
    fn every_state_is_reachable_from_queued() {
        let mut seen = HashSet::from([JobState::Queued]);
        let mut todo = VecDeque::from([JobState::Queued]);
        while let Some(state) = todo.pop_front() {
            for t in Transition::ALL {
                if let Ok(next) = next_state(state, t) {
                    if seen.insert(next) {
                        todo.push_back(next);
                    }
                }
            }
        }
        assert_eq!(seen.len(), JobState::ALL.len());
    }

    #[test]
    fn terminal_states_only_leave_by_requeue_except_completed() {
        for t in Transition::ALL {
            assert!(next_state(JobState::Completed, t).is_err());
            let from_failed = next_state(JobState::Failed, t);
            assert_eq!(from_failed.is_ok(), t == Transition::Requeue);
        }
    }

    #[test]
    fn names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::parse("processing"), Some(JobState::Running));
        assert_eq!(JobState::parse("running"), None);
    }
}
