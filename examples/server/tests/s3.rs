//! The server on S3, against a real SigV4-checking S3 server (the one `scripts/services/s3.sh`
//! starts, or the one S3_ENDPOINT, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_BUCKET_NAME and
//! S3_REGION name): the source bucket is seeded with `downloads/<id>.zip` objects, a job runs
//! through the HTTP API, and its archive is downloaded from the S3 server by its presigned URL.
//!
//! Every test works under its own key prefix `test-<uuid>/` (S3_KEY_PREFIX of the server), which
//! `scripts/services/s3.sh` clears at its next start.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use common::Server;
use longjob_core::BackendError;
use longjob_core::blob::{BlobStore, PutOptions, byte_stream};
use longjob_s3::{S3BlobStore, S3Config};
use serde_json::{Value, json};

/// The defaults match scripts/services/s3.sh.
const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:9100";
const DEFAULT_ACCESS_KEY_ID: &str = "longjob-test-access";
const DEFAULT_SECRET_ACCESS_KEY: &str = "longjob-test-secret";
const DEFAULT_BUCKET: &str = "longjob-test";
const DEFAULT_REGION: &str = "us-east-1";

/// The S3 server under test, and a key prefix of this test's own.
struct S3Env {
    endpoint: String,
    access_key_id: String,
    secret_access_key: String,
    bucket: String,
    region: String,
    prefix: String,
}

impl S3Env {
    fn new() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Self {
            endpoint: var("S3_ENDPOINT", DEFAULT_ENDPOINT),
            access_key_id: var("S3_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY_ID),
            secret_access_key: var("S3_SECRET_ACCESS_KEY", DEFAULT_SECRET_ACCESS_KEY),
            bucket: var("S3_BUCKET_NAME", DEFAULT_BUCKET),
            region: var("S3_REGION", DEFAULT_REGION),
            prefix: format!("test-{}/", uuid::Uuid::now_v7()),
        }
    }

    /// A store on the bucket under the test's prefix; fails (never skips) when the S3 server
    /// does not answer.
    async fn store(&self) -> S3BlobStore {
        let config = S3Config::new(&self.bucket)
            .endpoint(&self.endpoint)
            .region(&self.region)
            .force_path_style(true)
            .credentials(&self.access_key_id, &self.secret_access_key)
            .key_prefix(&self.prefix);
        let store = S3BlobStore::new(config).await.unwrap();
        if let Err(e) = store.health().await {
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
                    "the S3 server at {} does not answer as expected: {e}. Start it with \
                     `bash scripts/services/s3.sh`, or point S3_ENDPOINT, S3_ACCESS_KEY_ID, \
                     S3_SECRET_ACCESS_KEY and S3_BUCKET_NAME at another one.",
                    self.endpoint
                ),
            }
        }
        store
    }

    /// The server's S3 variables.
    fn server_vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("S3_BUCKET_NAME", self.bucket.clone()),
            ("S3_ENDPOINT", self.endpoint.clone()),
            ("S3_REGION", self.region.clone()),
            ("S3_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("S3_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("S3_FORCE_PATH_STYLE", "true".into()),
            ("S3_KEY_PREFIX", self.prefix.clone()),
            ("DOWNLOAD_DELAY_ENABLED", "false".into()),
        ]
    }
}

async fn start(vars: &[(&'static str, String)], healthy: bool) -> Server {
    let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_with(&env, healthy).await
}

/// Deterministic bytes of `len`, different per `seed`.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Puts `downloads/<id>.zip` for each file.
async fn seed(store: &S3BlobStore, files: &BTreeMap<u64, Vec<u8>>) {
    for (id, bytes) in files {
        store
            .put(
                &format!("downloads/{id}.zip"),
                byte_stream(bytes.clone()),
                PutOptions {
                    content_type: Some("application/zip".into()),
                },
            )
            .await
            .unwrap();
    }
}

async fn check(s: &Server, id: u64) -> Value {
    let res = s
        .post_json("/v1/download/check", &json!({ "file_id": id }))
        .await;
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test]
async fn a_job_on_s3_gathers_the_seeded_files_and_is_downloaded_from_s3_by_presigned_url() {
    let s3 = S3Env::new();
    let store = s3.store().await;
    // One file above the 8 MiB part size would not be needed for the source; the archive of
    // these is above it, so the result goes up as a multipart upload.
    let files: BTreeMap<u64, Vec<u8>> = [
        (70_001u64, content(1, 1500)),
        (70_002, content(2, 9 * 1024 * 1024 + 17)),
        (70_003, content(3, 0)),
        (70_005, content(5, 300_000)),
    ]
    .into_iter()
    .collect();
    seed(&store, &files).await;
    let missing = 70_004u64;

    let s = start(&s3.server_vars(), true).await;
    assert!(
        s.log().contains("blobs=s3(") && s.log().contains(&s3.bucket),
        "the start line names the S3 backend:\n{}",
        s.log()
    );

    // /check: a HEAD on downloads/<id>.zip.
    let body = check(&s, 70_002).await;
    assert_eq!(body["available"], true, "{body}");
    assert_eq!(body["size"], files[&70_002].len() as u64, "{body}");
    assert_eq!(body["s3Key"], "downloads/70002.zip", "{body}");
    let body = check(&s, missing).await;
    assert_eq!(body["available"], false, "{body}");
    assert!(body["size"].is_null(), "{body}");

    let health = s.get("/health").await;
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["checks"]["storage"], "ok", "{health}");

    let mut ids: Vec<u64> = files.keys().copied().collect();
    ids.push(missing);
    let id = s.initiate(&ids, None).await;
    let done = s
        .wait_status(&id, None, Duration::from_secs(60), |b| {
            matches!(
                b["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
        .await;
    assert_eq!(done["status"], "completed", "{done}\n{}", s.log());
    for f in done["files"].as_array().unwrap() {
        let fid = f["file_id"].as_u64().unwrap();
        if fid == missing {
            assert_eq!(f["status"], "failed", "{f}");
        } else {
            assert_eq!(f["status"], "completed", "{f}");
            assert_eq!(f["size"], files[&fid].len() as u64, "{f}");
        }
    }

    // The result is in the bucket under results/, and the URL is the S3 server's, presigned.
    let result_key = format!("results/{id}.zip");
    let meta = store
        .head(&result_key)
        .await
        .unwrap()
        .expect("result in S3");
    let res = s.get(&format!("/v1/download/job/{id}/download-url")).await;
    assert_eq!(res.status(), 200);
    let url: Value = res.json().await.unwrap();
    let link = url["downloadUrl"].as_str().unwrap();
    let expected_prefix = format!("{}/{}/{}{result_key}?", s3.endpoint, s3.bucket, s3.prefix);
    assert!(link.starts_with(&expected_prefix), "{link}");
    assert!(link.contains("X-Amz-Signature="), "{link}");
    assert_eq!(url["fileSize"], meta.size, "{url}");

    let res = reqwest::get(link).await.unwrap();
    assert_eq!(res.status(), 200);
    // The file name is a signed parameter of the URL; servers that echo it send the header.
    assert!(
        link.contains("response-content-disposition=attachment"),
        "{link}"
    );
    if let Some(disposition) = res.headers().get("content-disposition") {
        let disposition = disposition.to_str().unwrap();
        assert!(
            disposition.starts_with("attachment;") && disposition.contains(".zip"),
            "{disposition}"
        );
    }
    let bytes = res.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, meta.size);
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let mut names: Vec<String> = archive.file_names().map(str::to_owned).collect();
    names.sort();
    let expected: Vec<String> = files.keys().map(|id| format!("{id}.zip")).collect();
    assert_eq!(names, expected, "exactly the available files");
    for (fid, want) in &files {
        let mut entry = archive.by_name(&format!("{fid}.zip")).unwrap();
        let mut got = Vec::new();
        entry.read_to_end(&mut got).unwrap();
        assert!(
            got == *want,
            "entry {fid}: {} bytes, want {}",
            got.len(),
            want.len()
        );
    }

    // The legacy synchronous /start: a presigned URL of the source object itself.
    let res = s
        .post_json("/v1/download/start", &json!({ "file_id": 70_005 }))
        .await;
    assert_eq!(res.status(), 200);
    let started: Value = res.json().await.unwrap();
    assert_eq!(started["status"], "completed", "{started}");
    let start_link = started["downloadUrl"].as_str().unwrap();
    assert!(
        start_link.starts_with(&format!(
            "{}/{}/{}downloads/70005.zip?",
            s3.endpoint, s3.bucket, s3.prefix
        )),
        "{start_link}"
    );
    let fetched = reqwest::get(start_link).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert!(fetched.bytes().await.unwrap()[..] == files[&70_005][..]);

    // A changed signature is refused by the S3 server itself.
    let at = link.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let flipped = if &link[at..=at] == "0" { "1" } else { "0" };
    let tampered = format!("{}{flipped}{}", &link[..at], &link[at + 1..]);
    let res = reqwest::get(&tampered).await.unwrap();
    assert_eq!(res.status(), 403);
}

#[tokio::test]
async fn health_is_unhealthy_with_a_wrong_secret() {
    let s3 = S3Env::new();
    // The server under test answers: this test fails rather than passes without it.
    let _ = s3.store().await;
    let mut vars = s3.server_vars();
    for (k, v) in &mut vars {
        if *k == "S3_SECRET_ACCESS_KEY" {
            *v = "not-the-secret".into();
        }
    }
    let s = start(&vars, false).await;
    let res = s.get("/health").await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "unhealthy", "{body}");
    assert_eq!(body["checks"]["storage"], "error", "{body}");
    let why = body["error"]["storage"].as_str().unwrap_or_default();
    assert!(
        why.contains("SignatureDoesNotMatch") || why.contains("denied"),
        "{body}"
    );
    // /check cannot ask S3 either: an error (500 for refused credentials), never "not available".
    let res = s
        .post_json("/v1/download/check", &json!({ "file_id": 70_000 }))
        .await;
    assert!(
        res.status().is_server_error(),
        "{}",
        res.text().await.unwrap()
    );
}

/// Polls until `done` holds, at most 30 s.
async fn eventually<F, Fut>(what: &str, s: &Server, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within 30 s\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn results_past_the_retention_are_deleted_from_the_bucket() {
    let s3 = S3Env::new();
    let store = s3.store().await;
    let files: BTreeMap<u64, Vec<u8>> = [(70_001u64, content(7, 4096))].into_iter().collect();
    seed(&store, &files).await;
    // A result no job refers to (as after a restart of an in-memory store): the sweep's.
    let stray = "results/stray.zip";
    store
        .put(stray, byte_stream(&b"PK"[..]), PutOptions::default())
        .await
        .unwrap();

    // 1. The purge alone (no sweep): the expired job goes, and its result object with it.
    let mut vars = s3.server_vars();
    vars.extend([
        ("RETENTION_SECS", "2".to_owned()),
        ("PURGE_INTERVAL_SECS", "1".to_owned()),
        ("S3_SWEEP_INTERVAL_SECS", "0".to_owned()),
    ]);
    let s = start(&vars, true).await;
    let id = s.initiate(&[70_001], None).await;
    let done = s.wait_finished(&id, None).await;
    assert_eq!(done["status"], "completed", "{done}");
    let result_key = format!("results/{id}.zip");
    assert!(store.head(&result_key).await.unwrap().is_some());
    eventually("the purge deletes the job and its result", &s, || async {
        s.get(&format!("/v1/download/job/{id}")).await.status() == 404
            && store.head(&result_key).await.unwrap().is_none()
    })
    .await;
    assert!(
        store.head(stray).await.unwrap().is_some(),
        "no sweep in this run"
    );
    drop(s);

    // 2. The sweep alone (no purge): objects under results/ older than the retention go.
    let mut vars = s3.server_vars();
    vars.extend([
        ("RETENTION_SECS", "2".to_owned()),
        ("PURGE_INTERVAL_SECS", "0".to_owned()),
        ("S3_SWEEP_INTERVAL_SECS", "1".to_owned()),
    ]);
    let s = start(&vars, true).await;
    eventually("the sweep deletes the stray result", &s, || async {
        store.head(stray).await.unwrap().is_none()
    })
    .await;
    // The source files are not the sweep's.
    assert!(store.head("downloads/70001.zip").await.unwrap().is_some());
}

#[tokio::test]
async fn files_can_come_from_a_separate_source_bucket() {
    let s3 = S3Env::new();
    let results = s3.store().await;
    // A second bucket on the same server, made when missing.
    let source_bucket = format!("{}-source", s3.bucket);
    let source = results
        .for_bucket(source_bucket.clone(), s3.prefix.clone())
        .unwrap();
    if let Err(e) = results
        .client()
        .create_bucket()
        .bucket(&source_bucket)
        .send()
        .await
    {
        let code = aws_sdk_s3::error::ProvideErrorMetadata::code(&e).map(str::to_owned);
        assert!(
            matches!(
                code.as_deref(),
                Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
            ),
            "creating {source_bucket}: {e:?}"
        );
    }
    let files: BTreeMap<u64, Vec<u8>> =
        [(70_011u64, content(11, 70_000)), (70_012, content(12, 5))]
            .into_iter()
            .collect();
    seed(&source, &files).await;

    let mut vars = s3.server_vars();
    vars.push(("S3_SOURCE_BUCKET", source_bucket.clone()));
    let s = start(&vars, true).await;
    assert!(
        s.log()
            .contains(&format!("source=s3(bucket={source_bucket}"))
    );
    assert_eq!(check(&s, 70_011).await["size"], 70_000);
    // Not in the results bucket, so not available.
    seed(
        &results,
        &[(70_013u64, content(13, 10))].into_iter().collect(),
    )
    .await;
    assert_eq!(check(&s, 70_013).await["available"], false);

    let id = s.initiate(&[70_011, 70_012, 70_013], None).await;
    let done = s.wait_finished(&id, None).await;
    assert_eq!(done["status"], "completed", "{done}");
    let url: Value = s
        .get(&format!("/v1/download/job/{id}/download-url"))
        .await
        .json()
        .await
        .unwrap();
    let bytes = reqwest::get(url["downloadUrl"].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    assert_eq!(archive.len(), 2);
    for (fid, want) in &files {
        let mut got = Vec::new();
        archive
            .by_name(&format!("{fid}.zip"))
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert!(got == *want, "entry {fid}");
    }
    // The result is in the results bucket, not the source bucket.
    assert!(
        results
            .head(&format!("results/{id}.zip"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        source
            .head(&format!("results/{id}.zip"))
            .await
            .unwrap()
            .is_none()
    );

    // s3.sh clears test prefixes of the main bucket only: leave nothing behind here.
    for fid in files.keys() {
        source
            .delete(&format!("downloads/{fid}.zip"))
            .await
            .unwrap();
    }
}
