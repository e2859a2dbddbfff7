//! Requests per window per client, with `governor` (GCRA), answering 429 with `Retry-After`
//! and the `RateLimit-*` headers.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
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
    RateLimiter<ClientKey, HashMapStateStore<ClientKey>, DefaultClock, StateInformationMiddleware>;

pub(crate) struct Limiter {
    limiter: Keyed,
    trust_forwarded_for: bool,
    limit: u32,
    period: Duration,
    /// Requests seen, for the occasional look at the number of clients kept.
    checks: AtomicU64,
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
            checks: AtomicU64::new(0),
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

/// Who a request counts against: an address, without an allocation per request (the key is
/// only copied when a new client is seen).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ClientKey {
    /// The connection's address, or a forwarded address that parses as one.
    Ip(IpAddr),
    /// A forwarded value that is not an address: kept as given.
    Forwarded(Box<str>),
    /// No connection information (the app was not served with `ConnectInfo`).
    Unknown,
}

fn client_key(req: &Request, trust_forwarded_for: bool) -> ClientKey {
    // Not by API key: the limit runs before authentication, and unchecked keys would let a
    // client pick a fresh budget per request.
    if trust_forwarded_for {
        if let Some(ip) = forwarded_for(req.headers()) {
            return match ip.parse() {
                Ok(ip) => ClientKey::Ip(ip),
                Err(_) => ClientKey::Forwarded(ip.into()),
            };
        }
    }
    match req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(addr)) => ClientKey::Ip(addr.ip()),
        None => ClientKey::Unknown,
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: u64) {
    headers.insert(name, HeaderValue::from(value));
}

const LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// What the limit decided for a request.
#[derive(Debug)]
pub(crate) enum Admission {
    /// A probe (`/health`, `/metrics`), or no limit: no headers.
    Exempt,
    /// Within the limit: these headers go on the response.
    Admitted(RateHeaders),
    /// Past the limit: this 429 is the response.
    Refused(Box<Response>),
}

/// The `RateLimit-*` values of an admitted request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateHeaders {
    limit: u64,
    remaining: u64,
    reset: u64,
}

impl RateHeaders {
    /// Sets `RateLimit-Limit`, `-Remaining` and `-Reset`.
    pub(crate) fn apply(self, h: &mut HeaderMap) {
        set(h, LIMIT, self.limit);
        set(h, REMAINING, self.remaining);
        set(h, RESET, self.reset);
    }
}

/// How many requests pass between two looks at the number of clients kept (the look takes
/// the limiter's lock).
const SIZE_CHECK_EVERY: u64 = 1024;

/// Whether requests to `path` pass without counting against the rate limit: the probes
/// (`/health`, `/metrics`), which monitoring calls on its own schedule. The OpenAPI document
/// asks it too, to leave 429 off those routes.
pub(crate) fn exempt(path: &str) -> bool {
    path == "/health" || path == "/metrics"
}

impl Limiter {
    /// Exempts probes (see [`exempt`]); past the limit, the 429 (counted in the metrics'
    /// `rate_limited`).
    pub(crate) fn admit(&self, req: &Request) -> Admission {
        if exempt(req.uri().path()) {
            return Admission::Exempt;
        }
        // Clients that went quiet are dropped once there are many; looked at now and then
        // rather than on every request.
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SIZE_CHECK_EVERY)
            && self.limiter.len() > 100_000
        {
            self.limiter.retain_recent();
        }
        let key = client_key(req, self.trust_forwarded_for);
        match self.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = u64::from(snapshot.remaining_burst_capacity());
                let used = u64::from(self.limit).saturating_sub(remaining);
                let reset = (self.period.as_secs_f64() * used as f64).ceil() as u64;
                Admission::Admitted(RateHeaders {
                    limit: u64::from(self.limit),
                    remaining,
                    reset,
                })
            }
            Err(not_until) => {
                if let Some(m) = &self.metrics {
                    m.rate_limited.fetch_add(1, Ordering::Relaxed);
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
                set(h, header::RETRY_AFTER, secs);
                set(h, LIMIT, u64::from(self.limit));
                set(h, REMAINING, 0);
                set(h, RESET, secs);
                Admission::Refused(Box::new(res))
            }
        }
    }
}
