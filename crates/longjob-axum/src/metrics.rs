//! Counters and gauges of the HTTP face, in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// What the router counts. Cheap atomics, written by hand as Prometheus text by [`render`](Self::render).
#[derive(Debug, Default)]
pub struct Metrics {
    by_class: [AtomicU64; 5],
    duration_us: AtomicU64,
    in_flight: AtomicI64,
    pub(crate) jobs_submitted: AtomicU64,
    pub(crate) jobs_deduplicated: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) sse_streams: AtomicI64,
    pub(crate) ws_streams: AtomicI64,
    pub(crate) events_sent: AtomicU64,
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub(crate) struct GaugeGuard(Arc<crate::Inner>, bool);

impl GaugeGuard {
    pub(crate) fn sse(state: &Arc<crate::Inner>) -> Self {
        state.metrics.sse_streams.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(state), false)
    }

    pub(crate) fn ws(state: &Arc<crate::Inner>) -> Self {
        state.metrics.ws_streams.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(state), true)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        let gauge = if self.1 {
            &self.0.metrics.ws_streams
        } else {
            &self.0.metrics.sse_streams
        };
        gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(1024);
        let _ = writeln!(
            out,
            "# HELP longjob_http_requests_total HTTP responses by status class.\n# TYPE longjob_http_requests_total counter"
        );
        for (i, c) in self.by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "longjob_http_requests_total{{class=\"{}xx\"}} {}",
                i + 1,
                c.load(Ordering::Relaxed)
            );
        }
        let total: u64 = self
            .by_class
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        let secs = self.duration_us.load(Ordering::Relaxed) as f64 / 1e6;
        let gauges: [(&str, &str, &str, i64); 6] = [
            (
                "longjob_http_request_duration_seconds_sum",
                "counter",
                "Total time to the response head.",
                0,
            ),
            (
                "longjob_http_requests_in_flight",
                "gauge",
                "Requests being handled.",
                self.in_flight.load(Ordering::Relaxed),
            ),
            (
                "longjob_sse_streams",
                "gauge",
                "Open Server-Sent Events streams.",
                self.sse_streams.load(Ordering::Relaxed),
            ),
            (
                "longjob_websocket_streams",
                "gauge",
                "Open WebSocket streams.",
                self.ws_streams.load(Ordering::Relaxed),
            ),
            (
                "longjob_jobs_submitted_total",
                "counter",
                "Jobs created through the API.",
                self.jobs_submitted.load(Ordering::Relaxed) as i64,
            ),
            (
                "longjob_jobs_deduplicated_total",
                "counter",
                "Submissions answered with an existing job (idempotency key).",
                self.jobs_deduplicated.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if name.ends_with("_sum") {
                let _ = writeln!(out, "{name} {secs}");
                let _ = writeln!(
                    out,
                    "# HELP longjob_http_request_duration_seconds_count Requests timed.\n# TYPE longjob_http_request_duration_seconds_count counter\nlongjob_http_request_duration_seconds_count {total}"
                );
            } else {
                let _ = writeln!(out, "{name} {value}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP longjob_rate_limited_total Requests refused by the rate limit.\n# TYPE longjob_rate_limited_total counter\nlongjob_rate_limited_total {}",
            self.rate_limited.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP longjob_events_sent_total Job events sent over SSE and WebSocket.\n# TYPE longjob_events_sent_total counter\nlongjob_events_sent_total {}",
            self.events_sent.load(Ordering::Relaxed)
        );
        out
    }
}

/// Counts every response by status class and its time to the head.
pub(crate) async fn middleware(
    State(metrics): State<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let res = next.run(req).await;
    metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    let class = (res.status().as_u16() / 100).clamp(1, 5) as usize - 1;
    metrics.by_class[class].fetch_add(1, Ordering::Relaxed);
    metrics
        .duration_us
        .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    res
}
