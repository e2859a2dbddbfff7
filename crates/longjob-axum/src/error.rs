//! The one error shape of the API: `{"error": {"code", "message", "details"}, "requestId"}`.
//!
//! Handlers return [`ApiError`]; [`normalize`] (run by the outermost layer) turns every other error
//! response (the framework's 404/405/413/415/422, a layer's 408/504/429) into the same shape and
//! fills in `requestId`.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use longjob_core::BackendError;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use longjob_core::LongJobError;

/// An API error: an HTTP status, a stable machine-readable code, a message and details.
///
/// ```
/// use axum::http::StatusCode;
/// use longjob_axum::ApiError;
///
/// let e = ApiError::validation("file_ids must not be empty");
/// assert_eq!(e.status(), StatusCode::BAD_REQUEST);
/// assert_eq!(e.code(), "validation_error");
/// ```
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Vec<Value>,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

/// The body of an error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
    /// The request's id (also in the `X-Request-ID` header).
    pub request_id: String,
}

/// The `error` object of an error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code: `validation_error`, `unauthorized`, `not_found`, `method_not_allowed`,
    /// `conflict`, `gone`, `payload_too_large`, `unsupported_media_type`, `rate_limited`,
    /// `quota_exceeded`, `internal_error`, `service_unavailable`, `timeout`, `forbidden`.
    pub code: String,
    /// A message for humans; no internals.
    pub message: String,
    /// Field errors and the like.
    #[schema(value_type = Vec<Object>)]
    pub details: Vec<Value>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// 400 `validation_error`.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "validation_error", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
            .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 500 `internal_error`, with a message that leaks nothing.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal server error",
        )
    }

    /// 503 `service_unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("5"))
    }

    /// Adds one detail (a field error, …).
    pub fn with_detail(mut self, detail: Value) -> Self {
        self.details.push(detail);
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error for a backend failure: 503 when transient (`store_full`, with its message, when
    /// a bounded store is full), else 500 (logged, not leaked).
    pub fn backend(e: &BackendError) -> Self {
        if let BackendError::Full { message, .. } = e {
            // Says what is full: the operator can raise the bound, the client retry later.
            tracing::warn!(error = %e, "refused: backend full");
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_full",
                message.clone(),
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if e.is_transient() {
            tracing::warn!(error = %e, "backend unavailable");
            Self::unavailable("a backend is unavailable, try again later")
        } else {
            tracing::error!(error = %e, "backend error");
            Self::internal()
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl From<LongJobError> for ApiError {
    fn from(e: LongJobError) -> Self {
        crate::facade::api_error(e)
    }
}

/// Marks a response as already carrying the API's error shape; the body is re-rendered with
/// the request id by [`normalize`].
#[derive(Debug, Clone)]
struct Rendered(ErrorDetail);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = ErrorDetail {
            code: self.code.to_owned(),
            message: self.message,
            details: self.details,
        };
        let body = ErrorBody {
            error: detail.clone(),
            request_id: String::new(),
        };
        let mut res = (self.status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            res.headers_mut().append(name, value);
        }
        res.extensions_mut().insert(Rendered(detail));
        res
    }
}

fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "validation_error",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 | 504 => "timeout",
        409 => "conflict",
        410 => "gone",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        503 => "service_unavailable",
        s if s >= 500 => "internal_error",
        _ => "error",
    }
}

fn default_message(status: StatusCode) -> &'static str {
    match status.as_u16() {
        404 => "no such route",
        405 => "method not allowed on this route",
        408 | 504 => "the request took too long",
        413 => "the request body is too large",
        415 => "expected a JSON body with Content-Type: application/json",
        429 => "too many requests",
        _ => status.canonical_reason().unwrap_or("error"),
    }
}

/// Every response with a status of 400 or more leaves with the API's JSON error body and its
/// `requestId`, whoever produced it (a handler's own JSON answer excepted); a timeout (408)
/// becomes 504 and a rejected JSON body (422) becomes 400. A CORS preflight (`preflight`: the
/// request was `OPTIONS` with `Access-Control-Request-Method`) answers 204.
pub(crate) async fn normalize(
    mut res: Response,
    request_id: &HeaderValue,
    preflight: bool,
) -> Response {
    let status = res.status();
    if preflight && status == StatusCode::OK {
        *res.status_mut() = StatusCode::NO_CONTENT;
        return res;
    }
    if status.as_u16() < 400 {
        return res;
    }
    let deliberate_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if deliberate_json && res.extensions().get::<Rendered>().is_none() {
        // A handler's own JSON answer (such as the unhealthy `/health`): leave it as it is.
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let detail = match parts.extensions.remove::<Rendered>() {
        Some(Rendered(detail)) => detail,
        None => {
            let status = match status.as_u16() {
                408 => StatusCode::GATEWAY_TIMEOUT,
                422 => StatusCode::BAD_REQUEST,
                _ => status,
            };
            parts.status = status;
            // Keep a short plain-text message of the framework (they say what was wrong with
            // the request); never a 5xx body, which could leak internals.
            let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
            let text = String::from_utf8_lossy(&text).trim().to_owned();
            let plain = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/plain"));
            let message = if plain && !text.is_empty() && status.as_u16() < 500 {
                text
            } else {
                default_message(status).to_owned()
            };
            ErrorDetail {
                code: code_for(status).to_owned(),
                message,
                details: Vec::new(),
            }
        }
    };
    let body = ErrorBody {
        error: detail,
        request_id: request_id.to_str().unwrap_or_default().to_owned(),
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body was not read: the connection cannot carry another request.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// The fallback of the router: 404 in the API's shape.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}
