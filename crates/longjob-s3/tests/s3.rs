//! S3-specific behaviour against a real SigV4-verifying server: signing, expiry, multipart,
//! aborts, credentials, retention.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use longjob_core::BackendError;
use longjob_core::blob::{BlobStore, PutOptions, byte_stream, collect_bytes};
use longjob_core::testkit::blob::Fetched;
use longjob_s3::{MIN_PART_SIZE, S3BlobStore, S3Config};
use tracing::instrument::WithSubscriber;

const MIB: usize = 1024 * 1024;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// `bytes` as a stream of 64 KiB chunks.
fn chunked(bytes: &[u8]) -> longjob_core::blob::ByteStream {
    let chunks: Vec<std::io::Result<Bytes>> = bytes
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(chunks).boxed()
}

async fn fetch(url: &str) -> Fetched {
    (common::fetcher())(url.to_owned()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_url_returns_exactly_the_bytes_put_under_the_file_name() {
    let store = common::store().await;
    let body = pattern(300_000, 1);
    store
        .put("dl/a.zip", byte_stream(body.clone()), PutOptions::default())
        .await
        .unwrap();
    let url = store
        .presign_get("dl/a.zip", Duration::from_secs(60), "Résumé 2026.zip")
        .await
        .unwrap();
    // The file name travels in the signed response-content-disposition parameter.
    let disposition = common::query_param(&url.url, "response-content-disposition")
        .expect("response-content-disposition in the URL");
    assert_eq!(
        common::disposition_file_name(&disposition).as_deref(),
        Some("Résumé 2026.zip"),
        "{disposition}"
    );
    assert!(disposition.starts_with("attachment;"), "{disposition}");
    match fetch(&url.url).await {
        Fetched::Ok {
            body: got,
            file_name,
        } => {
            assert!(
                got.as_ref() == body.as_slice(),
                "presigned URL served other bytes"
            );
            // Servers that honour response-content-disposition (AWS S3, MinIO) say the name;
            // s3s-fs does not echo it.
            if let Some(name) = file_name {
                assert_eq!(name, "Résumé 2026.zip");
            }
        }
        Fetched::Refused(status) => panic!("fresh presigned URL refused with {status}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_signature_or_file_name_is_rejected() {
    let store = common::store().await;
    store
        .put(
            "t/x.bin",
            byte_stream(&b"secret bytes"[..]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let url = store
        .presign_get("t/x.bin", Duration::from_secs(60), "x.bin")
        .await
        .unwrap()
        .url;
    let at = url.find("X-Amz-Signature=").expect("a SigV4 signature") + "X-Amz-Signature=".len();
    for i in [at, url.len() - 1] {
        let mut tampered = url.clone().into_bytes();
        tampered[i] = if tampered[i] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(
            matches!(fetch(&tampered).await, Fetched::Refused(403)),
            "a URL with its signature changed at {i} was served: {tampered}"
        );
    }
    // The file name is signed too.
    let renamed = url.replace("x.bin", "y.bin");
    assert_ne!(renamed, url);
    assert!(
        matches!(fetch(&renamed).await, Fetched::Refused(403)),
        "a URL with its file name changed was served"
    );
    // Another key with the same signature.
    let other = url.replace("t/x.bin", "t/z.bin");
    assert!(matches!(fetch(&other).await, Fetched::Refused(403)));
    assert!(matches!(fetch(&url).await, Fetched::Ok { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_url_past_its_expiry_is_rejected() {
    let store = common::store().await;
    store
        .put(
            "e/x.bin",
            byte_stream(&b"short-lived"[..]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let url = store
        .presign_get("e/x.bin", Duration::from_secs(1), "x.bin")
        .await
        .unwrap();
    assert!(url.expires_at <= chrono::Utc::now() + chrono::Duration::seconds(1));
    assert!(matches!(fetch(&url.url).await, Fetched::Ok { .. }));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(
        matches!(fetch(&url.url).await, Fetched::Refused(403)),
        "an expired URL was served"
    );
}

#[tokio::test]
async fn presign_refuses_ttls_sigv4_cannot_express() {
    let store = common::store().await;
    for ttl in [Duration::ZERO, Duration::from_secs(8 * 24 * 3600)] {
        let err = store.presign_get("k.zip", ttl, "k.zip").await.unwrap_err();
        assert!(matches!(err, BackendError::InvalidArgument(_)), "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mebibytes_round_trip_as_a_multipart_upload() {
    let store = common::store_with(common::config().part_size(MIN_PART_SIZE)).await;
    let body = pattern(20 * MIB + 12_345, 7);
    let options = PutOptions {
        content_type: Some("application/zip".into()),
    };
    let started = std::time::Instant::now();
    let meta = store
        .put("big/20m.zip", chunked(&body), options)
        .await
        .unwrap();
    let put_time = started.elapsed();
    assert_eq!(meta.size, body.len() as u64);

    // The server saw a multipart upload: the ETag of one is "<md5 of part md5s>-<parts>".
    let head = store
        .client()
        .head_object()
        .bucket(store.bucket())
        .key(store.object_key("big/20m.zip"))
        .send()
        .await
        .unwrap();
    let etag = head
        .e_tag()
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned();
    assert!(
        etag.ends_with("-5"),
        "expected a 5-part multipart ETag, got {etag:?}"
    );
    assert_eq!(head.content_type(), Some("application/zip"));

    let got = store.get("big/20m.zip", None).await.unwrap().unwrap();
    assert_eq!(got.meta.size, body.len() as u64);
    let got = collect_bytes(got.body).await.unwrap();
    assert!(got.as_ref() == body.as_slice(), "multipart object differs");

    // A range across the boundary of parts 1 and 2.
    let from = (MIN_PART_SIZE - 10) as u64;
    let part = store
        .get("big/20m.zip", Some(from..from + 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(part.range, from..from + 20);
    assert_eq!(part.meta.size, body.len() as u64);
    let part = collect_bytes(part.body).await.unwrap();
    assert_eq!(part.as_ref(), &body[from as usize..from as usize + 20]);

    // And the presigned URL serves all of it.
    let url = store
        .presign_get("big/20m.zip", Duration::from_secs(60), "big.zip")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    match fetch(&url.url).await {
        Fetched::Ok { body: got, .. } => {
            assert!(
                got.as_ref() == body.as_slice(),
                "presigned multipart object differs"
            )
        }
        Fetched::Refused(status) => panic!("refused with {status}"),
    }
    eprintln!(
        "20 MiB multipart put: {put_time:?}; presigned download: {:?}",
        started.elapsed()
    );
    store.delete("big/20m.zip").await.unwrap();
    assert!(store.head("big/20m.zip").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_just_above_the_part_size_uses_two_parts_and_below_it_one_put() {
    let store = common::store_with(common::config().part_size(MIN_PART_SIZE)).await;
    for (len, multipart) in [(MIN_PART_SIZE, false), (MIN_PART_SIZE + 1, true)] {
        let body = pattern(len, len as u32);
        let key = format!("edge/{len}.bin");
        store
            .put(&key, chunked(&body), PutOptions::default())
            .await
            .unwrap();
        let head = store
            .client()
            .head_object()
            .bucket(store.bucket())
            .key(store.object_key(&key))
            .send()
            .await
            .unwrap();
        let etag = head
            .e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned();
        assert_eq!(
            etag.ends_with("-2"),
            multipart,
            "{len} bytes: ETag {etag:?}"
        );
        let got = collect_bytes(store.get(&key, None).await.unwrap().unwrap().body)
            .await
            .unwrap();
        assert!(got.as_ref() == body.as_slice());
        store.delete(&key).await.unwrap();
    }
}

/// Collects what the store logs, to learn the id of the upload it aborted.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_multipart_put_aborts_its_upload() {
    let store = common::store_with(common::config().part_size(MIN_PART_SIZE)).await;
    // 6 MiB (one full part goes up), then the body fails.
    let first = Bytes::from(pattern(6 * MIB, 3));
    let failing = futures::stream::iter(vec![
        Ok(first),
        Err(std::io::Error::other("the producer broke")),
    ])
    .boxed();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("longjob_s3=debug"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let err = store
        .put("abort/x.bin", failing, PutOptions::default())
        .with_subscriber(subscriber)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the producer broke"), "{err}");
    assert!(store.head("abort/x.bin").await.unwrap().is_none());

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("s3 multipart upload aborted"), "log: {log}");
    let upload_id = log
        .split("upload_id=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the aborted upload's id in the log")
        .to_owned();

    // A live upload takes parts and lists them ...
    let client = store.client();
    let live_key = store.object_key("abort/live.bin");
    let live = client
        .create_multipart_upload()
        .bucket(store.bucket())
        .key(&live_key)
        .send()
        .await
        .unwrap();
    let live_id = live.upload_id().unwrap();
    client
        .upload_part()
        .bucket(store.bucket())
        .key(&live_key)
        .upload_id(live_id)
        .part_number(1)
        .body(Bytes::from_static(b"part").into())
        .send()
        .await
        .expect("a part of a live upload");
    let listed = client
        .list_parts()
        .bucket(store.bucket())
        .key(&live_key)
        .upload_id(live_id)
        .send()
        .await
        .expect("listing the parts of a live upload");
    assert_eq!(listed.parts().len(), 1);
    client
        .abort_multipart_upload()
        .bucket(store.bucket())
        .key(&live_key)
        .upload_id(live_id)
        .send()
        .await
        .unwrap();
    // ... the aborted one neither (S3 says NoSuchUpload; s3s-fs lists nothing, refuses parts).
    let key = store.object_key("abort/x.bin");
    let listed = client
        .list_parts()
        .bucket(store.bucket())
        .key(&key)
        .upload_id(&upload_id)
        .send()
        .await;
    assert!(
        listed.as_ref().map_or(true, |l| l.parts().is_empty()),
        "upload {upload_id} still holds parts after the failed put: {listed:?}"
    );
    let part = client
        .upload_part()
        .bucket(store.bucket())
        .key(&key)
        .upload_id(&upload_id)
        .part_number(2)
        .body(Bytes::from_static(b"late").into())
        .send()
        .await;
    assert!(
        part.is_err(),
        "upload {upload_id} still takes parts after the failed put"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_multipart_put_aborts_its_upload() {
    let store = common::store_with(common::config().part_size(MIN_PART_SIZE)).await;
    // 6 MiB (one full part goes up), then the body never ends.
    let stalled = futures::stream::iter(vec![Ok(Bytes::from(pattern(6 * MIB, 5)))])
        .chain(futures::stream::pending())
        .boxed();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("longjob_s3=trace"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let log = || String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let putter = store.clone();
    let put = tokio::spawn(
        async move {
            putter
                .put("cancel/x.bin", stalled, PutOptions::default())
                .await
        }
        .with_subscriber(subscriber),
    );
    longjob_core::testkit::within(20, "the first part to go up", async {
        while !log().contains("s3 part uploaded") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    put.abort();
    assert!(put.await.unwrap_err().is_cancelled());
    let upload_id = log()
        .split("upload_id=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the upload's id in the log")
        .to_owned();
    let key = store.object_key("cancel/x.bin");
    longjob_core::testkit::within(10, "the cancelled upload to be aborted", async {
        loop {
            let part = store
                .client()
                .upload_part()
                .bucket(store.bucket())
                .key(&key)
                .upload_id(&upload_id)
                .part_number(2)
                .body(Bytes::from_static(b"late").into())
                .send()
                .await;
            if part.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(store.head("cancel/x.bin").await.unwrap().is_none());
}

#[tokio::test]
async fn missing_key_is_none_not_an_error() {
    let store = common::store().await;
    assert!(store.head("nothing/here.zip").await.unwrap().is_none());
    assert!(store.get("nothing/here.zip", None).await.unwrap().is_none());
    assert!(
        store
            .get("nothing/here.zip", Some(0..10))
            .await
            .unwrap()
            .is_none()
    );
    store.delete("nothing/here.zip").await.unwrap();
}

#[tokio::test]
async fn ranges_outside_the_object_are_invalid_and_empty_objects_work() {
    let store = common::store().await;
    store
        .put(
            "r/ten",
            byte_stream(&b"0123456789"[..]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let err = store.get("r/ten", Some(10..20)).await.unwrap_err();
    assert!(matches!(err, BackendError::InvalidArgument(_)), "{err:?}");
    store
        .put("r/empty", byte_stream(Bytes::new()), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(store.head("r/empty").await.unwrap().unwrap().size, 0);
    let whole = store.get("r/empty", None).await.unwrap().unwrap();
    assert_eq!(whole.meta.size, 0);
    assert!(collect_bytes(whole.body).await.unwrap().is_empty());
    let none = store.get("r/empty", Some(0..0)).await.unwrap().unwrap();
    assert_eq!(none.range, 0..0);
}

#[tokio::test]
async fn wrong_credentials_give_a_clear_error_naming_the_cause() {
    let good = common::config();
    let (id, secret) = {
        let c = good.credentials.clone().expect("test credentials");
        (c.access_key_id, c.secret_access_key)
    };
    let cases = [
        (
            good.clone().credentials(&id, format!("{secret}-wrong")),
            "SignatureDoesNotMatch",
        ),
        // AWS S3 and MinIO say InvalidAccessKeyId; s3s-fs says NotSignedUp.
        (
            good.clone().credentials("no-such-access-key", &secret),
            "InvalidAccessKeyId|NotSignedUp",
        ),
    ];
    for (config, cause) in cases {
        let store = S3BlobStore::new(config).await.unwrap();
        let err = store.health().await.unwrap_err();
        let BackendError::Unauthorized { message, .. } = &err else {
            panic!("health with wrong credentials: {err:?}");
        };
        let names_cause = |m: &str| cause.split('|').any(|c| m.contains(c));
        assert!(names_cause(message), "{cause} not in {message:?}");
        assert!(!err.is_transient());
        let err = store
            .put("x/y.bin", byte_stream(&b"z"[..]), PutOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BackendError::Unauthorized { message, .. } if names_cause(message)),
            "put with wrong credentials: {err:?}"
        );
        // HEAD answers carry no code; the error still says what to check.
        let err = store.head("x/y.bin").await.unwrap_err();
        assert!(matches!(err, BackendError::Unauthorized { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn a_missing_bucket_and_an_unreachable_server_are_told_apart() {
    let config = common::config();
    let store = S3BlobStore::new(S3Config {
        bucket: format!("missing-{}", uuid::Uuid::now_v7().simple()),
        ..config.clone()
    })
    .await
    .unwrap();
    let err = store.health().await.unwrap_err();
    assert!(
        matches!(&err, BackendError::InvalidArgument(m) if m.contains("does not exist")),
        "{err:?}"
    );
    // Nothing listens on port 9 of loopback.
    let store = S3BlobStore::new(
        config
            .endpoint("http://127.0.0.1:9")
            .timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let err = store.health().await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn retention_deletes_old_objects_under_a_prefix_only() {
    let store = common::store().await;
    for key in ["results/a.zip", "results/b.zip", "other/c.zip"] {
        store
            .put(key, byte_stream(&b"r"[..]), PutOptions::default())
            .await
            .unwrap();
    }
    let past = chrono::Utc::now() - chrono::Duration::hours(1);
    assert_eq!(
        store
            .delete_prefix_older_than("results/", past)
            .await
            .unwrap(),
        0
    );
    let future = chrono::Utc::now() + chrono::Duration::seconds(5);
    assert_eq!(
        store
            .delete_prefix_older_than("results/", future)
            .await
            .unwrap(),
        2
    );
    assert!(store.head("results/a.zip").await.unwrap().is_none());
    assert!(store.head("results/b.zip").await.unwrap().is_none());
    assert!(store.head("other/c.zip").await.unwrap().is_some());
    let err = store
        .delete_prefix_older_than("../", future)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::InvalidArgument(_)));
}

#[tokio::test]
async fn for_bucket_shares_the_client_with_another_prefix() {
    let store = common::store().await;
    let prefix = store.key_prefix().to_owned();
    let source = store
        .for_bucket(store.bucket(), format!("{prefix}downloads"))
        .unwrap();
    source
        .put("f1.zip", byte_stream(&b"source"[..]), PutOptions::default())
        .await
        .unwrap();
    let seen = store.head("downloads/f1.zip").await.unwrap().unwrap();
    assert_eq!(seen.size, 6);
}

#[tokio::test]
async fn presigned_urls_can_name_a_public_endpoint() {
    let config = common::config();
    let Some(endpoint) = config.endpoint.clone() else {
        eprintln!("not applicable on AWS S3 (no S3_ENDPOINT): one endpoint for everybody");
        return;
    };
    // The same server under another name, as a browser outside a container network would see it.
    let public = endpoint.replace("127.0.0.1", "localhost");
    assert_ne!(public, endpoint, "the test needs a loopback S3_ENDPOINT");
    let store = common::store_with(config.public_endpoint(&public)).await;
    store
        .put(
            "p/x.bin",
            byte_stream(&b"public"[..]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let url = store
        .presign_get("p/x.bin", Duration::from_secs(60), "x.bin")
        .await
        .unwrap()
        .url;
    assert!(url.starts_with(&public), "{url}");
    match fetch(&url).await {
        Fetched::Ok { body, .. } => assert_eq!(body.as_ref(), b"public"),
        Fetched::Refused(status) => panic!("refused with {status}: {url}"),
    }
}
