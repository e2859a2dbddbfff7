//! The API's own cross-cutting work as two hand-written tower layers, instead of three
//! `axum::middleware::from_fn` layers (error normalisation with the security headers, metrics,
//! rate limit). Request ids are tower-http's (`SetRequestId` with [`FastRequestId`], then
//! `PropagateRequestId`), outside these.
//!
//! Why: every `from_fn` layer clones the whole service stack beneath it and boxes a future and
//! a service on every request, and each tower-http layer adds its own future; on a 2-core
//! machine under `wrk` that was a measurable share of a request (see docs/benchmarks.md, HTTP
//! face). The behaviour is the same as the layers they replace:
//!
//! - [`Edge`] (inside the request id layers): turns every error response into the API's JSON
//!   error (see [`crate::error::normalize`]), with the request's id, and adds the security
//!   headers.
//! - [`Counted`] (inside CORS, tracing and the panic catcher, as the metrics and rate limit
//!   layers were): counts every response by status class and its time to the head, and applies
//!   the rate limit (exempting `/health` and `/metrics`), with the `RateLimit-*` headers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderValue, Method, header};
use axum::response::Response;
use tower::{Layer, Service};
use tower_http::request_id::{MakeRequestId, RequestId};

use crate::metrics::Metrics;
use crate::ratelimit::{Admission, Limiter};
use crate::{REQUEST_ID, error};

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// A random (version 4) UUID from the thread's fast generator, without a system call.
fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut buf);
    // A hyphenated UUID is always a valid header value.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The id tower-http's `SetRequestId` gives a request that comes without `X-Request-ID`: a
/// random (version 4) UUID, drawn without a system call (tower-http's own `MakeRequestUuid`
/// asks the operating system for every one).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FastRequestId;

impl MakeRequestId for FastRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        Some(RequestId::new(new_request_id()))
    }
}

/// The layer of [`Edge`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EdgeLayer;

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner }
    }
}

/// Error normalisation and security headers (see the module's documentation).
#[derive(Debug, Clone)]
pub(crate) struct Edge<S> {
    inner: S,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // `SetRequestId` outside gave every request an id; one served without that layer gets
        // a fresh one for its error body.
        let request_id = req
            .headers()
            .get(REQUEST_ID)
            .cloned()
            .unwrap_or_else(new_request_id);
        let preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        let future = self.inner.call(req);
        Box::pin(async move {
            let Ok(res) = future.await;
            let mut res = error::normalize(res, &request_id, preflight).await;
            crate::add_security_headers(res.headers_mut());
            Ok(res)
        })
    }
}

/// The layer of [`Counted`].
#[derive(Debug, Clone)]
pub(crate) struct CountedLayer {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limiter: Option<Arc<Limiter>>,
}

impl<S> Layer<S> for CountedLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: Arc::clone(&self.metrics),
            limiter: self.limiter.clone(),
        }
    }
}

/// Metrics and the rate limit (see the module's documentation).
#[derive(Debug, Clone)]
pub(crate) struct Counted<S> {
    inner: S,
    metrics: Arc<Metrics>,
    limiter: Option<Arc<Limiter>>,
}

/// Decrements the in-flight gauge and counts the response even when the handler's future is
/// dropped or panics (the request is over either way).
struct InFlight {
    metrics: Arc<Metrics>,
    start: Instant,
    class: Option<usize>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(class) = self.class {
            m.by_class[class].fetch_add(1, Ordering::Relaxed);
            m.duration_us
                .fetch_add(self.start.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }
}

impl<S> Service<Request> for Counted<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let start = Instant::now();
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut guard = InFlight {
            metrics: Arc::clone(&self.metrics),
            start,
            class: None,
        };
        let admission = match &self.limiter {
            Some(limiter) => limiter.admit(&req),
            None => Admission::Exempt,
        };
        match admission {
            Admission::Refused(res) => {
                guard.class = Some(class_of(&res));
                drop(guard);
                Box::pin(std::future::ready(Ok(*res)))
            }
            admission => {
                let future = self.inner.call(req);
                Box::pin(async move {
                    // The whole guard moves in (not just the field assigned below), so it
                    // lives until the response is there.
                    let mut guard = guard;
                    let Ok(mut res) = future.await;
                    if let Admission::Admitted(headers) = admission {
                        headers.apply(res.headers_mut());
                    }
                    guard.class = Some(class_of(&res));
                    Ok(res)
                })
            }
        }
    }
}

/// The index of a response's status class in [`Metrics`] (1xx … 5xx).
fn class_of(res: &Response) -> usize {
    (res.status().as_u16() / 100).clamp(1, 5) as usize - 1
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{HttpConfig, RateLimit};
    use axum::Router;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::get;
    use tower::ServiceExt;

    fn app(rate_limit: Option<RateLimit>) -> (Router, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let config = HttpConfig {
            rate_limit,
            ..HttpConfig::default()
        };
        let router = Router::new()
            .route("/ok", get(|| async { "ok" }))
            .fallback(crate::error::not_found);
        (
            crate::layers(router, &config, Arc::clone(&metrics)),
            metrics,
        )
    }

    fn get_req(path: &str) -> Request {
        Request::builder().uri(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn counts_every_response_by_class_once_it_is_there() {
        let (app, metrics) = app(None);
        let res = app.clone().oneshot(get_req("/ok")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let res = app.oneshot(get_req("/nope")).await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        let count = |i: usize| metrics.by_class[i].load(Ordering::Relaxed);
        assert_eq!((count(1), count(3)), (1, 1), "one 2xx, one 4xx");
        assert_eq!(metrics.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn gives_and_propagates_request_ids_and_adds_the_api_headers() {
        let (app, _) = app(None);
        let res = app.clone().oneshot(get_req("/ok")).await.unwrap();
        let id = res.headers()[REQUEST_ID].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 36, "a hyphenated UUID: {id}");
        assert_eq!(res.headers()["x-content-type-options"], "nosniff");
        let mut req = get_req("/nope");
        req.headers_mut()
            .insert(REQUEST_ID, HeaderValue::from_static("mine-1"));
        let res = app.oneshot(req).await.unwrap();
        assert_eq!(res.headers()[REQUEST_ID], "mine-1");
        let body = axum::body::to_bytes(res.into_body(), 4096).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["requestId"], "mine-1");
        assert_eq!(body["error"]["code"], "not_found");
    }

    #[tokio::test]
    async fn rate_limit_headers_then_429_counted_in_the_metrics() {
        let limit = RateLimit {
            window: std::time::Duration::from_secs(60),
            max_requests: 1,
            trust_forwarded_for: false,
        };
        let (app, metrics) = app(Some(limit));
        let res = app.clone().oneshot(get_req("/ok")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["ratelimit-limit"], "1");
        assert_eq!(res.headers()["ratelimit-remaining"], "0");
        let res = app.clone().oneshot(get_req("/ok")).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(res.headers().contains_key(header::RETRY_AFTER));
        assert!(res.headers().contains_key(REQUEST_ID));
        // Probes are exempt.
        let res = app.oneshot(get_req("/health")).await.unwrap();
        assert_ne!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(metrics.rate_limited.load(Ordering::Relaxed), 1);
        assert_eq!(
            metrics.by_class[3].load(Ordering::Relaxed),
            2,
            "429 and 404"
        );
        assert_eq!(metrics.in_flight.load(Ordering::Relaxed), 0);
    }
}
