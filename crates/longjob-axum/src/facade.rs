//! The facade the routes program against. TEMPORARY STUB until core's facade lands on main:
//! same shapes, every operation answers "unavailable".

use std::sync::Arc;

use chrono::{DateTime, Utc};
use longjob_core::bus::EventStream;
use longjob_core::{BackendError, BlobStore, Job, JobId, JobState};

use crate::ApiError;

/// Stub of core's `LongJobError`.
#[derive(Debug, thiserror::Error)]
pub enum LongJobError {
    /// Unknown job or not the caller's.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// Wrong state.
    #[error("job {id} is {state:?}")]
    InvalidState {
        /// The job.
        id: JobId,
        /// Its state.
        state: JobState,
    },
    /// Result gone.
    #[error("gone")]
    Gone(JobId),
    /// Quota.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// Invalid input.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Backend.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Maps a facade error to the API's error.
pub(crate) fn api_error(e: LongJobError) -> ApiError {
    match e {
        LongJobError::NotFound(id) => ApiError::not_found(format!("job {id} not found")),
        LongJobError::InvalidState { id, state } => {
            ApiError::conflict(format!("job {id} is {}", state.as_str()))
        }
        LongJobError::Gone(id) => ApiError::new(
            axum::http::StatusCode::GONE,
            "gone",
            format!("the result of job {id} has expired or was deleted"),
        ),
        LongJobError::QuotaExceeded(m) => ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            m,
        ),
        LongJobError::Invalid(m) => ApiError::validation(m),
        LongJobError::Backend(e) => ApiError::backend(&e),
    }
}

/// Stub of core's `SubmitRequest`.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// kind
    pub kind: String,
    /// owner
    pub owner: String,
    /// payload
    pub payload: serde_json::Value,
    /// items
    pub items: Vec<String>,
    /// key
    pub idempotency_key: Option<String>,
}

impl SubmitRequest {
    /// new
    pub fn new(
        kind: impl Into<String>,
        owner: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            kind: kind.into(),
            owner: owner.into(),
            payload,
            items: Vec::new(),
            idempotency_key: None,
        }
    }
    /// items
    pub fn items(mut self, items: Vec<String>) -> Self {
        self.items = items;
        self
    }
    /// key
    pub fn idempotency_key(mut self, key: Option<String>) -> Self {
        self.idempotency_key = key;
        self
    }
}

/// Stub.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// job
    pub job: Job,
    /// created
    pub created: bool,
}

/// Stub.
#[derive(Debug, Clone)]
pub struct DownloadUrl {
    /// url
    pub url: String,
    /// expires_at
    pub expires_at: DateTime<Utc>,
    /// expires_in
    pub expires_in: u64,
    /// size
    pub size: u64,
    /// file_name
    pub file_name: String,
}

/// Stub.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// checks
    pub checks: Vec<(&'static str, Result<(), String>)>,
}

/// Stub of the facade.
#[derive(Debug, Clone)]
pub struct LongJob {
    blobs: Arc<dyn BlobStore>,
}

fn down() -> LongJobError {
    LongJobError::Backend(BackendError::Unavailable {
        backend: "stub",
        message: "stub".into(),
        source: None,
    })
}

#[allow(clippy::unused_async, missing_docs)]
impl LongJob {
    pub fn stub(blobs: Arc<dyn BlobStore>) -> Self {
        Self { blobs }
    }
    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }
    pub async fn submit(&self, _r: SubmitRequest) -> Result<Submitted, LongJobError> {
        Err(down())
    }
    pub async fn status(&self, _id: JobId, _owner: &str) -> Result<Job, LongJobError> {
        Err(down())
    }
    pub async fn retry(&self, _id: JobId, _owner: &str) -> Result<Job, LongJobError> {
        Err(down())
    }
    pub async fn cancel(&self, _id: JobId, _owner: &str) -> Result<Job, LongJobError> {
        Err(down())
    }
    pub async fn download_url(
        &self,
        _id: JobId,
        _owner: &str,
    ) -> Result<DownloadUrl, LongJobError> {
        Err(down())
    }
    pub async fn subscribe(
        &self,
        _id: JobId,
        _owner: &str,
        _after: u64,
    ) -> Result<(Job, EventStream), LongJobError> {
        Err(down())
    }
    pub async fn health(&self) -> HealthReport {
        HealthReport { checks: vec![] }
    }
}
