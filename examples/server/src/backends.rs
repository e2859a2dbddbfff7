//! Which backends the server runs on.
//!
//! Embedded defaults: in-memory store, queue and bus; blobs on local disk. The extension points
//! for the other backends are the three `match` arms below: when the crates `longjob-redis`,
//! `longjob-postgres` and `longjob-s3` are added to this package, each arm builds its backend
//! from the configuration and the rest of the server does not change.

use std::sync::Arc;

use longjob_axum::FileSource;
use longjob_core::local_disk::LocalDiskBlobStore;
use longjob_core::memory::{MemoryJobStore, MemoryProgressBus, MemoryQueue};
use longjob_core::signing::UrlSigner;
use longjob_core::{BlobStore, JobStore, ProgressBus, Queue};

use crate::config::{Config, set};
use crate::mock::MockSource;

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
    // Extension point: S3 (results, and the source of files instead of the mock rule).
    if set(&config.s3_bucket_name).is_some() {
        return Err(BackendConfigError::NotBuiltIn {
            var: "S3_BUCKET_NAME",
            backend: "S3",
        });
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
        description: format!(
            "store=memory queue=memory bus=memory blobs=local-disk({})",
            config.blob_dir
        ),
    })
}
