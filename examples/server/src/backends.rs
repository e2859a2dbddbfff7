//! Which backends the server runs on.
//!
//! Embedded defaults: in-memory store, queue and bus; blobs on local disk. `REDIS_URL` puts the
//! store, queue and bus in Redis; `DATABASE_URL` puts the store in PostgreSQL (and the queue and
//! bus too, unless Redis is set). With `S3_BUCKET_NAME` results go to S3 and files come from the
//! source bucket (see [`crate::s3`]).

use std::sync::Arc;

use longjob_axum::FileSource;
use longjob_core::local_disk::LocalDiskBlobStore;
use longjob_core::memory::{MemoryJobStore, MemoryProgressBus, MemoryQueue};
use longjob_core::signing::UrlSigner;
use longjob_core::{BlobStore, JobStore, ProgressBus, Queue};
use longjob_postgres::{PgBackend, PgConfig};
use longjob_redis::{Redis, RedisConfig};
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

/// A configuration the server cannot run on.
#[derive(Debug, thiserror::Error)]
pub enum BackendConfigError {
    /// The S3 settings cannot work.
    #[error("S3: {0}")]
    S3Config(#[from] longjob_s3::S3ConfigError),
    /// The S3 store cannot be built.
    #[error("S3: {0}")]
    S3(longjob_core::BackendError),
    /// The local blob directory cannot be used.
    #[error("BLOB_DIR: {0}")]
    BlobDir(longjob_core::BackendError),
    /// Redis cannot be reached.
    #[error("REDIS_URL {0}: {1}")]
    Redis(String, longjob_core::BackendError),
    /// PostgreSQL cannot be reached or migrated.
    #[error("DATABASE_URL: {0}")]
    Postgres(longjob_core::BackendError),
}

/// Builds the backends `config` names.
pub async fn build(config: &Config, prefix: &str) -> Result<Backends, BackendConfigError> {
    // S3: results in the bucket, and the source of files instead of the mock rule.
    let mut backends = if set(&config.s3_bucket_name).is_some() {
        build_s3(config).await?
    } else {
        build_local(config, prefix).await?
    };
    // Store, queue and bus: Redis and/or PostgreSQL when configured, else in memory.
    if let Some((store, queue, bus, description)) = build_jobs(config).await? {
        backends.store = store;
        backends.queue = queue;
        backends.bus = bus;
        backends.description =
            backends
                .description
                .replacen("store=memory queue=memory bus=memory", &description, 1);
    }
    Ok(backends)
}

type JobBackends = (
    Arc<dyn JobStore>,
    Arc<dyn Queue>,
    Arc<dyn ProgressBus>,
    String,
);

/// `REDIS_URL`: queue and bus on Redis, and the store too unless `DATABASE_URL` is set.
/// `DATABASE_URL`: the store on PostgreSQL, and the queue and bus too unless `REDIS_URL` is set.
async fn build_jobs(config: &Config) -> Result<Option<JobBackends>, BackendConfigError> {
    let redis = match set(&config.redis_url) {
        Some(url) => Some(
            Redis::connect(RedisConfig::new(url).prefix(config.redis_prefix.clone()))
                .await
                .map_err(|e| BackendConfigError::Redis(url.to_owned(), e))?,
        ),
        None => None,
    };
    let pg = match set(&config.database_url) {
        Some(url) => Some(
            PgBackend::connect(PgConfig::new(url).schema(config.database_schema.clone()))
                .await
                .map_err(BackendConfigError::Postgres)?,
        ),
        None => None,
    };
    Ok(match (redis, pg) {
        (None, None) => None,
        (Some(redis), None) => Some((
            Arc::new(redis.store()),
            Arc::new(redis.queue()),
            Arc::new(redis.bus()),
            format!(
                "store=redis queue=redis bus=redis (prefix {{{}}})",
                redis.config().prefix
            ),
        )),
        (None, Some(pg)) => Some((
            Arc::new(pg.store()),
            Arc::new(pg.queue()),
            Arc::new(pg.bus()),
            format!(
                "store=postgres queue=postgres bus=postgres (schema {})",
                pg.schema()
            ),
        )),
        (Some(redis), Some(pg)) => Some((
            Arc::new(pg.store()),
            Arc::new(redis.queue()),
            Arc::new(redis.bus()),
            format!(
                "store=postgres (schema {}) queue=redis bus=redis (prefix {{{}}})",
                pg.schema(),
                redis.config().prefix
            ),
        )),
    })
}

/// The in-memory store, bounded by `MEMORY_MAX_JOBS` unless it is 0; an evicted job's events
/// leave `bus` with it, rather than at the next purge.
fn memory_store(config: &Config, bus: &MemoryProgressBus) -> Arc<MemoryJobStore> {
    Arc::new(match config.memory_max_jobs {
        0 => MemoryJobStore::new(),
        max => {
            let bus = bus.clone();
            MemoryJobStore::with_max_jobs(max).on_evict(move |id| bus.forget(id))
        }
    })
}

/// Blobs on local disk, served by the signed file route; files by the mock rule.
async fn build_local(config: &Config, prefix: &str) -> Result<Backends, BackendConfigError> {
    let base = format!("{}{prefix}/files", config.public_url());
    let signer = match set(&config.signing_secret) {
        Some(secret) => UrlSigner::new(secret.as_bytes(), base),
        None => UrlSigner::random(base),
    };
    let blobs = LocalDiskBlobStore::new(&config.blob_dir, signer.clone())
        .await
        .map_err(BackendConfigError::BlobDir)?;
    let bus = MemoryProgressBus::default();
    Ok(Backends {
        store: memory_store(config, &bus),
        queue: Arc::new(MemoryQueue::new()),
        bus: Arc::new(bus),
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
    let bus = MemoryProgressBus::default();
    Ok(Backends {
        store: memory_store(config, &bus),
        queue: Arc::new(MemoryQueue::new()),
        bus: Arc::new(bus),
        blobs,
        source: Arc::new(S3Source::new(source)),
        signer: None,
        s3_results: Some(results),
        description,
    })
}
