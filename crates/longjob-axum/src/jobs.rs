//! The job routes: status, retry, cancel, download URL; and the wire types they answer with.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use longjob_core::{ItemRecord, ItemStatus, Job, JobError, JobId, JobState, Progress, rfc3339};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::{ApiError, AppState};

/// The owner a request acts for, from the router's [`Authenticate`](crate::Authenticate).
#[derive(Debug, Clone)]
pub(crate) struct Owner(pub(crate) String);

impl FromRequestParts<AppState> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.auth.authenticate(&parts.headers).await.map(Owner)
    }
}

/// The owner of a stream request. Browsers cannot set headers on `EventSource` and WebSocket
/// connections, so these two routes also accept the bearer token as `?access_token=`; it is
/// handed to the authenticator as an `Authorization: Bearer` header.
#[derive(Debug, Clone)]
pub(crate) struct StreamOwner(pub(crate) String);

impl FromRequestParts<AppState> for StreamOwner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token =
            axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(
                &parts.uri,
            )
            .ok()
            .and_then(|q| q.0.get("access_token").cloned());
        match token {
            Some(token) if !parts.headers.contains_key(header::AUTHORIZATION) => {
                let mut headers = parts.headers.clone();
                let value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| ApiError::unauthorized("invalid access_token"))?;
                headers.insert(header::AUTHORIZATION, value);
                state.auth.authenticate(&headers).await.map(StreamOwner)
            }
            _ => state
                .auth
                .authenticate(&parts.headers)
                .await
                .map(StreamOwner),
        }
    }
}

/// A job id from the path; anything but a UUID is 400.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JobIdPath(pub(crate) JobId);

impl FromRequestParts<AppState> for JobIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::validation("missing job id"))?;
        raw.parse::<JobId>().map(JobIdPath).map_err(|e| {
            ApiError::validation(e.to_string())
                .with_detail(serde_json::json!({"field": "jobId", "message": "expected a UUID"}))
        })
    }
}

/// A job's progress.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgressBody {
    /// Files processed so far, whatever their outcome.
    pub current: u64,
    /// Files in all.
    pub total: u64,
    /// `current / total`, in percent with one decimal.
    pub percentage: f64,
    /// Bytes produced so far.
    pub bytes_done: u64,
    /// Estimated time remaining.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_time_remaining_ms: Option<u64>,
}

impl From<Progress> for ProgressBody {
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

/// The outcome of one file of a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileBody {
    /// The file's id (a number for the download service's numeric ids).
    #[schema(value_type = i64)]
    pub file_id: Value,
    /// `pending`, `completed`, `skipped` or `failed`.
    #[schema(value_type = String, example = "completed")]
    pub status: ItemStatus,
    /// Its size in bytes, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<&ItemRecord> for FileBody {
    fn from(i: &ItemRecord) -> Self {
        let file_id =
            i.id.parse::<u64>()
                .map_or_else(|_| Value::String(i.id.clone()), Value::from);
        Self {
            file_id,
            status: i.status,
            size: i.size,
            error: i.error.clone(),
        }
    }
}

/// A job's failure.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorKindBody {
    /// `network`, `timeout`, `storage`, `validation` or `internal`.
    #[schema(example = "validation")]
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

impl From<&JobError> for ErrorKindBody {
    fn from(e: &JobError) -> Self {
        Self {
            kind: e.kind.as_str().to_owned(),
            message: e.message.clone(),
        }
    }
}

/// A job's status.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatusBody {
    /// The job's id.
    #[schema(value_type = String, format = Uuid)]
    pub job_id: JobId,
    /// `queued`, `processing`, `retrying`, `completed`, `failed` or `cancelled`.
    #[schema(value_type = String, example = "processing")]
    pub status: JobState,
    /// Its progress.
    pub progress: ProgressBody,
    /// The outcome of each file.
    pub files: Vec<FileBody>,
    /// Attempts started so far.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorKindBody>,
    /// When it was submitted.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub updated_at: DateTime<Utc>,
    /// When its latest attempt started.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339::serialize_opt"
    )]
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339::serialize_opt"
    )]
    pub finished_at: Option<DateTime<Utc>>,
    /// When it runs next, while retrying.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339::serialize_opt"
    )]
    pub next_run_at: Option<DateTime<Utc>>,
}

impl From<&Job> for JobStatusBody {
    fn from(job: &Job) -> Self {
        Self {
            job_id: job.id,
            status: job.state,
            progress: job.progress.into(),
            files: job.items.iter().map(FileBody::from).collect(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            error: job.error.as_ref().map(ErrorKindBody::from),
            created_at: job.created_at,
            updated_at: job.updated_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            next_run_at: job.run_at.filter(|_| job.state == JobState::Retrying),
        }
    }
}

fn etag(job: &Job) -> String {
    format!("\"{}-{}\"", job.id.as_uuid().simple(), job.version)
}

fn matches_etag(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == tag || t == "*")
}

/// `GET {prefix}/job/{jobId}`
#[utoipa::path(get, path = "/v1/download/job/{jobId}", tag = "Jobs",
    summary = "Job status",
    description = "The job's state, progress and per-file outcome. `ETag` with `If-None-Match` gives 304; while the job is not finished the answer carries `Retry-After: 2`, the polling hint.",
    params(("jobId" = String, Path, format = Uuid, description = "The job's id"),
           ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier answer")),
    responses(
        (status = 200, description = "The job", body = JobStatusBody,
            headers(("ETag" = String), ("Retry-After" = u32, description = "2, while unfinished"))),
        (status = 304, description = "Unchanged since the ETag given"),
        (status = 400, description = "Malformed id", body = crate::ErrorBody),
        (status = 404, description = "Unknown job, or not the caller's", body = crate::ErrorBody),
        (status = 503, description = "A backend is down", body = crate::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn status(
    State(state): State<AppState>,
    JobIdPath(id): JobIdPath,
    Owner(owner): Owner,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = state.lj.status(id, &owner).await?;
    let tag = etag(&job);
    let mut res = if matches_etag(&headers, &tag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        axum::Json(JobStatusBody::from(&job)).into_response()
    };
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if !job.state.is_terminal() {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    }
    Ok(res)
}

/// The answer to a retry.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBody {
    /// The job's id.
    #[schema(value_type = String, format = Uuid)]
    pub job_id: JobId,
    /// `queued`.
    #[schema(value_type = String, example = "queued")]
    pub status: JobState,
    /// Attempts started so far.
    pub attempt: u32,
}

/// `POST {prefix}/job/{jobId}/retry`
#[utoipa::path(post, path = "/v1/download/job/{jobId}/retry", tag = "Jobs",
    summary = "Retry a failed or cancelled job",
    description = "Queues the job again; only the files that did not complete are processed again.",
    params(("jobId" = String, Path, format = Uuid)),
    responses(
        (status = 202, description = "Queued again", body = RetryBody),
        (status = 400, description = "Malformed id", body = crate::ErrorBody),
        (status = 404, description = "Unknown job", body = crate::ErrorBody),
        (status = 409, description = "The job is not failed or cancelled", body = crate::ErrorBody),
        (status = 429, description = "Rate limited or quota exceeded", body = crate::ErrorBody),
        (status = 503, description = "A backend is down", body = crate::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    JobIdPath(id): JobIdPath,
    Owner(owner): Owner,
) -> Result<Response, ApiError> {
    let job = state.lj.retry(id, &owner).await?;
    let body = RetryBody {
        job_id: job.id,
        status: job.state,
        attempt: job.attempt,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

/// The answer to a cancel.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelBody {
    /// The job's id.
    #[schema(value_type = String, format = Uuid)]
    pub job_id: JobId,
    /// `cancelled`.
    #[schema(value_type = String, example = "cancelled")]
    pub status: JobState,
}

/// `POST {prefix}/job/{jobId}/cancel`
#[utoipa::path(post, path = "/v1/download/job/{jobId}/cancel", tag = "Jobs",
    summary = "Cancel a job",
    description = "A queued or retrying job is cancelled at once; a running handler is told to stop.",
    params(("jobId" = String, Path, format = Uuid)),
    responses(
        (status = 202, description = "Cancelled", body = CancelBody),
        (status = 400, description = "Malformed id", body = crate::ErrorBody),
        (status = 404, description = "Unknown job", body = crate::ErrorBody),
        (status = 409, description = "Already finished", body = crate::ErrorBody),
        (status = 503, description = "A backend is down", body = crate::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    JobIdPath(id): JobIdPath,
    Owner(owner): Owner,
) -> Result<Response, ApiError> {
    let job = state.lj.cancel(id, &owner).await?;
    let body = CancelBody {
        job_id: job.id,
        status: job.state,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

/// A fresh presigned URL of a job's result.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadUrlBody {
    /// The job's id.
    #[schema(value_type = String, format = Uuid)]
    pub job_id: JobId,
    /// A URL that downloads the result without credentials until `expiresAt`.
    pub download_url: String,
    /// When the URL stops working.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub expires_at: DateTime<Utc>,
    /// Seconds until then.
    pub expires_in: u64,
    /// The result's size in bytes.
    pub file_size: u64,
    /// The file name offered to the browser.
    pub file_name: String,
}

/// `GET {prefix}/job/{jobId}/download-url`
#[utoipa::path(get, path = "/v1/download/job/{jobId}/download-url", tag = "Jobs",
    summary = "Presigned download URL of a completed job",
    description = "Each call signs a fresh URL.",
    params(("jobId" = String, Path, format = Uuid)),
    responses(
        (status = 200, description = "A presigned URL", body = DownloadUrlBody),
        (status = 400, description = "Malformed id", body = crate::ErrorBody),
        (status = 404, description = "Unknown job", body = crate::ErrorBody),
        (status = 409, description = "Not completed yet", body = crate::ErrorBody),
        (status = 410, description = "The result expired or was deleted", body = crate::ErrorBody),
        (status = 503, description = "A backend is down", body = crate::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn download_url(
    State(state): State<AppState>,
    JobIdPath(id): JobIdPath,
    Owner(owner): Owner,
) -> Result<Response, ApiError> {
    let url = state.lj.download_url(id, &owner).await?;
    let body = DownloadUrlBody {
        job_id: id,
        download_url: url.url,
        expires_at: url.expires_at,
        expires_in: url.expires_in.as_secs(),
        file_size: url.size,
        file_name: url.file_name,
    };
    let mut res = axum::Json(body).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}
