//! What `/metrics` exposes, in Prometheus' (OpenMetrics) text format.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub request_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub first_token_seconds: Histogram,
    pub queue_depth: Gauge,
    pub batch_rows: Gauge,
    pub decode_batch_rows: Histogram,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub tokens_per_second: Gauge<f64, AtomicU64>,
    pub cancelled: Counter,
    pub timed_out: Counter,
}

fn latency_buckets() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let requests = Family::<Labels, Counter>::default();
        let request_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_buckets);
        let first_token_seconds = latency_buckets();
        let queue_depth = Gauge::default();
        let batch_rows = Gauge::default();
        let decode_batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        let prompt_tokens = Counter::default();
        let generated_tokens = Counter::default();
        let tokens_per_second = Gauge::<f64, AtomicU64>::default();
        let cancelled = Counter::default();
        let timed_out = Counter::default();
        registry.register(
            "requests",
            "HTTP requests by endpoint and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the last byte of the answer, by endpoint",
            request_seconds.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from request to the first generated token",
            first_token_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting to start",
            queue_depth.clone(),
        );
        registry.register(
            "batch_rows",
            "Rows in the decode batch now",
            batch_rows.clone(),
        );
        registry.register(
            "decode_batch_rows",
            "Rows decoded together, one observation a decode step",
            decode_batch_rows.clone(),
        );
        registry.register("prompt_tokens", "Prompt tokens read", prompt_tokens.clone());
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Tokens generated per second by the last decode step (all rows together)",
            tokens_per_second.clone(),
        );
        registry.register(
            "cancelled_requests",
            "Requests dropped because their client went away",
            cancelled.clone(),
        );
        registry.register(
            "timed_out_requests",
            "Requests stopped at their deadline",
            timed_out.clone(),
        );
        Self {
            registry,
            requests,
            request_seconds,
            first_token_seconds,
            queue_depth,
            batch_rows,
            decode_batch_rows,
            prompt_tokens,
            generated_tokens,
            tokens_per_second,
            cancelled,
            timed_out,
        }
    }

    pub fn record_request(&self, endpoint: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&vec![
                ("endpoint".to_string(), endpoint.to_string()),
                ("status".to_string(), status.to_string()),
            ])
            .inc();
        self.request_seconds
            .get_or_create(&vec![("endpoint".to_string(), endpoint.to_string())])
            .observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String does not fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
