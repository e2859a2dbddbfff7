//! longjob-server: the reference server. The download API of API.md, its workers and the demo
//! page in one process; configuration from the environment (or `--flags`, see `--help`).

mod backends;
mod config;
mod job;
mod mock;
mod s3;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use clap::Parser;
use longjob_axum::{ApiBuilder, ApiKeys, Delay, Downloads, HttpConfig, RateLimit};
use longjob_core::{LongJob, LongJobConfig, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, set};

/// A faster allocator than the system's for the many small allocations of request handling.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEMO_HTML: &str = include_str!("../assets/demo.html");
const PREFIX: &str = "/v1/download";

async fn demo() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"))],
        Html(DEMO_HTML),
    )
}

async fn root() -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "message": "longjob download service",
        "docs": "/docs",
        "demo": "/demo",
        "openapi": "/openapi.json",
    }))
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    init_tracing();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("longjob-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let backends = backends::build(&config, PREFIX).await?;
    let delay = Delay {
        enabled: config.download_delay_enabled,
        min: Config::ms(config.download_delay_min_ms),
        max: Config::ms(config.download_delay_max_ms),
    };
    let mut lj_config = LongJobConfig::default();
    lj_config.retry.max_attempts = config.max_attempts.max(1);
    lj_config.presign_ttl = Duration::from_secs(config.presign_ttl_secs.max(1));
    lj_config.jobs_per_hour = (config.jobs_per_hour > 0).then_some(config.jobs_per_hour);
    lj_config.max_active_per_owner =
        (config.max_active_jobs_per_owner > 0).then_some(config.max_active_jobs_per_owner);
    lj_config.timeouts.job = Config::ms(config.job_timeout_ms);
    let retention = Duration::from_secs(config.retention_secs.max(1));
    lj_config.retention = retention;
    let lj = LongJob::builder()
        .store(Arc::clone(&backends.store))
        .queue(Arc::clone(&backends.queue))
        .bus(Arc::clone(&backends.bus))
        .blobs(Arc::clone(&backends.blobs))
        .config(lj_config)
        .build();

    let source = Arc::clone(&backends.source);
    let mut worker_config = WorkerConfig::default();
    worker_config.concurrency = config.worker_concurrency.max(1);
    // A progress event per file, however fast files go.
    worker_config.progress_interval = Duration::ZERO;
    // Finished jobs past the retention are purged with their results (BlobStore::delete).
    worker_config.purge_interval =
        (config.purge_interval_secs > 0).then(|| Duration::from_secs(config.purge_interval_secs));
    let worker = (config.worker_concurrency > 0).then(|| {
        let env = Arc::new(job::DownloadEnv {
            source: Arc::clone(&source),
            delay,
            scratch: std::path::Path::new(&config.blob_dir).join(".scratch"),
        });
        lj.worker()
            .config(worker_config)
            .handle(job::KIND, move |ctx, input: job::DownloadInput| {
                job::run(Arc::clone(&env), ctx, input)
            })
            .start()
    });

    let origins: Vec<String> = config
        .cors_origins
        .split(',')
        .map(|o| o.trim().to_owned())
        .filter(|o| !o.is_empty())
        .collect();
    let http = HttpConfig {
        prefix: PREFIX.to_owned(),
        request_timeout: Config::ms(config.request_timeout_ms),
        cors_origins: origins,
        rate_limit: Some(RateLimit {
            window: Config::ms(config.rate_limit_window_ms),
            max_requests: config.rate_limit_max_requests,
            trust_forwarded_for: config.trust_proxy,
        }),
        ..HttpConfig::default()
    };
    let mut api = ApiBuilder::new(lj.clone())
        .config(http)
        .downloads(Downloads {
            source,
            blobs: Arc::clone(&backends.blobs),
            kind: job::KIND.to_owned(),
            delay,
            presign_ttl: Duration::from_secs(config.presign_ttl_secs.max(1)),
        });
    if let Some(signer) = backends.signer.clone() {
        api = api.signed_files(signer, Arc::clone(&backends.blobs));
    }
    let auth = match set(&config.api_keys) {
        Some(keys) => {
            let keys: ApiKeys = keys.parse()?;
            api = api.authenticate(keys);
            "API keys"
        }
        None => "anonymous",
    };
    let extra = Router::new()
        .route("/", get(root))
        .route("/demo", get(demo));
    let app = api.build_with(extra);

    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let public = config.public_url();
    tracing::info!(
        "longjob-server listening on http://{local} ({}, auth={auth}, worker concurrency {}); docs {public}/docs, demo {public}/demo",
        backends.description,
        config.worker_concurrency,
    );

    let stop = CancellationToken::new();
    if let Some(results) = backends.s3_results.clone() {
        if let Err(e) = longjob_core::BlobStore::health(&results).await {
            tracing::warn!("S3 storage does not answer as expected (see /health): {e}");
        }
        if config.s3_sweep_interval_secs > 0 {
            s3::spawn_sweep(
                results,
                retention,
                Duration::from_secs(config.s3_sweep_interval_secs),
                stop.clone(),
            );
        }
    }
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        })
    };
    shutdown_signal().await;
    tracing::info!("shutting down: no new requests or jobs; draining");
    stop.cancel();
    let grace = Config::ms(config.shutdown_grace_ms);
    let drain_workers = async {
        if let Some(worker) = worker {
            worker.shutdown(grace).await;
        }
    };
    // Open event streams would hold the HTTP server forever: give them the grace period.
    let drain_http = async {
        if tokio::time::timeout(grace, server).await.is_err() {
            tracing::warn!("open connections cut after the grace period");
        }
    };
    tokio::join!(drain_workers, drain_http);
    tracing::info!("stopped");
    Ok(())
}
