//! Shared by the tests: the S3 server under test, fresh stores on it, and a plain HTTP fetcher.
//!
//! The server comes from S3_ENDPOINT, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_BUCKET_NAME
//! (and S3_REGION) when set; otherwise the one `scripts/services/s3.sh` starts.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use longjob_core::BackendError;
use longjob_core::testkit::blob::{Fetched, Fetcher};
use longjob_s3::{S3BlobStore, S3Config};

/// The defaults match scripts/services/s3.sh.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:9100";
pub const DEFAULT_ACCESS_KEY_ID: &str = "longjob-test-access";
pub const DEFAULT_SECRET_ACCESS_KEY: &str = "longjob-test-secret";
pub const DEFAULT_BUCKET: &str = "longjob-test";

/// The configuration of the server under test, with a fresh key prefix (so tests sharing the
/// bucket never see each other's objects).
pub fn config() -> S3Config {
    let var = |name: &str, default: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_owned())
    };
    let lookup = |name: &str| {
        Some(match name {
            "S3_ENDPOINT" => var(name, DEFAULT_ENDPOINT),
            "S3_ACCESS_KEY_ID" => var(name, DEFAULT_ACCESS_KEY_ID),
            "S3_SECRET_ACCESS_KEY" => var(name, DEFAULT_SECRET_ACCESS_KEY),
            "S3_BUCKET_NAME" => var(name, DEFAULT_BUCKET),
            _ => return std::env::var(name).ok(),
        })
    };
    let config = S3Config::from_lookup(lookup).expect("S3 test configuration");
    config.key_prefix(format!("test-{}/", uuid::Uuid::now_v7()))
}

/// A store on the server under test, checked to answer.
pub async fn store_with(config: S3Config) -> S3BlobStore {
    let endpoint = config.endpoint.clone().unwrap_or_else(|| "AWS S3".into());
    let store = S3BlobStore::new(config)
        .await
        .expect("S3 store from the test configuration");
    if let Err(e) = longjob_core::blob::BlobStore::health(&store).await {
        match e {
            BackendError::InvalidArgument(ref m) if m.contains("does not exist") => {
                // A server of one's own (MinIO, …) without the bucket yet: make it.
                store
                    .client()
                    .create_bucket()
                    .bucket(store.bucket())
                    .send()
                    .await
                    .unwrap_or_else(|c| {
                        panic!("creating the test bucket failed: {c:?} (after {e})")
                    });
            }
            e => panic!(
                "the S3 server at {endpoint} does not answer as expected: {e}. \
                 Start it with `bash scripts/services/s3.sh`, or point S3_ENDPOINT, \
                 S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY and S3_BUCKET_NAME at another one."
            ),
        }
    }
    store
}

/// A store on the server under test with a fresh key prefix.
pub async fn store() -> S3BlobStore {
    store_with(config()).await
}

/// Fetches a URL as a browser would: a plain GET; non-2xx answers are refusals.
pub fn fetcher() -> Fetcher {
    let client = reqwest::Client::new();
    Arc::new(move |url: String| {
        let client = client.clone();
        Box::pin(async move {
            let response = client
                .get(&url)
                .send()
                .await
                .expect("GET of a presigned URL");
            let status = response.status();
            if !status.is_success() {
                return Fetched::Refused(status.as_u16());
            }
            let file_name = response
                .headers()
                .get(reqwest::header::CONTENT_DISPOSITION)
                .and_then(|v| v.to_str().ok())
                .and_then(disposition_file_name);
            let body = response.bytes().await.expect("body of a presigned URL");
            Fetched::Ok { body, file_name }
        })
    })
}

/// The file name of a `Content-Disposition` value: `filename*` (RFC 8187) first, else `filename`.
pub fn disposition_file_name(value: &str) -> Option<String> {
    let params: Vec<(&str, &str)> = value
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .collect();
    if let Some((_, v)) = params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("filename*"))
    {
        let encoded = v.split_once("''").map_or(*v, |(_, rest)| rest);
        return Some(percent_decode(encoded));
    }
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("filename"))
        .map(|(_, v)| v.trim_matches('"').to_owned())
}

pub fn percent_decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of query parameter `name` in `url`, percent-decoded.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name))
        .map(|(_, v)| percent_decode(v))
}
