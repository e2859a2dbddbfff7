//! The `LongJob` facade with its results on S3: a handler streams a result into the bucket,
//! the download URL is an S3 presigned URL serving it, and purging the job deletes the object.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use longjob_core::blob::{BlobStore, PutOptions};
use longjob_core::testkit::blob::Fetched;
use longjob_core::{JobResult, JobState, LongJob, LongJobConfig, SubmitRequest};
use longjob_s3::MIN_PART_SIZE;

fn chunk(i: u32) -> Bytes {
    Bytes::from(vec![(i % 251) as u8; 6 * 1024 * 1024 / 100])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_result_is_put_presigned_and_purged_on_s3() {
    let store = common::store_with(common::config().part_size(MIN_PART_SIZE)).await;
    let mut config = LongJobConfig::default();
    config.jobs_per_hour = None;
    config.retention = Duration::ZERO;
    config.presign_ttl = Duration::from_secs(120);
    let lj = LongJob::builder()
        .blobs(Arc::new(store.clone()))
        .config(config)
        .build();

    // 6 MiB in 100 chunks: a two-part multipart upload.

    let expected: Vec<u8> = (0..100).flat_map(|i| chunk(i).to_vec()).collect();
    let size = expected.len() as u64;
    let worker = lj
        .worker()
        .handle("zip", move |ctx, _: serde_json::Value| async move {
            let body = futures::stream::iter((0..100).map(|i| Ok(chunk(i)))).boxed();
            let options = PutOptions {
                content_type: Some("application/zip".into()),
            };
            let meta = ctx.blobs().put("results/r.zip", body, options).await?;
            Ok(Some(JobResult {
                blob_key: "results/r.zip".into(),
                size: meta.size,
                file_name: "export 2026.zip".into(),
                content_type: Some("application/zip".into()),
            }))
        })
        .start();
    let id = lj
        .submit(SubmitRequest::new("zip", "alice", serde_json::json!({})))
        .await
        .unwrap()
        .job
        .id;
    let job = longjob_core::testkit::within(30, "the job to finish", lj.wait_finished(id, "alice"))
        .await
        .unwrap();
    worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");

    let url = lj.download_url(id, "alice").await.unwrap();
    assert_eq!(url.size, size);
    assert!(url.url.contains("X-Amz-Signature="), "{}", url.url);
    assert!(
        url.url.contains(&store.object_key("results/r.zip")),
        "{}",
        url.url
    );
    match (common::fetcher())(url.url.clone()).await {
        Fetched::Ok { body, .. } => assert!(body.as_ref() == expected.as_slice()),
        Fetched::Refused(status) => panic!("download URL refused with {status}"),
    }

    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(lj.purge_expired().await.unwrap(), 1);
    assert!(store.head("results/r.zip").await.unwrap().is_none());
    assert!(matches!(
        (common::fetcher())(url.url).await,
        Fetched::Refused(404)
    ));
}
