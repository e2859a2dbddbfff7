//! How the facade's errors reach the client.

use axum::http::{HeaderValue, StatusCode, header};
use longjob_core::LongJobError;

use crate::ApiError;

/// Maps a facade error to the API's error: 404, 409, 410, 429 (with `Retry-After`), 400, and
/// 503 for a transient backend failure, 500 otherwise.
pub(crate) fn api_error(e: LongJobError) -> ApiError {
    match e {
        LongJobError::NotFound(id) => ApiError::not_found(format!("job {id} not found")),
        e @ LongJobError::InvalidState { .. } => ApiError::conflict(e.to_string()),
        e @ LongJobError::Gone(_) => ApiError::new(StatusCode::GONE, "gone", e.to_string()),
        LongJobError::QuotaExceeded {
            message,
            retry_after,
        } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message)
                .with_header(header::RETRY_AFTER, HeaderValue::from(secs))
        }
        LongJobError::Invalid(m) => ApiError::validation(m),
        LongJobError::Backend(e) => ApiError::backend(&e),
        other => {
            tracing::error!(error = %other, "unexpected facade error");
            ApiError::internal()
        }
    }
}
