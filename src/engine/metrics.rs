//! The engine's metrics in Prometheus' text format (`GET /metrics`), named and shaped as vLLM
//! and TGI expose theirs: requests running and waiting, KV blocks, prefix-cache queries and
//! hits, prompt and generated tokens, time to first token, time per output token and request
//! latency histograms.

use crate::model::KvPool;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Every metric of one engine.
pub struct Metrics {
    registry: Registry,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub preempted: IntCounter,
    kv_used: IntGauge,
    kv_cached: IntGauge,
    kv_free: IntGauge,
    kv_total: IntGauge,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub finished: IntCounterVec,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        let latency = [
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0,
        ];
        let per_token = [
            0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
            0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
        ];
        let finished = IntCounterVec::new(
            Opts::new(
                "glm2rs_request_success_total",
                "Requests finished, by finish reason (stop, length, error, cancelled).",
            ),
            &["finished_reason"],
        )
        .expect("valid metric");
        r.register(Box::new(finished.clone()))
            .expect("unique metric");
        Self {
            running: gauge(
                &r,
                "glm2rs_num_requests_running",
                "Requests in the running batch.",
            ),
            waiting: gauge(
                &r,
                "glm2rs_num_requests_waiting",
                "Requests waiting for a place (count or KV memory).",
            ),
            preempted: counter(
                &r,
                "glm2rs_num_preemptions_total",
                "Sequences preempted (blocks freed, recomputed later) when the KV cache ran out.",
            ),
            kv_used: gauge(
                &r,
                "glm2rs_kv_cache_blocks_used",
                "KV cache blocks held by sequences.",
            ),
            kv_cached: gauge(
                &r,
                "glm2rs_kv_cache_blocks_cached",
                "KV cache blocks held by no sequence, kept for the prefix cache.",
            ),
            kv_free: gauge(
                &r,
                "glm2rs_kv_cache_blocks_free",
                "KV cache blocks a sequence can still take (free, cached or not yet allocated).",
            ),
            kv_total: gauge(
                &r,
                "glm2rs_kv_cache_blocks_total",
                "KV cache blocks the memory limit allows.",
            ),
            prefix_queries: counter(
                &r,
                "glm2rs_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            ),
            prefix_hits: counter(
                &r,
                "glm2rs_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
            ),
            prompt_tokens: counter(
                &r,
                "glm2rs_prompt_tokens_total",
                "Prompt tokens of finished requests.",
            ),
            generation_tokens: counter(&r, "glm2rs_generation_tokens_total", "Tokens generated."),
            finished,
            ttft: histogram(
                &r,
                "glm2rs_time_to_first_token_seconds",
                "Time from submission to the first generated token.",
                &latency,
            ),
            tpot: histogram(
                &r,
                "glm2rs_time_per_output_token_seconds",
                "Time between consecutive generated tokens of a request.",
                &per_token,
            ),
            e2e: histogram(
                &r,
                "glm2rs_e2e_request_latency_seconds",
                "Time from submission to the last token.",
                &latency,
            ),
            registry: r,
        }
    }
}

impl Metrics {
    /// The text exposition, with the KV pool's gauges and counters read now.
    pub fn render(&self, pool: &KvPool) -> String {
        let used = pool.blocks_in_use() as i64;
        self.kv_used.set(used);
        self.kv_cached.set(pool.blocks_cached() as i64);
        self.kv_free.set(pool.blocks_available() as i64);
        self.kv_total.set(pool.max_blocks() as i64);
        let (q, h) = pool.prefix_stats();
        // counters follow the pool's own (monotonic) counts
        self.prefix_queries
            .inc_by(q.saturating_sub(self.prefix_queries.get()));
        self.prefix_hits
            .inc_by(h.saturating_sub(self.prefix_hits.get()));
        let mut out = vec![];
        let enc = prometheus::TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
