//! Counters and gauges of the HTTP face, in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// What the router counts. Cheap atomics, written by hand as Prometheus text by [`render`](Self::render).
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) by_class: [AtomicU64; 5],
    pub(crate) duration_us: AtomicU64,
    pub(crate) in_flight: AtomicI64,
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
        fn family(out: &mut String, name: &str, kind: &str, help: &str) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let gauge = |a: &AtomicI64| a.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        family(
            &mut out,
            "longjob_http_requests_total",
            "counter",
            "HTTP responses by status class.",
        );
        for (i, c) in self.by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "longjob_http_requests_total{{class=\"{}xx\"}} {}",
                i + 1,
                load(c)
            );
        }
        let total: u64 = self.by_class.iter().map(load).sum();
        family(
            &mut out,
            "longjob_http_request_duration_seconds_sum",
            "counter",
            "Total time to the response head.",
        );
        let secs = load(&self.duration_us) as f64 / 1e6;
        let _ = writeln!(out, "longjob_http_request_duration_seconds_sum {secs}");
        family(
            &mut out,
            "longjob_http_request_duration_seconds_count",
            "counter",
            "Requests timed.",
        );
        let _ = writeln!(out, "longjob_http_request_duration_seconds_count {total}");
        let gauges = [
            (
                "longjob_http_requests_in_flight",
                "Requests being handled.",
                gauge(&self.in_flight),
            ),
            (
                "longjob_sse_streams",
                "Open Server-Sent Events streams.",
                gauge(&self.sse_streams),
            ),
            (
                "longjob_websocket_streams",
                "Open WebSocket streams.",
                gauge(&self.ws_streams),
            ),
        ];
        for (name, help, value) in gauges {
            family(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        let counters = [
            (
                "longjob_jobs_submitted_total",
                "Jobs created through the API.",
                load(&self.jobs_submitted),
            ),
            (
                "longjob_jobs_deduplicated_total",
                "Submissions answered with an existing job (idempotency key).",
                load(&self.jobs_deduplicated),
            ),
            (
                "longjob_rate_limited_total",
                "Requests refused by the rate limit.",
                load(&self.rate_limited),
            ),
            (
                "longjob_events_sent_total",
                "Job events sent over SSE and WebSocket.",
                load(&self.events_sent),
            ),
        ];
        for (name, help, value) in counters {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_prometheus_text() {
        let m = Metrics::default();
        m.jobs_submitted.fetch_add(3, Ordering::Relaxed);
        let text = m.render();
        let mut families = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(matches!(kind, "counter" | "gauge"), "{line}");
                assert!(
                    families.insert(name.to_owned()),
                    "one TYPE per family: {name}"
                );
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (name, value) = line.rsplit_once(' ').unwrap();
            let base = name.split('{').next().unwrap();
            assert!(
                families.contains(base),
                "{base} declared before its samples"
            );
            value.parse::<f64>().unwrap();
        }
        assert!(text.contains("longjob_jobs_submitted_total 3"));
    }
}
