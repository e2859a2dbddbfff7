//! Which backends the server runs on.
//!
//! Embedded defaults: in-memory store, queue and bus; blobs on local disk. With `S3_BUCKET_NAME`
//! results go to S3 and files come from the source bucket (see [`crate::s3`]). The extension
//! points for the other backends are the two `if` arms below: when the crates `longjob-redis` and
//! `longjob-postgres` are added to this package, each arm builds its backend from the
//! configuration and the rest of the server does not change.

use std::sync::Arc;

use longjob_axum::FileSource;
use longjob_core::local_disk::LocalDiskBlobStore;
use longjob_core::memory::{MemoryJobStore, MemoryProgressBus, MemoryQueue};
use longjob_core::signing::UrlSigner;
use longjob_core::{BlobStore, JobStore, ProgressBus, Queue};
use longjob_s3::S3BlobStore;

use crate::config::{Config, set};
use crate::mock::MockSource;
use crate::s3::{ResultsAndSource, S3Source};

/// The four backends, their names for the start-up line, and the signer of local URLs.
#[derive(Debug)]
pub struct Backends {
    /// The job store.
    pub store: Arc<dyn JobStore>,
    /// The queue.
    pub queue: Arc<dyn Queue>,
    /// The progress bus.
    pub bus: Arc<dyn ProgressBus>,
    /// Result storage.
    pub blobs: Arc<dyn BlobStore>,
    /// Where the download service's files come from (the mock rule, or the source bucket).
    pub source: Arc<dyn FileSource>,
    /// The signer of the local file route, when the blob store is a built-in one.
    pub signer: Option<UrlSigner>,
    /// With S3: the results store, for the periodic sweep of results past their retention.
    pub s3_results: Option<S3BlobStore>,
    /// `store=memory queue=memory bus=memory blobs=local-disk(./.run/blobs)`.
    pub description: String,
}

/// A configuration this build cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum BackendConfigError {
    /// A backend is configured whose crate is not part of this build yet.
    #[error(
        "{var} is set, but this build of longjob-server has no {backend} backend yet; unset it to run on the embedded defaults"
    )]
    NotBuiltIn {
        /// The variable.
        var: &'static str,
        /// The backend.
        backend: &'static str,
    },
    /// The S3 settings cannot work.
    #[error("S3: {0}")]
    S3Config(#[from] longjob_s3::S3ConfigError),
    /// The S3 store cannot be built.
    #[error("S3: {0}")]
    S3(longjob_core::BackendError),
    /// The local blob directory cannot be used.
    #[error("BLOB_DIR: {0}")]
    BlobDir(longjob_core::BackendError),
}

/// Builds the backends `config` names.
pub async fn build(config: &Config, prefix: &str) -> Result<Backends, BackendConfigError> {
    // Extension point: Redis (queue, bus, and store unless DATABASE_URL names PostgreSQL).
    if set(&config.redis_url).is_some() {
        return Err(BackendConfigError::NotBuiltIn {
            var: "REDIS_URL",
            backend: "Redis",
        });
    }
    // Extension point: PostgreSQL (store; queue and bus too when Redis is not set).
    if set(&config.database_url).is_some() {
        return Err(BackendConfigError::NotBuiltIn {
            var: "DATABASE_URL",
            backend: "PostgreSQL",
        });
    }
    // S3: results in the bucket, and the source of files instead of the mock rule.
    if set(&config.s3_bucket_name).is_some() {
        return build_s3(config).await;
    }
    let base = format!("{}{prefix}/files", config.public_url());
    let signer = match set(&config.signing_secret) {
        Some(secret) => UrlSigner::new(secret.as_bytes(), base),
        None => UrlSigner::random(base),
    };
    let blobs = LocalDiskBlobStore::new(&config.blob_dir, signer.clone())
        .await
        .map_err(BackendConfigError::BlobDir)?;
    Ok(Backends {
        store: Arc::new(MemoryJobStore::new()),
        queue: Arc::new(MemoryQueue::new()),
        bus: Arc::new(MemoryProgressBus::default()),
        blobs: Arc::new(blobs),
        source: Arc::new(MockSource),
        signer: Some(signer),
        s3_results: None,
        description: format!(
            "store=memory queue=memory bus=memory blobs=local-disk({})",
            config.blob_dir
        ),
    })
}

/// Results in `S3_BUCKET_NAME` under `results/` (after `S3_KEY_PREFIX`, if set), downloads by
/// S3 presigned URLs, files from `downloads/<id>.zip` of `S3_SOURCE_BUCKET` (default: the same
/// bucket, same key prefix). No call is made here: a server whose storage does not answer still
/// starts, and says so on `/health`.
async fn build_s3(config: &Config) -> Result<Backends, BackendConfigError> {
    let s3 = crate::s3::s3_config(config)?;
    let endpoint = s3.endpoint.clone().unwrap_or_else(|| "AWS".to_owned());
    let results = S3BlobStore::new(s3).await.map_err(BackendConfigError::S3)?;
    let source_bucket = set(&config.s3_source_bucket)
        .unwrap_or(results.bucket())
        .to_owned();
    let source = results
        .for_bucket(source_bucket.clone(), results.key_prefix().to_owned())
        .map_err(BackendConfigError::S3)?;
    let description = format!(
        "store=memory queue=memory bus=memory blobs=s3({endpoint} bucket={} keys={}{}<job>.zip, presigned URLs) source=s3(bucket={source_bucket} keys={}downloads/<id>.zip)",
        results.bucket(),
        results.key_prefix(),
        crate::s3::RESULTS_PREFIX,
        source.key_prefix(),
    );
    let blobs: Arc<dyn BlobStore> = if source_bucket == results.bucket() {
        Arc::new(results.clone())
    } else {
        Arc::new(ResultsAndSource {
            results: results.clone(),
            source: source.clone(),
        })
    };
    Ok(Backends {
        store: Arc::new(MemoryJobStore::new()),
        queue: Arc::new(MemoryQueue::new()),
        bus: Arc::new(MemoryProgressBus::default()),
        blobs,
        source: Arc::new(S3Source::new(source)),
        signer: None,
        s3_results: Some(results),
        description,
    })
}
