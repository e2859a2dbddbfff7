//! Errors: the classified error a job fails with, and the error every backend returns.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::JobId;

/// The class of a job failure. It decides whether the failure is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A network failure talking to a source or a peer.
    Network,
    /// Something took longer than its deadline.
    Timeout,
    /// Reading or writing blob storage failed.
    Storage,
    /// The input is wrong; retrying cannot help, so it is never retried.
    Validation,
    /// Anything else.
    Internal,
}

impl ErrorKind {
    /// Whether a failure of this kind may be retried. Only `validation` may not.
    pub const fn is_retryable(self) -> bool {
        !matches!(self, Self::Validation)
    }

    /// The kind's name as it appears in the API (`network`, `timeout`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Timeout => "timeout",
            Self::Storage => "storage",
            Self::Validation => "validation",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job (or one attempt of it) failed: a kind and a message meant for the job's owner.
///
/// ```
/// use longjob_core::{ErrorKind, JobError};
///
/// let e = JobError::validation("no file is available");
/// assert_eq!(e.kind, ErrorKind::Validation);
/// assert!(!e.is_retryable());
/// assert!(JobError::network("connection reset").is_retryable());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct JobError {
    /// The class of the failure.
    pub kind: ErrorKind,
    /// A message for the owner of the job; no internals.
    pub message: String,
}

impl JobError {
    /// An error of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A `network` error.
    pub fn network(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Network, message)
    }

    /// A `timeout` error.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }

    /// A `storage` error.
    pub fn storage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Storage, message)
    }

    /// A `validation` error: never retried.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, message)
    }

    /// An `internal` error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Whether this failure may be retried.
    pub const fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }
}

impl From<BackendError> for JobError {
    fn from(e: BackendError) -> Self {
        let kind = match &e {
            BackendError::Timeout { .. } => ErrorKind::Timeout,
            BackendError::Unavailable { .. } => ErrorKind::Network,
            _ => ErrorKind::Internal,
        };
        Self::new(kind, e.to_string())
    }
}

/// The boxed source of a backend error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a backend (`JobStore`, `Queue`, `ProgressBus`, `BlobStore`) returns when an operation fails.
///
/// Variants are classified so that callers can react: [`Conflict`](Self::Conflict) and
/// [`Fenced`](Self::Fenced) are answers, not faults; [`Unavailable`](Self::Unavailable) and
/// [`Timeout`](Self::Timeout) are transient and worth retrying ([`BackendError::is_transient`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// A compare-and-set write named a version that is no longer current.
    #[error("version conflict on job {id}: expected version {expected}, found {actual}")]
    Conflict {
        /// The job written.
        id: JobId,
        /// The version the writer read.
        expected: u64,
        /// The version stored now.
        actual: u64,
    },
    /// A write carried a fencing token older than the job's current one: its lease was lost.
    #[error("job {id}: fencing token {token} is stale (current {current}); the lease was lost")]
    Fenced {
        /// The job written.
        id: JobId,
        /// The writer's token.
        token: u64,
        /// The token stored now.
        current: u64,
    },
    /// The job does not exist.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// A job with this id exists already.
    #[error("job {0} already exists")]
    AlreadyExists(JobId),
    /// A blob key or another argument is not acceptable to the backend.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The backend could not be reached or refused service; transient.
    #[error("{backend} unavailable: {message}")]
    Unavailable {
        /// Which backend (`redis`, `postgres`, `s3`, `local-disk`, …).
        backend: &'static str,
        /// What went wrong, for logs.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend did not answer in time; transient.
    #[error("{backend} timed out after {after:?}")]
    Timeout {
        /// Which backend.
        backend: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// The backend rejected the credentials or the permissions.
    #[error("{backend} denied access: {message}")]
    Unauthorized {
        /// Which backend.
        backend: &'static str,
        /// What the backend said.
        message: String,
    },
    /// The backend holds as much as it is allowed to and can take nothing new until something
    /// leaves (a bounded in-memory store whose jobs are all unfinished); transient.
    #[error("{backend} full: {message}")]
    Full {
        /// Which backend.
        backend: &'static str,
        /// What is full, for the caller.
        message: String,
    },
    /// Stored data could not be decoded, or the backend answered something unexpected.
    #[error("{backend}: corrupt or unexpected data: {message}")]
    Corrupt {
        /// Which backend.
        backend: &'static str,
        /// What was wrong.
        message: String,
    },
}

impl BackendError {
    /// An [`Unavailable`](Self::Unavailable) error with its source.
    pub fn unavailable(
        backend: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            backend,
            message: source.to_string(),
            source: Some(Box::new(source)),
        }
    }

    /// A [`Corrupt`](Self::Corrupt) error.
    pub fn corrupt(backend: &'static str, message: impl fmt::Display) -> Self {
        Self::Corrupt {
            backend,
            message: message.to_string(),
        }
    }

    /// The same error for another caller (a batch's answer shared by each of its requests):
    /// sources are not clonable, so a shared copy keeps their message only.
    pub fn share(&self) -> Self {
        match self {
            Self::Conflict {
                id,
                expected,
                actual,
            } => Self::Conflict {
                id: *id,
                expected: *expected,
                actual: *actual,
            },
            Self::Fenced { id, token, current } => Self::Fenced {
                id: *id,
                token: *token,
                current: *current,
            },
            Self::NotFound(id) => Self::NotFound(*id),
            Self::AlreadyExists(id) => Self::AlreadyExists(*id),
            Self::InvalidArgument(m) => Self::InvalidArgument(m.clone()),
            Self::Unavailable {
                backend, message, ..
            } => Self::Unavailable {
                backend,
                message: message.clone(),
                source: None,
            },
            Self::Timeout { backend, after } => Self::Timeout {
                backend,
                after: *after,
            },
            Self::Unauthorized { backend, message } => Self::Unauthorized {
                backend,
                message: message.clone(),
            },
            Self::Full { backend, message } => Self::Full {
                backend,
                message: message.clone(),
            },
            Self::Corrupt { backend, message } => Self::Corrupt {
                backend,
                message: message.clone(),
            },
        }
    }

    /// Whether retrying the same call later may succeed.
    pub const fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Timeout { .. } | Self::Full { .. }
        )
    }
}

/// The result type of backend operations.
pub type BackendResult<T> = Result<T, BackendError>;
