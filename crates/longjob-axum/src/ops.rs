//! Operations routes: `/health`, `/metrics`, `/openapi.json` (and `/openapi`), `/docs`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::AppState;

/// The answer of `/health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthBody {
    /// `healthy` or `unhealthy`.
    #[schema(example = "healthy")]
    pub status: &'static str,
    /// `ok` or `error` per check: `storage`, `store`, `queue`, `bus`.
    #[schema(value_type = BTreeMap<String, String>)]
    pub checks: BTreeMap<&'static str, &'static str>,
    /// What failed, per failing check.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub error: BTreeMap<&'static str, String>,
}

/// `GET /health`
#[utoipa::path(get, path = "/health", tag = "Health",
    summary = "Health of the service and its backends",
    responses(
        (status = 200, description = "Every backend answers", body = HealthBody),
        (status = 503, description = "A backend does not answer", body = HealthBody),
    ))]
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    // One check at a time, and its answer reused for a second: probes and load balancers
    // may call this as often as they like without loading the backends.
    let (code, bytes) = match state.health.fresh() {
        Some(answer) => answer,
        None => {
            // Only one request runs the check; the others wait for it and reuse its answer.
            let _refresh = state.health.refresh.lock().await;
            match state.health.fresh() {
                Some(answer) => answer,
                None => {
                    let (code, bytes) = check_health(&state).await;
                    state.health.store(code, bytes.clone());
                    (code, bytes)
                }
            }
        }
    };
    let mut res = (code, bytes).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// How long a health answer is reused.
const HEALTH_TTL: Duration = Duration::from_secs(1);

/// The last health answer (when, its status, its body), read without an async lock on the
/// common path (a fresh answer), refreshed by one request at a time.
#[derive(Debug, Default)]
pub(crate) struct HealthCache {
    last: std::sync::Mutex<Option<(Instant, StatusCode, Bytes)>>,
    refresh: tokio::sync::Mutex<()>,
}

impl HealthCache {
    /// The last answer, if younger than [`HEALTH_TTL`].
    fn fresh(&self) -> Option<(StatusCode, Bytes)> {
        // A poisoned lock only means a panic elsewhere while holding it: the value is whole.
        let last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match last.as_ref() {
            Some((at, code, bytes)) if at.elapsed() < HEALTH_TTL => Some((*code, bytes.clone())),
            _ => None,
        }
    }

    fn store(&self, code: StatusCode, bytes: Bytes) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = Some((Instant::now(), code, bytes));
    }
}

async fn check_health(state: &AppState) -> (StatusCode, Bytes) {
    let report = state.lj.health(Duration::from_secs(3)).await;
    let mut body = HealthBody {
        status: "healthy",
        checks: BTreeMap::new(),
        error: BTreeMap::new(),
    };
    let checks = [
        ("storage", report.storage),
        ("store", report.store),
        ("queue", report.queue),
        ("bus", report.bus),
    ];
    for (name, result) in checks {
        match result {
            Ok(()) => {
                body.checks.insert(name, "ok");
            }
            Err(e) => {
                tracing::warn!(check = name, error = %e, "health check failed");
                body.checks.insert(name, "error");
                body.error.insert(name, e);
                body.status = "unhealthy";
            }
        }
    }
    let code = if body.status == "healthy" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
    )
}

/// `GET /metrics`
#[utoipa::path(get, path = "/metrics", tag = "Health",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String)))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key of API_KEYS (the owner of the jobs); not needed when none is configured",
                    ))
                    .build(),
            ),
        );
    }
}

/// The errors every route can get from the layers around it, written into each operation that
/// does not document them itself: the panic catcher's 500 and the timeout's 504 everywhere, the
/// rate limit's 429 everywhere but the routes it exempts, the body checks' 400, 413 and 415
/// wherever a JSON body is read, and 401 on the job routes (all but the signed file route, whose
/// signature is its key).
struct LayerErrors;

impl LayerErrors {
    fn add(op: &mut utoipa::openapi::path::Operation, path: &str) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let mut errors = vec![
            ("500", "Internal error (the message names no internals)"),
            ("504", "No answer within the request timeout"),
        ];
        if !crate::ratelimit::exempt(path) {
            errors.push((
                "429",
                "Rate limited: `Retry-After` and `RateLimit-*` say when to come back",
            ));
        }
        if op.request_body.is_some() {
            errors.push(("400", "Malformed JSON or invalid fields"));
            errors.push(("413", "Body over the limit (1 MiB by default)"));
            errors.push(("415", "Not JSON"));
        }
        if path.starts_with("/v1/download") && !path.starts_with("/v1/download/files") {
            errors.push(("401", "Missing or invalid API key"));
        }
        for (code, description) in errors {
            op.responses
                .responses
                .entry(code.to_owned())
                .or_insert_with(|| {
                    RefOr::T(
                        ResponseBuilder::new()
                            .description(description)
                            .content(
                                "application/json",
                                ContentBuilder::new()
                                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                                    .build(),
                            )
                            .build(),
                    )
                });
        }
    }
}

impl Modify for LayerErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                Self::add(op, path);
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "longjob download API", version = "1.0.0",
        description = "Slow downloads as background jobs: initiate, follow by WebSocket, Server-Sent Events or polling, download through a presigned URL. Every error is `{\"error\": {\"code\", \"message\", \"details\"}, \"requestId\"}`; every response carries `X-Request-ID`; rate-limited answers carry `Retry-After` and `RateLimit-*`. A path not listed here answers 404, and a method not listed for a path 405, as that same JSON error."),
    paths(
        crate::downloads::initiate, crate::downloads::check, crate::downloads::start,
        crate::jobs::status, crate::jobs::retry, crate::jobs::cancel, crate::jobs::download_url,
        crate::stream::sse, crate::stream::websocket, crate::files::serve,
        health, metrics, openapi, docs,
    ),
    components(schemas(
        crate::ErrorBody, crate::ErrorDetail,
        crate::jobs::JobStatusBody, crate::jobs::ProgressBody, crate::jobs::FileBody, crate::jobs::ErrorKindBody,
        crate::jobs::RetryBody, crate::jobs::CancelBody, crate::jobs::DownloadUrlBody,
        crate::downloads::InitiateRequest, crate::downloads::InitiateResponse,
        crate::downloads::FileIdRequest, crate::downloads::CheckResponse, crate::downloads::StartResponse,
        HealthBody,
    )),
    modifiers(&Security, &LayerErrors),
    tags((name = "Download", description = "The endpoints of the replaced service, same field names"),
         (name = "Jobs", description = "Status, retry, cancel, download URL"),
         (name = "Streams", description = "Live progress"),
         (name = "Files", description = "Signed downloads of the built-in blob stores"),
         (name = "Health", description = "Probes and metrics"),
         (name = "Docs", description = "This document")),
)]
struct ApiDoc;

/// The OpenAPI document with the job routes under `prefix`, and without the routes not mounted.
pub(crate) fn document(state: &AppState) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let prefix = state.config.prefix.as_str();
    let paths = std::mem::take(&mut doc.paths.paths);
    for (path, item) in paths {
        let Some(rest) = path.strip_prefix("/v1/download") else {
            doc.paths.paths.insert(path, item);
            continue;
        };
        let legacy = ["/initiate", "/check", "/start"].contains(&rest);
        if (legacy && state.downloads.is_none())
            || (rest.starts_with("/files") && state.files.is_none())
        {
            continue;
        }
        doc.paths.paths.insert(format!("{prefix}{rest}"), item);
    }
    doc
}

/// `GET /openapi.json` and `GET /openapi`
#[utoipa::path(get, path = "/openapi.json", tag = "Docs",
    summary = "This OpenAPI document (also at /openapi)",
    responses((status = 200, description = "OpenAPI 3", content_type = "application/json", body = Object)))]
pub(crate) async fn openapi(State(state): State<AppState>) -> Response {
    let doc = document(&state);
    match serde_json::to_vec(&doc) {
        Ok(bytes) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(_) => crate::ApiError::internal().into_response(),
    }
}

/// `GET /docs`
#[utoipa::path(get, path = "/docs", tag = "Docs",
    summary = "A reference page rendering the OpenAPI document",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub(crate) async fn docs() -> Response {
    let mut res = Html(DOCS_HTML).into_response();
    res.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        ),
    );
    res
}

const DOCS_HTML: &str = include_str!("docs.html");
