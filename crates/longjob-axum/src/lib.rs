//! # longjob-axum
//!
//! The HTTP face of longjob: every route of the API (job status with ETag and `Retry-After`,
//! retry, cancel, presigned download URLs, Server-Sent Events, WebSocket, the signed file route
//! of the built-in blob stores, `/health`, `/metrics`, `/openapi.json`, `/docs`) as an axum
//! [`Router`] over a [`LongJob`], plus the three endpoints of the download service it replaces
//! (`/v1/download/initiate`, `/check`, `/start`) when a [`Downloads`] domain is given.
//!
//! ```no_run
//! # async fn run(lj: longjob_axum::LongJob) -> std::io::Result<()> {
//! use longjob_axum::{ApiBuilder, ApiKeys};
//!
//! let keys: ApiKeys = "key1:alice,key2:bob".parse().expect("valid keys");
//! let app = ApiBuilder::new(lj).authenticate(keys).build();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! [`ApiBuilder::build`] gives a complete application: the routes, a JSON 404 fallback and the
//! cross-cutting layers (request ids, security headers, CORS, tracing, metrics, rate limit,
//! timeout, body limit, and the normalisation of every error into the API's JSON error).
//! [`ApiBuilder::routes`] gives the bare routes, to merge into an application that has its own
//! layers; [`ApiBuilder::layers`] wraps any router in the same stack.
#![deny(missing_docs)]

mod auth;
mod downloads;
mod edge;
mod error;
mod facade;
mod files;
mod jobs;
mod json;
mod metrics;
mod ops;
mod ratelimit;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use longjob_core::BlobStore;
use longjob_core::signing::UrlSigner;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use auth::{Anonymous, ApiKeys, Authenticate, InvalidApiKeys};
pub use downloads::{
    Delay, Downloads, FileInfo, FileSource, MAX_FILE_ID, MAX_FILE_IDS, MIN_FILE_ID,
};
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use json::ApiJson;
pub use longjob_core::{LongJob, LongJobError};
pub use metrics::Metrics;
pub use ratelimit::RateLimit;

/// The request-id header (`X-Request-ID`).
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Settings of the HTTP face.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The prefix of the job routes (default `/v1/download`).
    pub prefix: String,
    /// Requests that take longer get 504 (default 135 s). Streams are not cut: only the time
    /// to the response's head counts.
    pub request_timeout: Duration,
    /// Larger request bodies get 413 (default 1 MiB).
    pub body_limit: usize,
    /// Allowed CORS origins; `["*"]` (the default) allows any.
    pub cors_origins: Vec<String>,
    /// Requests per window per client; `None` disables the limit.
    pub rate_limit: Option<RateLimit>,
    /// Interval of the SSE keep-alive comment (default 15 s).
    pub sse_keep_alive: Duration,
    /// Interval of WebSocket pings (default 30 s).
    pub ws_ping: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            prefix: "/v1/download".to_owned(),
            request_timeout: Duration::from_millis(135_000),
            body_limit: 1024 * 1024,
            cors_origins: vec!["*".to_owned()],
            rate_limit: Some(RateLimit {
                window: Duration::from_secs(60),
                max_requests: 100,
                trust_forwarded_for: false,
            }),
            sse_keep_alive: Duration::from_secs(15),
            ws_ping: Duration::from_secs(30),
        }
    }
}

/// The signed file route of the built-in blob stores.
#[derive(Debug, Clone)]
pub(crate) struct SignedFiles {
    pub(crate) signer: UrlSigner,
    pub(crate) blobs: Arc<dyn BlobStore>,
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) lj: LongJob,
    pub(crate) auth: Arc<dyn Authenticate>,
    pub(crate) config: HttpConfig,
    pub(crate) files: Option<SignedFiles>,
    pub(crate) downloads: Option<Downloads>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: ops::HealthCache,
}

/// The handlers' state.
pub(crate) type AppState = Arc<Inner>;

/// Builds the router of the API over a [`LongJob`].
#[derive(Debug)]
pub struct ApiBuilder {
    lj: LongJob,
    auth: Arc<dyn Authenticate>,
    config: HttpConfig,
    files: Option<SignedFiles>,
    downloads: Option<Downloads>,
    metrics: Arc<Metrics>,
}

impl ApiBuilder {
    /// A builder with the default [`HttpConfig`], every caller [`Anonymous`], no signed file
    /// route and no download endpoints.
    pub fn new(lj: LongJob) -> Self {
        Self {
            lj,
            auth: Arc::new(Anonymous),
            config: HttpConfig::default(),
            files: None,
            downloads: None,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: HttpConfig) -> Self {
        self.config = config;
        self
    }

    /// Mounts the job routes under `prefix` (default `/v1/download`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into().trim_end_matches('/').to_owned();
        self
    }

    /// How callers are mapped to owners.
    pub fn authenticate(mut self, auth: impl Authenticate) -> Self {
        self.auth = Arc::new(auth);
        self
    }

    /// Serves `GET {prefix}/files/{key}` for URLs signed by `signer` (the in-memory and
    /// local-disk blob stores), reading from `blobs`.
    pub fn signed_files(mut self, signer: UrlSigner, blobs: Arc<dyn BlobStore>) -> Self {
        self.files = Some(SignedFiles { signer, blobs });
        self
    }

    /// Mounts the download service's `initiate`, `check` and `start` endpoints.
    pub fn downloads(mut self, downloads: Downloads) -> Self {
        self.downloads = Some(downloads);
        self
    }

    /// The metrics the router counts into (also served at `/metrics`).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    fn state(self) -> AppState {
        Arc::new(Inner {
            lj: self.lj,
            auth: self.auth,
            config: self.config,
            files: self.files,
            downloads: self.downloads,
            metrics: self.metrics,
            health: ops::HealthCache::default(),
        })
    }

    /// The bare routes, without fallback or layers, to merge into an application.
    pub fn routes(self) -> Router {
        routes(self.state())
    }

    /// Wraps `router` in the API's cross-cutting layers (see the crate's documentation).
    ///
    /// The layers wrap `router` whole, its fallback included, and the result holds it as its
    /// own fallback: routes added to the result afterwards are outside the layers (as with
    /// `Router::layer`), and a fallback given to the result replaces all of `router`, so give
    /// `router` its fallback before wrapping it.
    pub fn layers(&self, router: Router) -> Router {
        layers(router, &self.config, Arc::clone(&self.metrics))
    }

    /// The complete application: routes, a JSON 404 fallback and every layer.
    pub fn build(self) -> Router {
        self.build_with(Router::new())
    }

    /// The complete application with `extra` routes of the host merged in (under the same
    /// layers and fallback).
    ///
    /// As with [`layers`](Self::layers), the application is the result's fallback: add routes
    /// through `extra`, not by giving the result a fallback of its own, which would replace it.
    pub fn build_with(self, extra: Router) -> Router {
        let config = self.config.clone();
        let metrics = Arc::clone(&self.metrics);
        let router = routes(self.state()).merge(extra).fallback(error::not_found);
        layers(router, &config, metrics)
    }
}

fn routes(state: AppState) -> Router {
    let p = state.config.prefix.clone();
    let mut r = Router::new()
        .route(&format!("{p}/job/{{job_id}}"), get(jobs::status))
        .route(&format!("{p}/job/{{job_id}}/retry"), post(jobs::retry))
        .route(&format!("{p}/job/{{job_id}}/cancel"), post(jobs::cancel))
        .route(
            &format!("{p}/job/{{job_id}}/download-url"),
            get(jobs::download_url),
        )
        .route(&format!("{p}/stream/{{job_id}}"), get(stream::sse))
        .route(&format!("{p}/subscribe/{{job_id}}"), get(stream::websocket))
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/openapi", get(ops::openapi))
        .route("/docs", get(ops::docs));
    if state.files.is_some() {
        r = r.route(&format!("{p}/files/{{*key}}"), get(files::serve));
    }
    if state.downloads.is_some() {
        #[allow(deprecated)]
        let start = post(downloads::start);
        r = r
            .route(&format!("{p}/initiate"), post(downloads::initiate))
            .route(&format!("{p}/check"), post(downloads::check))
            .route(&format!("{p}/start"), start);
    }
    r.with_state(state)
}

/// Adds the security headers the replaced service sent, where a handler did not set them.
pub(crate) fn add_security_headers(headers: &mut axum::http::HeaderMap) {
    // Room for all of them at once rather than a growth of the map on the way.
    headers.reserve(SECURITY_HEADERS.len());
    for (name, value) in &SECURITY_HEADERS {
        headers.entry(name).or_insert_with(|| value.clone());
    }
}

/// The security headers the replaced service sent (Hono's `secureHeaders` defaults), built
/// once: `from_static` checks a name's every byte and looks it up among the standard ones,
/// which on every response cost more than the map's own work.
static SECURITY_HEADERS: [(HeaderName, HeaderValue); 11] = [
    (
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    ),
    (
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("SAMEORIGIN"),
    ),
    (
        HeaderName::from_static("strict-transport-security"),
        HeaderValue::from_static("max-age=15552000; includeSubDomains"),
    ),
    (
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    ),
    (
        HeaderName::from_static("x-xss-protection"),
        HeaderValue::from_static("0"),
    ),
    (
        HeaderName::from_static("x-download-options"),
        HeaderValue::from_static("noopen"),
    ),
    (
        HeaderName::from_static("x-dns-prefetch-control"),
        HeaderValue::from_static("off"),
    ),
    (
        HeaderName::from_static("x-permitted-cross-domain-policies"),
        HeaderValue::from_static("none"),
    ),
    (
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    ),
    (
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    ),
    (
        HeaderName::from_static("origin-agent-cluster"),
        HeaderValue::from_static("?1"),
    ),
];

fn cors(config: &HttpConfig) -> CorsLayer {
    let any = config.cors_origins.is_empty() || config.cors_origins.iter().any(|o| o == "*");
    let origin = if any {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim()).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS, Method::HEAD])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::IF_NONE_MATCH,
            header::RANGE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("x-api-key"),
            REQUEST_ID,
        ])
        .expose_headers([
            header::ETAG,
            header::LOCATION,
            header::RETRY_AFTER,
            header::CONTENT_DISPOSITION,
            header::CONTENT_RANGE,
            REQUEST_ID,
            HeaderName::from_static("ratelimit-limit"),
            HeaderName::from_static("ratelimit-remaining"),
            HeaderName::from_static("ratelimit-reset"),
        ])
        .max_age(Duration::from_secs(86_400))
}

fn layers(router: Router, config: &HttpConfig, metrics: Arc<Metrics>) -> Router {
    let limiter = config
        .rate_limit
        .as_ref()
        .and_then(ratelimit::Limiter::new)
        .map(|mut limit| {
            limit.metrics = Some(Arc::clone(&metrics));
            Arc::new(limit)
        });
    // One stack around the whole router, handed back as its fallback, rather than
    // `Router::layer` for each layer: that wraps every route in its own boxed service per
    // layer, and a request then cloned and boxed the route's eight nested services and their
    // futures (about 9k instructions of a request, see docs/benchmarks.md). The stack sees
    // every request the router answers, 404 and 405 included, as before. Outermost first.
    let stack = ServiceBuilder::new()
        // Request ids: kept from the request or made up, and copied to the response.
        .layer(SetRequestIdLayer::new(REQUEST_ID, edge::FastRequestId))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        // Error normalisation and security headers (one layer: see `edge`).
        .layer(edge::EdgeLayer)
        // `Router::layer` turns each layer's response body into axum's `Body`; so do these.
        .map_response(IntoResponse::into_response)
        .layer(cors(config))
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("a handler panicked");
                ApiError::internal().into_response()
            },
        ))
        .layer(TraceLayer::new_for_http())
        // Metrics and the rate limit (one layer: see `edge`).
        .layer(edge::CountedLayer { metrics, limiter })
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            config.request_timeout,
        ))
        .map_response(IntoResponse::into_response)
        .layer(RequestBodyLimitLayer::new(config.body_limit))
        .layer(DefaultBodyLimit::max(config.body_limit))
        .service(router);
    Router::new().fallback_service(stack)
}
