//! The three endpoints of the download service longjob replaces, with their field names:
//! `POST {prefix}/initiate` (now a job), `POST {prefix}/check` and the legacy synchronous
//! `POST {prefix}/start`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use longjob_core::blob::{ByteStream, PutOptions};
use longjob_core::{BackendResult, BlobStore, JobId, JobState};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::jobs::Owner;
use longjob_core::SubmitRequest;

use crate::{ApiError, ApiJson, AppState};

/// The smallest file id accepted.
pub const MIN_FILE_ID: i64 = 10_000;
/// The largest file id accepted.
pub const MAX_FILE_ID: i64 = 100_000_000;
/// The most file ids one job may name.
pub const MAX_FILE_IDS: usize = 1000;

/// What [`FileSource::check`] knows of an available file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Its key in the source (`downloads/<id>.zip`).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Where the files of the download service come from: a source bucket, or the mock rule.
#[async_trait]
pub trait FileSource: fmt::Debug + Send + Sync + 'static {
    /// Whether the file is available, and its key and size.
    async fn check(&self, file_id: u64) -> BackendResult<Option<FileInfo>>;

    /// The file's bytes, or `None` when it is not available.
    async fn read(&self, file_id: u64) -> BackendResult<Option<ByteStream>>;
}

/// The simulated processing time of a download, drawn uniformly from `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay {
    /// When false there is no delay at all.
    pub enabled: bool,
    /// The shortest delay.
    pub min: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Delay {
    /// No delay.
    pub const NONE: Self = Self {
        enabled: false,
        min: Duration::ZERO,
        max: Duration::ZERO,
    };

    /// A delay drawn from `[min, max]` (zero when disabled).
    ///
    /// ```
    /// use std::time::Duration;
    /// use longjob_axum::Delay;
    ///
    /// let d = Delay { enabled: true, min: Duration::from_millis(10), max: Duration::from_millis(20) };
    /// let x = d.draw();
    /// assert!(x >= Duration::from_millis(10) && x <= Duration::from_millis(20));
    /// assert_eq!(Delay::NONE.draw(), Duration::ZERO);
    /// ```
    pub fn draw(&self) -> Duration {
        if !self.enabled {
            return Duration::ZERO;
        }
        let (lo, hi) = (self.min.as_millis() as u64, self.max.as_millis() as u64);
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        Duration::from_millis(rand::random_range(lo..=hi))
    }
}

/// The download domain mounted by [`ApiBuilder::downloads`](crate::ApiBuilder::downloads).
#[derive(Debug, Clone)]
pub struct Downloads {
    /// Where files come from.
    pub source: Arc<dyn FileSource>,
    /// Where `/start` puts the file it serves.
    pub blobs: Arc<dyn BlobStore>,
    /// The job kind `/initiate` submits (its payload is `{"file_ids": [...]}`).
    pub kind: String,
    /// The delay of the legacy `/start`.
    pub delay: Delay,
    /// How long the URL `/start` returns stays valid.
    pub presign_ttl: Duration,
}

/// Checks one file id against the accepted range.
pub(crate) fn check_file_id(id: i64, field: &str) -> Result<u64, ApiError> {
    if (MIN_FILE_ID..=MAX_FILE_ID).contains(&id) {
        Ok(id as u64)
    } else {
        Err(ApiError::validation(format!(
            "{field} must be between {MIN_FILE_ID} and {MAX_FILE_ID}"
        ))
        .with_detail(json!({"field": field, "message": format!("must be between {MIN_FILE_ID} and {MAX_FILE_ID}"), "value": id})))
    }
}

/// The body of `/initiate`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InitiateRequest {
    /// 1 to 1000 file ids, each 10000..=100000000.
    #[schema(min_items = 1, max_items = 1000, value_type = Vec<i64>, example = json!([70000, 70007]))]
    pub file_ids: Vec<i64>,
}

/// The answer of `/initiate`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitiateResponse {
    /// The job's id.
    #[schema(value_type = String, format = Uuid)]
    pub job_id: JobId,
    /// `queued` for a new job; an existing job's state otherwise.
    #[schema(value_type = String, example = "queued")]
    pub status: JobState,
    /// How many file ids the job has.
    pub total_file_ids: usize,
    /// Poll here.
    pub status_url: String,
    /// Server-Sent Events here.
    pub stream_url: String,
    /// WebSocket here.
    pub subscribe_url: String,
    /// The presigned URL of the result, once completed, here.
    pub download_url_endpoint: String,
}

impl InitiateResponse {
    /// The answer as JSON: the same text as `serde_json::to_string(self)`, written by hand.
    /// serde_json escapes each of its seven keys and four URLs a byte at a time, which was about
    /// 5k instructions of an `initiate`'s 108k.
    fn to_json(&self) -> String {
        let mut out = String::with_capacity(
            200 + self.status_url.len()
                + self.stream_url.len()
                + self.subscribe_url.len()
                + self.download_url_endpoint.len(),
        );
        out.push_str("{\"jobId\":\"");
        self.job_id.with_text(|id| out.push_str(id));
        out.push_str("\",\"status\":\"");
        out.push_str(self.status.as_str());
        out.push_str("\",\"totalFileIds\":");
        out.push_str(itoa::Buffer::new().format(self.total_file_ids));
        for (key, url) in [
            (",\"statusUrl\":", &self.status_url),
            (",\"streamUrl\":", &self.stream_url),
            (",\"subscribeUrl\":", &self.subscribe_url),
            (",\"downloadUrlEndpoint\":", &self.download_url_endpoint),
        ] {
            out.push_str(key);
            longjob_core::json::push_str(&mut out, url);
        }
        out.push('}');
        out
    }
}

/// `{prefix}{route}{id}{rest}`, put together without `format!`'s machinery (four of these
/// answer every `initiate`).
fn job_url(prefix: &str, route: &str, id: JobId, rest: &str) -> String {
    id.with_text(|id| [prefix, route, id, rest].concat())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::validation("Idempotency-Key must be visible ASCII"))?
        .trim();
    if v.is_empty() || v.len() > 255 {
        return Err(ApiError::validation(
            "Idempotency-Key must be 1 to 255 characters",
        ));
    }
    Ok(Some(v.to_owned()))
}

/// `POST {prefix}/initiate`
#[utoipa::path(post, path = "/v1/download/initiate", tag = "Download",
    summary = "Initiate a download job",
    description = "Creates a job that gathers the files into one zip archive and answers at once. The same `Idempotency-Key` from the same owner within 24 h returns the same job (200).",
    request_body = InitiateRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried request return the same job")),
    responses(
        (status = 202, description = "Job created", body = InitiateResponse, headers(("Location" = String, description = "The status URL"))),
        (status = 200, description = "The job of this Idempotency-Key", body = InitiateResponse, headers(("Location" = String))),
        (status = 429, description = "Rate limited, or jobs-per-hour / active-jobs quota exceeded", body = crate::ErrorBody),
        (status = 503, description = "A backend is down", body = crate::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn initiate(
    State(state): State<AppState>,
    Owner(owner): Owner,
    headers: HeaderMap,
    ApiJson(body): ApiJson<InitiateRequest>,
) -> Result<Response, ApiError> {
    let Some(downloads) = state.downloads.as_ref() else {
        return Err(ApiError::not_found("no such route"));
    };
    let n = body.file_ids.len();
    if n == 0 || n > MAX_FILE_IDS {
        return Err(ApiError::validation(format!(
            "file_ids must have 1 to {MAX_FILE_IDS} items"
        ))
        .with_detail(json!({"field": "file_ids", "message": format!("must have 1 to {MAX_FILE_IDS} items, got {n}")})));
    }
    let bad: Vec<_> = body
        .file_ids
        .iter()
        .enumerate()
        .filter(|(_, id)| !(MIN_FILE_ID..=MAX_FILE_ID).contains(*id))
        .take(20)
        .map(|(i, id)| json!({"field": format!("file_ids[{i}]"), "message": format!("must be between {MIN_FILE_ID} and {MAX_FILE_ID}"), "value": id}))
        .collect();
    if !bad.is_empty() {
        let mut e = ApiError::validation(format!(
            "every file id must be between {MIN_FILE_ID} and {MAX_FILE_ID}"
        ));
        for d in bad {
            e = e.with_detail(d);
        }
        return Err(e);
    }
    let key = idempotency_key(&headers)?;
    let items: Vec<String> = body.file_ids.iter().map(ToString::to_string).collect();
    let request = SubmitRequest::new(
        downloads.kind.clone(),
        owner,
        json!({ "file_ids": body.file_ids }),
    )
    .items(items)
    .idempotency_key(key);
    let submitted = state.lj.submit(request).await?;
    let counter = if submitted.created {
        &state.metrics.jobs_submitted
    } else {
        &state.metrics.jobs_deduplicated
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let job = submitted.job;
    let p = &state.config.prefix;
    let id = job.id;
    let body = InitiateResponse {
        job_id: id,
        status: job.state,
        total_file_ids: job.items.len().max(n),
        status_url: job_url(p, "/job/", id, ""),
        stream_url: job_url(p, "/stream/", id, ""),
        subscribe_url: job_url(p, "/subscribe/", id, ""),
        download_url_endpoint: job_url(p, "/job/", id, "/download-url"),
    };
    let code = if submitted.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let location = HeaderValue::from_str(&body.status_url).ok();
    let json = HeaderValue::from_static("application/json");
    let mut res = (code, [(header::CONTENT_TYPE, json)], body.to_json()).into_response();
    if let Some(l) = location {
        res.headers_mut().insert(header::LOCATION, l);
    }
    Ok(res)
}

/// The body of `/check` and `/start`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct FileIdRequest {
    /// A file id, 10000..=100000000.
    #[schema(minimum = 10000, maximum = 100000000)]
    pub file_id: i64,
}

/// The answer of `/check`.
#[derive(Debug, Serialize, ToSchema)]
#[allow(non_snake_case)]
pub struct CheckResponse {
    /// The file id asked about.
    pub file_id: u64,
    /// Whether it can be downloaded.
    pub available: bool,
    /// Its key in the source, when available.
    #[schema(required = true)]
    pub s3Key: Option<String>,
    /// Its size in bytes, when available.
    #[schema(required = true)]
    pub size: Option<u64>,
}

/// `POST {prefix}/check`
#[utoipa::path(post, path = "/v1/download/check", tag = "Download",
    summary = "Check whether a file is available",
    description = "With a source bucket, a HEAD on its object; in mock mode a file is available iff `file_id % 7 == 0`, with a size derived from the id.",
    request_body = FileIdRequest,
    responses(
        (status = 200, description = "Availability", body = CheckResponse),
        (status = 503, description = "The source is down", body = crate::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn check(
    State(state): State<AppState>,
    Owner(_owner): Owner,
    ApiJson(body): ApiJson<FileIdRequest>,
) -> Result<Response, ApiError> {
    let Some(downloads) = state.downloads.as_ref() else {
        return Err(ApiError::not_found("no such route"));
    };
    let id = check_file_id(body.file_id, "file_id")?;
    let info = downloads
        .source
        .check(id)
        .await
        .map_err(|e| ApiError::backend(&e))?;
    Ok(axum::Json(CheckResponse {
        file_id: id,
        available: info.is_some(),
        s3Key: info.as_ref().map(|i| i.key.clone()),
        size: info.map(|i| i.size),
    })
    .into_response())
}

/// The answer of `/start`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartResponse {
    /// The file id asked for.
    #[serde(rename = "file_id")]
    pub file_id: u64,
    /// `completed` or `failed`.
    #[schema(example = "completed")]
    pub status: String,
    /// A presigned URL of the file, when completed.
    #[schema(required = true)]
    pub download_url: Option<String>,
    /// Its size in bytes, when completed.
    #[schema(required = true)]
    pub size: Option<u64>,
    /// How long the call took.
    pub processing_time_ms: u64,
    /// What happened.
    pub message: String,
}

/// `POST {prefix}/start`
#[utoipa::path(post, path = "/v1/download/start", tag = "Download",
    summary = "Download one file synchronously (legacy)",
    description = "Kept for old clients: waits the configured processing delay inside the request, then answers with a working presigned URL. Bounded by the request timeout (504 past it); use `/initiate` instead.",
    request_body = FileIdRequest,
    responses(
        (status = 200, description = "Done (or failed: file not available)", body = StartResponse),
        (status = 503, description = "A backend is down", body = crate::ErrorBody),
        (status = 504, description = "The delay exceeded the request timeout", body = crate::ErrorBody),
    ),
    security(("bearer" = [])))]
#[deprecated(note = "kept for old clients; use /initiate")]
pub(crate) async fn start(
    State(state): State<AppState>,
    Owner(_owner): Owner,
    ApiJson(body): ApiJson<FileIdRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Some(downloads) = state.downloads.as_ref() else {
        return Err(ApiError::not_found("no such route"));
    };
    let id = check_file_id(body.file_id, "file_id")?;
    tokio::time::sleep(downloads.delay.draw()).await;
    let backend = |e: longjob_core::BackendError| ApiError::backend(&e);
    let info = downloads.source.check(id).await.map_err(backend)?;
    let elapsed = |s: Instant| s.elapsed().as_millis() as u64;
    let Some(info) = info else {
        return Ok(axum::Json(StartResponse {
            file_id: id,
            status: "failed".into(),
            download_url: None,
            size: None,
            processing_time_ms: elapsed(started),
            message: format!("File {id} is not available"),
        })
        .into_response());
    };
    let blobs = &downloads.blobs;
    let size = match blobs.head(&info.key).await.map_err(backend)? {
        Some(meta) => meta.size,
        None => {
            let Some(body) = downloads.source.read(id).await.map_err(backend)? else {
                return Err(ApiError::not_found(format!("file {id} disappeared")));
            };
            let options = PutOptions {
                content_type: Some("application/zip".into()),
            };
            blobs
                .put(&info.key, body, options)
                .await
                .map_err(backend)?
                .size
        }
    };
    let url = blobs
        .presign_get(&info.key, downloads.presign_ttl, &format!("{id}.zip"))
        .await
        .map_err(backend)?;
    Ok(axum::Json(StartResponse {
        file_id: id,
        status: "completed".into(),
        download_url: Some(url.url),
        size: Some(size),
        processing_time_ms: elapsed(started),
        message: format!("Download ready for file {id}"),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_urls_are_what_format_writes() {
        let id = JobId::new();
        assert_eq!(
            job_url("/v1/download", "/job/", id, "/download-url"),
            format!("/v1/download/job/{id}/download-url")
        );
        assert_eq!(job_url("", "/stream/", id, ""), format!("/stream/{id}"));
    }

    #[test]
    fn the_initiate_answer_is_what_serde_writes() {
        let id = JobId::new();
        // A prefix is the host's to choose: one JSON must escape is written escaped.
        for prefix in ["/v1/download", "", "/a \"quoted\"\\prefix\u{1}/é"] {
            for (status, total) in [(JobState::Queued, 1), (JobState::Running, 1000)] {
                let answer = InitiateResponse {
                    job_id: id,
                    status,
                    total_file_ids: total,
                    status_url: job_url(prefix, "/job/", id, ""),
                    stream_url: job_url(prefix, "/stream/", id, ""),
                    subscribe_url: job_url(prefix, "/subscribe/", id, ""),
                    download_url_endpoint: job_url(prefix, "/job/", id, "/download-url"),
                };
                let serde = serde_json::to_string(&answer).expect("serde");
                assert_eq!(answer.to_json(), serde);
            }
        }
    }
}
