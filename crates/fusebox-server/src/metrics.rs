//! The server's Prometheus metrics (`GET /metrics`, text format 0.0.4, from
//! the `prometheus-client` crate): requests by endpoint and status and
//! their duration, prompt and generated tokens, the engine's queue, time to
//! first token and inter-token latency.

use std::fmt::Write;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::EngineStats;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Time to first token, seconds (queue wait and prefill included).
const TTFT_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0];
/// Time between consecutive tokens of a request, seconds.
const ITL_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Whole requests, seconds (until the last byte of the response).
const DURATION_BUCKETS: [f64; 15] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route (`/v1/chat/completions`), or `other` for unknown paths.
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

/// Makes the duration histograms of a [`Family`].
#[derive(Clone)]
pub struct DurationHistogram;

impl MetricConstructor<Histogram> for DurationHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(DURATION_BUCKETS)
    }
}

/// Every metric, registered once per server.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<EndpointLabel, Histogram, DurationHistogram>,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    queued: Gauge,
    running: Gauge,
    kv_blocks_total: Gauge,
    kv_blocks_free: Gauge,
    batch_size: Gauge,
    preemptions: Counter,
    spec_draft_tokens: Counter,
    spec_accepted_tokens: Counter,
    ttft: Histogram,
    itl: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fusebox");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests answered, by endpoint and status", requests.clone());
        let duration = Family::new_with_constructor(DurationHistogram);
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the last byte of its response (streams included), by endpoint",
            duration.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register("prompt_tokens", "Prompt tokens of generation requests that started", prompt_tokens.clone());
        let generated_tokens = Counter::default();
        registry.register("generated_tokens", "Tokens generated for clients", generated_tokens.clone());
        let queued = Gauge::default();
        registry.register("queue_depth", "Requests waiting for the engine", queued.clone());
        let running = Gauge::default();
        registry.register("running_requests", "Requests the engine is generating", running.clone());
        let kv_blocks_total = Gauge::default();
        registry.register("kv_blocks_total", "KV cache blocks of 16 positions", kv_blocks_total.clone());
        let kv_blocks_free = Gauge::default();
        registry.register("kv_blocks_free", "KV cache blocks no request holds", kv_blocks_free.clone());
        let batch_size = Gauge::default();
        registry.register("batch_size", "Requests in the engine's running batch", batch_size.clone());
        let preemptions = Counter::default();
        registry.register(
            "preemptions",
            "Requests preempted for KV cache room (blocks freed, tokens recomputed later)",
            preemptions.clone(),
        );
        let spec_draft_tokens = Counter::default();
        registry.register(
            "spec_decode_draft_tokens",
            "Draft tokens that speculative decoding scored",
            spec_draft_tokens.clone(),
        );
        let spec_accepted_tokens = Counter::default();
        registry.register(
            "spec_decode_accepted_tokens",
            "Draft tokens that speculative decoding accepted",
            spec_accepted_tokens.clone(),
        );
        let ttft = Histogram::new(TTFT_BUCKETS);
        registry.register(
            "time_to_first_token_seconds",
            "Time from submitting a request to its first token (queue wait and prefill included)",
            ttft.clone(),
        );
        let itl = Histogram::new(ITL_BUCKETS);
        registry.register("inter_token_latency_seconds", "Time between consecutive tokens of a request", itl.clone());
        Metrics {
            registry,
            requests,
            duration,
            prompt_tokens,
            generated_tokens,
            queued,
            running,
            kv_blocks_total,
            kv_blocks_free,
            batch_size,
            preemptions,
            spec_draft_tokens,
            spec_accepted_tokens,
            ttft,
            itl,
        }
    }

    /// A request to `endpoint` was answered with `status`.
    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.into(), status }).inc();
    }

    /// A request to `endpoint` took `d`, to the end of its response.
    pub fn duration(&self, endpoint: &str, d: Duration) {
        self.duration.get_or_create(&EndpointLabel { endpoint: endpoint.into() }).observe(d.as_secs_f64());
    }

    /// A generation request started with a prompt of `n` tokens.
    pub fn prompt(&self, n: usize) {
        self.prompt_tokens.inc_by(n as u64);
    }

    /// A token arrived, `since` the request was submitted (the `first`) or
    /// since the token before it.
    pub fn token(&self, first: bool, since: Duration) {
        self.generated_tokens.inc();
        if first { &self.ttft } else { &self.itl }.observe(since.as_secs_f64());
    }

    /// The exposition, with the engine's queue as of `stats`.
    pub fn render(&self, stats: EngineStats) -> String {
        self.queued.set(stats.queued as i64);
        self.running.set(stats.running as i64);
        self.kv_blocks_total.set(stats.kv_blocks_total as i64);
        self.kv_blocks_free.set(stats.kv_blocks_free as i64);
        self.batch_size.set(stats.running as i64);
        self.preemptions.inc_by(stats.preemptions.saturating_sub(self.preemptions.get()));
        self.spec_draft_tokens.inc_by(stats.spec_draft_tokens.saturating_sub(self.spec_draft_tokens.get()));
        self.spec_accepted_tokens.inc_by(stats.spec_accepted_tokens.saturating_sub(self.spec_accepted_tokens.get()));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            let _ = writeln!(out, "# encoding the metrics failed: {e}");
        }
        out
    }
}
