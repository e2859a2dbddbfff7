//! The signed file route of the built-in blob stores: `GET {prefix}/files/{key}?expires=&name=&sig=`.

use std::ops::Range;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use longjob_core::signing::{SignatureError, percent_encode};
use serde::Deserialize;

use crate::{ApiError, AppState};

/// The query of a signed URL.
#[derive(Debug, Deserialize)]
pub(crate) struct Signed {
    expires: Option<String>,
    #[serde(default)]
    name: String,
    sig: Option<String>,
}

/// A `Range` header's one range, resolved against an object of `size` bytes.
/// `Ok(None)`: no (usable) range, serve it all; `Err(())`: unsatisfiable.
fn parse_range(value: &str, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // multiple ranges: serve the whole object (allowed by RFC 9110)
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        let n: u64 = end.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        size.saturating_sub(n)..size
    } else {
        let s: u64 = start.parse().map_err(|_| ())?;
        let e = if end.is_empty() {
            size
        } else {
            end.parse::<u64>()
                .map_err(|_| ())?
                .saturating_add(1)
                .min(size)
        };
        if s >= size || s >= e {
            return Err(());
        }
        s..e
    };
    Ok(Some(range))
}

fn content_disposition(name: &str) -> HeaderValue {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let value = format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{}",
        percent_encode(name)
    );
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// `GET {prefix}/files/{key}`
#[utoipa::path(get, path = "/v1/download/files/{key}", tag = "Files",
    summary = "Download a result through a signed URL",
    description = "Only for the built-in blob stores (memory, local disk); S3 URLs point at the bucket. The signature is an HMAC over key, expiry and file name. Supports `Range` (206) and answers with `Content-Disposition: attachment`.",
    params(("key" = String, Path, description = "The blob key"),
           ("expires" = i64, Query, description = "Unix time the URL expires at"),
           ("name" = String, Query, description = "The file name to download as"),
           ("sig" = String, Query, description = "The HMAC-SHA256 signature, hex"),
           ("Range" = Option<String>, Header, description = "bytes=start-end")),
    responses(
        (status = 200, description = "The object", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The range asked for", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 403, description = "Bad or expired signature", body = crate::ErrorBody),
        (status = 404, description = "No such object", body = crate::ErrorBody),
        (status = 416, description = "Range not satisfiable", body = crate::ErrorBody),
    ))]
pub(crate) async fn serve(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(q): Query<Signed>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(files) = state.files.as_ref() else {
        return Err(ApiError::not_found("no such route"));
    };
    let (Some(expires), Some(sig)) = (q.expires.as_deref(), q.sig.as_deref()) else {
        return Err(ApiError::forbidden("missing signature"));
    };
    let expires: i64 = expires
        .parse()
        .map_err(|_| ApiError::forbidden("invalid signature"))?;
    match files.signer.verify(&key, expires, &q.name, sig) {
        Ok(()) => {}
        Err(SignatureError::Expired) => return Err(ApiError::forbidden("the URL has expired")),
        Err(SignatureError::Invalid) => return Err(ApiError::forbidden("invalid signature")),
    }
    let head = files
        .blobs
        .head(&key)
        .await
        .map_err(|e| ApiError::backend(&e))?
        .ok_or_else(|| ApiError::not_found("the file does not exist any more"))?;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(v) => match parse_range(v, head.size) {
            Ok(r) => r,
            Err(()) => {
                return Err(ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range_not_satisfiable",
                    "the range is outside the file",
                )
                .with_header(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{}", head.size))
                        .unwrap_or_else(|_| HeaderValue::from_static("bytes */0")),
                ));
            }
        },
    };
    let body = files
        .blobs
        .get(&key, range.clone())
        .await
        .map_err(|e| ApiError::backend(&e))?
        .ok_or_else(|| ApiError::not_found("the file does not exist any more"))?;
    let len = body.range.end.saturating_sub(body.range.start);
    let mut res = Body::from_stream(body.body).into_response();
    let h = res.headers_mut();
    let ct = body
        .meta
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_TYPE, ct);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_DISPOSITION, content_disposition(&q.name));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    if range.is_some() {
        *res.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!(
            "bytes {}-{}/{}",
            body.range.start,
            body.range.end.saturating_sub(1),
            body.meta.size
        )) {
            res.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some(0..10)));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some(90..100)));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some(90..100)));
        assert_eq!(parse_range("bytes=95-200", 100), Ok(Some(95..100)));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=5-2", 100), Err(()));
        assert_eq!(parse_range("items=1-2", 100), Ok(None));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
    }
}
