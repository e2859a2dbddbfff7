//! Requests per window per client, with `governor` (GCRA), answering 429 with `Retry-After`
//! and the `RateLimit-*` headers.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::ApiError;
use crate::metrics::Metrics;

/// At most `max_requests` per `window` per client, told apart by address (from axum's `ConnectInfo<SocketAddr>`, so serve the app with
/// `into_make_service_with_connect_info::<SocketAddr>()`; without it every caller shares one
/// budget). The limit is per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// The window.
    pub window: Duration,
    /// Requests allowed per window (a burst of that many is allowed).
    pub max_requests: u32,
    /// Behind a reverse proxy: take the client's address from the first entry of
    /// `X-Forwarded-For` (or `X-Real-IP`) rather than from the connection. Only enable it when
    /// a proxy you run sets that header, or clients can choose their own budget.
    pub trust_forwarded_for: bool,
}

type Keyed =
    RateLimiter<String, HashMapStateStore<String>, DefaultClock, StateInformationMiddleware>;

pub(crate) struct Limiter {
    limiter: Keyed,
    trust_forwarded_for: bool,
    limit: u32,
    period: Duration,
    pub(crate) metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("limit", &self.limit)
            .finish()
    }
}

impl Limiter {
    /// `None` when the limit is disabled (0 requests or an empty window).
    pub(crate) fn new(limit: &RateLimit) -> Option<Self> {
        let max = NonZeroU32::new(limit.max_requests)?;
        let period = limit.window.checked_div(limit.max_requests)?;
        let quota = Quota::with_period(period)?.allow_burst(max);
        Some(Self {
            limiter: RateLimiter::hashmap(quota).with_middleware::<StateInformationMiddleware>(),
            limit: max.get(),
            trust_forwarded_for: limit.trust_forwarded_for,
            period,
            metrics: None,
        })
    }
}

fn forwarded_for(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .or_else(|| headers.get("x-real-ip").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn client_key(req: &Request, trust_forwarded_for: bool) -> String {
    // Not by API key: the limit runs before authentication, and unchecked keys would let a
    // client pick a fresh budget per request.
    if trust_forwarded_for {
        if let Some(ip) = forwarded_for(req.headers()) {
            return format!("ip:{ip}");
        }
    }
    match req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(addr)) => format!("ip:{}", addr.ip()),
        None => "unknown".to_owned(),
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: u64) {
    headers.insert(name, HeaderValue::from(value));
}

/// Exempts probes (`/health`, `/metrics`) and answers 429 past the limit.
pub(crate) async fn middleware(
    State(limiter): State<Arc<Limiter>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if path == "/health" || path == "/metrics" {
        return next.run(req).await;
    }
    if limiter.limiter.len() > 100_000 {
        limiter.limiter.retain_recent();
    }
    let key = client_key(&req, limiter.trust_forwarded_for);
    match limiter.limiter.check_key(&key) {
        Ok(snapshot) => {
            let remaining = u64::from(snapshot.remaining_burst_capacity());
            let used = u64::from(limiter.limit).saturating_sub(remaining);
            let reset = (limiter.period.as_secs_f64() * used as f64).ceil() as u64;
            let mut res = next.run(req).await;
            let h = res.headers_mut();
            set(h, "ratelimit-limit", u64::from(limiter.limit));
            set(h, "ratelimit-remaining", remaining);
            set(h, "ratelimit-reset", reset);
            res
        }
        Err(not_until) => {
            if let Some(m) = &limiter.metrics {
                m.rate_limited
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut res = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests: retry in {secs} s"),
            )
            .into_response();
            let h = res.headers_mut();
            set(h, header::RETRY_AFTER.as_str(), secs);
            set(h, "ratelimit-limit", u64::from(limiter.limit));
            set(h, "ratelimit-remaining", 0);
            set(h, "ratelimit-reset", secs);
            res
        }
    }
}
