//! Conformance cases for [`BlobStore`].
//!
//! Stores differ in how their presigned URLs are fetched (an S3 server serves them itself; the
//! built-in stores need the HTTP layer's file route), so each backend hands the suite a
//! [`BlobFixture`] with a fetcher that does what a browser would.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};

use crate::blob::{BlobStore, PutOptions, byte_stream, collect_bytes};
use crate::signing::UrlSigner;
use crate::{BackendError, JobId};

/// What fetching a URL gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The URL was served.
    Ok {
        /// The body.
        body: Bytes,
        /// The file name the response offers (`Content-Disposition`), when it says one.
        file_name: Option<String>,
    },
    /// The URL was refused (bad signature, expired, missing object), with the HTTP status.
    Refused(u16),
}

/// Fetches a presigned URL as a client would.
pub type Fetcher = Arc<dyn Fn(String) -> BoxFuture<'static, Fetched> + Send + Sync>;

/// A blob store under test, and how to fetch its presigned URLs.
pub struct BlobFixture {
    /// The store.
    pub store: Arc<dyn BlobStore>,
    /// Fetches its presigned URLs.
    pub fetch: Fetcher,
}

impl std::fmt::Debug for BlobFixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobFixture").finish_non_exhaustive()
    }
}

impl BlobFixture {
    /// A fixture of `store` whose URLs are fetched by `fetch`.
    pub fn new(store: Arc<dyn BlobStore>, fetch: Fetcher) -> Self {
        Self { store, fetch }
    }

    /// A fixture for a built-in store signing with `signer`: the fetcher checks the URL's
    /// signature as the HTTP file route does, then reads the object from the store.
    pub fn signed_by(store: Arc<dyn BlobStore>, signer: UrlSigner) -> Self {
        let reader = Arc::clone(&store);
        let fetch: Fetcher = Arc::new(move |url: String| {
            let signer = signer.clone();
            let store = Arc::clone(&reader);
            Box::pin(async move {
                let Some(rest) = url.strip_prefix(&format!("{}/", signer.base_url())) else {
                    return Fetched::Refused(404);
                };
                let (key, query) = rest.split_once('?').unwrap_or((rest, ""));
                let param = |name: &str| {
                    query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                        .unwrap_or("")
                        .to_owned()
                };
                let name = percent_decode(&param("name"));
                let Ok(expires) = param("expires").parse::<i64>() else {
                    return Fetched::Refused(403);
                };
                if signer.verify(key, expires, &name, &param("sig")).is_err() {
                    return Fetched::Refused(403);
                }
                match store.get(key, None).await {
                    Ok(Some(body)) => Fetched::Ok {
                        body: collect_bytes(body.body).await.unwrap(),
                        file_name: Some(name),
                    },
                    _ => Fetched::Refused(404),
                }
            })
        });
        Self::new(store, fetch)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Ok(b) = u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or(""), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Expands to one `#[tokio::test]` per [`BlobStore`](crate::BlobStore) case, each with a fixture
/// from `$make` (an expression giving a future of a [`BlobFixture`]).
#[macro_export]
macro_rules! blob_conformance {
    ($make:expr) => {
        $crate::__conformance_cases!(blob, $make;
            put_head_get_round_trip,
            missing_key_is_none_not_an_error,
            presigned_url_serves_exactly_the_bytes_put,
            tampered_presigned_url_is_refused,
            expired_presigned_url_is_refused,
            put_replaces_and_delete_removes,
            ranged_get_returns_the_range,
            streamed_put_of_several_mebibytes_round_trips,
            invalid_keys_are_refused,
        );
    };
}

fn key(name: &str) -> String {
    format!("kit/{}/{name}", JobId::new())
}

/// Put, then head and get give the size, type and bytes put.
pub async fn put_head_get_round_trip(f: &BlobFixture) {
    let k = key("a.zip");
    let options = PutOptions {
        content_type: Some("application/zip".into()),
    };
    let meta = f
        .store
        .put(&k, byte_stream(&b"hello zip"[..]), options)
        .await
        .unwrap();
    assert_eq!(meta.size, 9);
    let head = f.store.head(&k).await.unwrap().expect("head after put");
    assert_eq!(head.size, 9);
    assert_eq!(head.key, k);
    let got = f.store.get(&k, None).await.unwrap().expect("get after put");
    assert_eq!(got.meta.size, 9);
    assert_eq!(collect_bytes(got.body).await.unwrap(), &b"hello zip"[..]);
    f.store.health().await.unwrap();
}

/// A missing key is `None` for head and get, and deleting it succeeds.
pub async fn missing_key_is_none_not_an_error(f: &BlobFixture) {
    let k = key("missing.zip");
    assert!(f.store.head(&k).await.unwrap().is_none());
    assert!(f.store.get(&k, None).await.unwrap().is_none());
    f.store.delete(&k).await.unwrap();
}

/// A presigned URL, fetched, gives exactly the bytes put, under the file name asked for.
pub async fn presigned_url_serves_exactly_the_bytes_put(f: &BlobFixture) {
    let k = key("report.zip");
    let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    f.store
        .put(&k, byte_stream(body.clone()), PutOptions::default())
        .await
        .unwrap();
    let url = f
        .store
        .presign_get(&k, Duration::from_secs(300), "report 2026.zip")
        .await
        .unwrap();
    assert!(url.expires_at > chrono::Utc::now() + chrono::Duration::seconds(200));
    match (f.fetch)(url.url.clone()).await {
        Fetched::Ok {
            body: got,
            file_name,
        } => {
            assert_eq!(got.as_ref(), body.as_slice());
            if let Some(name) = file_name {
                assert!(name.contains("report 2026.zip"), "file name {name:?}");
            }
        }
        Fetched::Refused(status) => panic!(
            "a fresh presigned URL was refused with {status}: {}",
            url.url
        ),
    }
}

/// A presigned URL with one character of its signature changed is refused.
pub async fn tampered_presigned_url_is_refused(f: &BlobFixture) {
    let k = key("t.zip");
    f.store
        .put(&k, byte_stream(&b"secret"[..]), PutOptions::default())
        .await
        .unwrap();
    let url = f
        .store
        .presign_get(&k, Duration::from_secs(300), "t.zip")
        .await
        .unwrap()
        .url;
    let pos = url
        .find("sig=")
        .or_else(|| url.find("Signature="))
        .map(|p| url[p..].find('=').unwrap_or(0) + p + 1)
        .expect("a signature parameter in the URL");
    let mut tampered = url.clone().into_bytes();
    tampered[pos] = if tampered[pos] == b'a' { b'b' } else { b'a' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert!(
        matches!((f.fetch)(tampered).await, Fetched::Refused(_)),
        "a tampered URL was served"
    );
    assert!(matches!((f.fetch)(url).await, Fetched::Ok { .. }));
}

/// A presigned URL past its time-to-live is refused.
pub async fn expired_presigned_url_is_refused(f: &BlobFixture) {
    let k = key("e.zip");
    f.store
        .put(&k, byte_stream(&b"soon gone"[..]), PutOptions::default())
        .await
        .unwrap();
    let url = f
        .store
        .presign_get(&k, Duration::from_secs(1), "e.zip")
        .await
        .unwrap()
        .url;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        matches!((f.fetch)(url).await, Fetched::Refused(_)),
        "an expired URL was served"
    );
}

/// A second put replaces the object; delete removes it.
pub async fn put_replaces_and_delete_removes(f: &BlobFixture) {
    let k = key("r.bin");
    f.store
        .put(&k, byte_stream(&b"first"[..]), PutOptions::default())
        .await
        .unwrap();
    f.store
        .put(&k, byte_stream(&b"second!"[..]), PutOptions::default())
        .await
        .unwrap();
    let got = f.store.get(&k, None).await.unwrap().unwrap();
    assert_eq!(collect_bytes(got.body).await.unwrap(), &b"second!"[..]);
    f.store.delete(&k).await.unwrap();
    assert!(f.store.head(&k).await.unwrap().is_none());
}

/// A ranged get returns that range and the object's whole size.
pub async fn ranged_get_returns_the_range(f: &BlobFixture) {
    let k = key("range.bin");
    f.store
        .put(&k, byte_stream(&b"0123456789"[..]), PutOptions::default())
        .await
        .unwrap();
    let got = f.store.get(&k, Some(2..6)).await.unwrap().unwrap();
    assert_eq!(got.meta.size, 10);
    assert_eq!(got.range, 2..6);
    assert_eq!(collect_bytes(got.body).await.unwrap(), &b"2345"[..]);
    let tail = f.store.get(&k, Some(7..100)).await.unwrap().unwrap();
    assert_eq!(collect_bytes(tail.body).await.unwrap(), &b"789"[..]);
}

/// A body streamed in many chunks round-trips byte for byte.
pub async fn streamed_put_of_several_mebibytes_round_trips(f: &BlobFixture) {
    let k = key("big.bin");
    let chunk = |i: u32| {
        Bytes::from(
            (0..65_536u32)
                .map(|j| ((i * 31 + j) % 253) as u8)
                .collect::<Vec<u8>>(),
        )
    };
    let chunks: Vec<Bytes> = (0..96).map(chunk).collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let body = stream::iter(chunks.into_iter().map(Ok)).boxed();
    let meta = f.store.put(&k, body, PutOptions::default()).await.unwrap();
    assert_eq!(meta.size, expected.len() as u64);
    let got = f.store.get(&k, None).await.unwrap().unwrap();
    let got = collect_bytes(got.body).await.unwrap();
    assert!(got.as_ref() == expected.as_slice(), "streamed body differs");
}

/// Keys that could escape a directory or are malformed are refused before any I/O.
pub async fn invalid_keys_are_refused(f: &BlobFixture) {
    for bad in ["", "../x", "a/../../b", "/abs", "a//b", "sp ace", "a\nb"] {
        let err = f.store.head(bad).await.unwrap_err();
        assert!(
            matches!(err, BackendError::InvalidArgument(_)),
            "{bad:?}: {err:?}"
        );
        let err = f
            .store
            .put(bad, byte_stream(&b"x"[..]), PutOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackendError::InvalidArgument(_)),
            "{bad:?}: {err:?}"
        );
    }
}
