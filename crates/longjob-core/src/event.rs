//! Events a job emits while it runs, as the progress bus carries them and the API sends them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Job, JobError, JobId, JobState, Progress};

/// One event of a job, with its per-job sequence number.
///
/// Serialized exactly as the API sends it over SSE and WebSocket:
///
/// ```
/// use longjob_core::{EventPayload, JobEvent, JobId, Progress};
///
/// let event = JobEvent {
///     seq: 7,
///     job_id: JobId::new(),
///     at: chrono::Utc::now(),
///     payload: EventPayload::Progress { progress: Progress { current: 1, total: 4, ..Default::default() } },
/// };
/// let json = serde_json::to_value(&event).unwrap();
/// assert_eq!(json["type"], "progress");
/// assert_eq!(json["progress"]["percentage"], 25.0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobEvent {
    /// Grows by one per event of a job, across processes and restarts; assigned by the bus.
    pub seq: u64,
    /// The job it belongs to.
    pub job_id: JobId,
    /// When it was published.
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub at: DateTime<Utc>,
    /// What happened.
    #[serde(flatten)]
    pub payload: EventPayload,
}

impl JobEvent {
    /// Whether no event of the job follows this one (until a manual retry).
    pub const fn is_terminal(&self) -> bool {
        self.payload.is_terminal()
    }
}

/// What an event says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventPayload {
    /// The job's state changed (or, first on every stream, a snapshot of it).
    #[serde(rename_all = "camelCase")]
    Status {
        /// The state now.
        status: JobState,
        /// Attempts started so far.
        attempt: u32,
        /// The last failure, while retrying.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<JobError>,
        /// When the next attempt runs, while retrying.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            serialize_with = "crate::rfc3339::serialize_opt",
            deserialize_with = "crate::rfc3339::deserialize_opt"
        )]
        next_run_at: Option<DateTime<Utc>>,
        /// The progress at that moment.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<Progress>,
    },
    /// The handler reported progress.
    Progress {
        /// The progress now.
        progress: Progress,
    },
    /// The job completed.
    #[serde(rename_all = "camelCase")]
    Completed {
        /// A presigned URL of the result, when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        download_url: Option<String>,
        /// When that URL stops working.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            serialize_with = "crate::rfc3339::serialize_opt",
            deserialize_with = "crate::rfc3339::deserialize_opt"
        )]
        expires_at: Option<DateTime<Utc>>,
        /// The result's size in bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
    },
    /// The job failed for good.
    Failed {
        /// Why.
        error: JobError,
        /// Attempts made.
        attempt: u32,
    },
    /// The job was cancelled.
    Cancelled {},
}

impl EventPayload {
    /// The [`type_name`](Self::type_name)s of the terminal events, for backends that recognise
    /// them in stored JSON (the `type` field).
    pub const TERMINAL_TYPE_NAMES: [&'static str; 3] = ["completed", "failed", "cancelled"];

    /// Whether no event of the job follows this one (until a manual retry).
    pub const fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Completed { .. } | Self::Failed { .. } | Self::Cancelled {}
        )
    }

    /// A `status` payload describing `job` as it is.
    pub fn status_of(job: &Job) -> Self {
        Self::Status {
            status: job.state,
            attempt: job.attempt,
            error: job.error.clone(),
            next_run_at: job.run_at.filter(|_| job.state == JobState::Retrying),
            progress: Some(job.progress),
        }
    }

    /// The event type's name (`status`, `progress`, `completed`, `failed`, `cancelled`).
    pub const fn type_name(&self) -> &'static str {
        match self {
            Self::Status { .. } => "status",
            Self::Progress { .. } => "progress",
            Self::Completed { .. } => "completed",
            Self::Failed { .. } => "failed",
            Self::Cancelled {} => "cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_payload() {
        let payloads = [
            EventPayload::Status {
                status: JobState::Retrying,
                attempt: 2,
                error: Some(JobError::network("reset")),
                next_run_at: Some(Utc::now()),
                progress: None,
            },
            EventPayload::Progress {
                progress: Progress::default(),
            },
            EventPayload::Completed {
                download_url: Some("http://x".into()),
                expires_at: None,
                size: Some(3),
            },
            EventPayload::Failed {
                error: JobError::validation("bad"),
                attempt: 1,
            },
            EventPayload::Cancelled {},
        ];
        for payload in payloads {
            let event = JobEvent {
                seq: 1,
                job_id: JobId::new(),
                at: Utc::now(),
                payload,
            };
            let json = serde_json::to_string(&event).unwrap();
            assert!(json.contains(&format!("\"type\":\"{}\"", event.payload.type_name())));
            let back: JobEvent = serde_json::from_str(&json).unwrap();
            assert_eq!(back, event);
            assert_eq!(
                EventPayload::TERMINAL_TYPE_NAMES.contains(&event.payload.type_name()),
                event.is_terminal(),
                "{}",
                event.payload.type_name()
            );
        }
    }
}
