//! The server on S3: results in the bucket under `results/`, presigned downloads from S3, and the
//! download files read from `downloads/<id>.zip` of the source bucket (as the replaced service did).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use longjob_axum::{FileInfo, FileSource};
use longjob_core::BackendResult;
use longjob_core::blob::{BlobBody, BlobMeta, BlobStore, ByteStream, PresignedUrl, PutOptions};
use longjob_s3::{S3BlobStore, S3Config, S3ConfigError};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, set};

/// The key prefix of results (the download job writes `results/<job id>.zip`).
pub const RESULTS_PREFIX: &str = "results/";

/// The key of file `file_id` in the source bucket (after the key prefix, if any).
pub fn source_key(file_id: u64) -> String {
    format!("downloads/{file_id}.zip")
}

/// The S3 configuration from the server's configuration (flags or environment), with the
/// settings the server has no flag for (`S3_PUBLIC_ENDPOINT`, `S3_KEY_PREFIX`, `S3_PART_SIZE`,
/// `S3_UPLOAD_CONCURRENCY`, `S3_TIMEOUT_SECS`) read from the environment.
pub fn s3_config(config: &Config) -> Result<S3Config, S3ConfigError> {
    S3Config::from_lookup(|name| match name {
        "S3_BUCKET_NAME" => set(&config.s3_bucket_name).map(str::to_owned),
        "S3_ENDPOINT" => set(&config.s3_endpoint).map(str::to_owned),
        "S3_REGION" => set(&config.s3_region).map(str::to_owned),
        "S3_ACCESS_KEY_ID" => set(&config.s3_access_key_id).map(str::to_owned),
        "S3_SECRET_ACCESS_KEY" => set(&config.s3_secret_access_key).map(str::to_owned),
        "S3_FORCE_PATH_STYLE" => config.s3_force_path_style.map(|b| b.to_string()),
        other => std::env::var(other).ok(),
    })
}

/// The download files in a bucket: `check` is a `HeadObject` of `downloads/<id>.zip`, `read`
/// a streamed `GetObject` of it.
#[derive(Debug, Clone)]
pub struct S3Source {
    store: S3BlobStore,
}

impl S3Source {
    /// The files of `store`'s bucket (and key prefix).
    pub fn new(store: S3BlobStore) -> Self {
        Self { store }
    }
}

#[async_trait]
impl FileSource for S3Source {
    async fn check(&self, file_id: u64) -> BackendResult<Option<FileInfo>> {
        // The key as the replaced service reported it (without S3_KEY_PREFIX): with the source
        // in the results bucket, the legacy `/start` finds this very object in the results
        // store and presigns it without copying it.
        let key = source_key(file_id);
        Ok(self.store.head(&key).await?.map(|meta| FileInfo {
            key,
            size: meta.size,
        }))
    }

    async fn read(&self, file_id: u64) -> BackendResult<Option<ByteStream>> {
        Ok(self
            .store
            .get(&source_key(file_id), None)
            .await?
            .map(|b| b.body))
    }
}

/// The results store when the source is another bucket: the same store, whose health check
/// also asks the source bucket (a job needs both).
#[derive(Debug, Clone)]
pub struct ResultsAndSource {
    /// Where results go.
    pub results: S3BlobStore,
    /// Where files come from.
    pub source: S3BlobStore,
}

#[async_trait]
impl BlobStore for ResultsAndSource {
    async fn put(
        &self,
        key: &str,
        body: ByteStream,
        options: PutOptions,
    ) -> BackendResult<BlobMeta> {
        self.results.put(key, body, options).await
    }

    async fn head(&self, key: &str) -> BackendResult<Option<BlobMeta>> {
        self.results.head(key).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> BackendResult<Option<BlobBody>> {
        self.results.get(key, range).await
    }

    async fn presign_get(
        &self,
        key: &str,
        ttl: Duration,
        file_name: &str,
    ) -> BackendResult<PresignedUrl> {
        self.results.presign_get(key, ttl, file_name).await
    }

    async fn delete(&self, key: &str) -> BackendResult<()> {
        self.results.delete(key).await
    }

    async fn health(&self) -> BackendResult<()> {
        let (results, source) = tokio::join!(self.results.health(), self.source.health());
        // The errors of longjob-s3 name the bucket.
        results?;
        source
    }
}

/// Deletes, now and then every `every`, the result objects last modified more than `retention`
/// ago: results no job refers to any more (their job was purged while the delete failed, or the
/// in-memory store forgot them in a restart). Stops when `stop` is cancelled.
pub fn spawn_sweep(
    store: S3BlobStore,
    retention: Duration,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let store = Arc::new(store);
    tokio::spawn(async move {
        loop {
            let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
            if let Some(cutoff) = chrono::Utc::now().checked_sub_signed(retention) {
                match store.delete_prefix_older_than(RESULTS_PREFIX, cutoff).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        objects = n,
                        bucket = store.bucket(),
                        "swept result objects past their retention"
                    ),
                    Err(e) => tracing::warn!(error = %e, "result sweep failed"),
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
        }
    })
}
