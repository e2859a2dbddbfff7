//! How the SDK's errors map into core's classified [`BackendError`].

use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use longjob_core::BackendError;

pub(crate) const BACKEND: &str = "s3";

/// S3 error codes that mean the credentials or the permissions are wrong.
const AUTH_CODES: &[&str] = &[
    "AccessDenied",
    "AccountProblem",
    "AllAccessDisabled",
    "AuthorizationHeaderMalformed",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidSecurity",
    "InvalidToken",
    "MissingSecurityHeader",
    "NotSignedUp",
    "RequestTimeTooSkewed",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
];

/// S3 error codes that are worth retrying later.
const TRANSIENT_CODES: &[&str] = &[
    "InternalError",
    "OperationAborted",
    "RequestTimeout",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
];

/// The error code and HTTP status of a service error, when the server answered.
pub(crate) fn code_and_status<E: ProvideErrorMetadata>(
    err: &SdkError<E, HttpResponse>,
) -> (Option<String>, Option<u16>) {
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = match err {
        SdkError::ServiceError(_) => err.code().map(str::to_owned),
        _ => None,
    };
    (code, status)
}

/// Whether the error says that the object (not the bucket) does not exist.
pub(crate) fn is_missing<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    let (code, status) = code_and_status(err);
    match code.as_deref() {
        Some("NoSuchKey" | "NotFound") => true,
        Some("NoSuchBucket") => false,
        _ => status == Some(404),
    }
}

/// Maps an SDK error of operation `op` into a classified [`BackendError`].
pub(crate) fn map_sdk_error<E>(
    op: &'static str,
    bucket: &str,
    timeout: Duration,
    err: SdkError<E, HttpResponse>,
) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (code, status) = code_and_status(&err);
    let detail = || {
        let message = err.message().unwrap_or_default();
        match (&code, status) {
            (Some(code), _) if message.is_empty() => code.clone(),
            (Some(code), _) => format!("{code}: {message}"),
            (None, Some(status)) => format!("HTTP {status}"),
            (None, None) => DisplayErrorContext(&err).to_string(),
        }
    };
    match &err {
        SdkError::TimeoutError(_) => {
            return BackendError::Timeout {
                backend: BACKEND,
                after: timeout,
            };
        }
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            return BackendError::Timeout {
                backend: BACKEND,
                after: timeout,
            };
        }
        SdkError::ConstructionFailure(_) => {
            return BackendError::InvalidArgument(format!(
                "s3 {op}: request could not be built: {}",
                DisplayErrorContext(&err)
            ));
        }
        SdkError::ServiceError(_) => {}
        _ => {
            // Dispatch failures (connection refused, reset, DNS) and unreadable responses.
            return BackendError::Unavailable {
                backend: BACKEND,
                message: format!("{op}: {}", DisplayErrorContext(&err)),
                source: Some(Box::new(err)),
            };
        }
    }
    let code_str = code.as_deref().unwrap_or("");
    if AUTH_CODES.contains(&code_str) || matches!(status, Some(401 | 403)) {
        let mut message = format!("{op} on bucket {bucket:?}: {}", detail());
        if code.is_none() {
            // HEAD answers carry no body, hence no error code.
            message.push_str(
                " (no error code in the answer: check the access key id, the secret and the permissions)",
            );
        }
        return BackendError::Unauthorized {
            backend: BACKEND,
            message,
        };
    }
    if code_str == "NoSuchBucket" {
        return BackendError::InvalidArgument(format!("s3 {op}: bucket {bucket:?} does not exist"));
    }
    if TRANSIENT_CODES.contains(&code_str) || status.is_some_and(|s| s >= 500 || s == 429) {
        return BackendError::Unavailable {
            backend: BACKEND,
            message: format!("{op}: {}", detail()),
            source: Some(Box::new(err)),
        };
    }
    if status.is_some_and(|s| (400..500).contains(&s)) {
        return BackendError::InvalidArgument(format!("s3 {op} refused: {}", detail()));
    }
    BackendError::corrupt(BACKEND, format!("{op}: unexpected answer: {}", detail()))
}
