//! `/metrics`: vLLM's metric names under a `weave:` prefix, through the `prometheus` crate.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Every metric the server exports. Gauges are set by the engine thread after each step;
/// counters and histograms as tokens and requests come and go.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_usage: Gauge,
    pub preemptions: IntCounter,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub request_success: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub iteration_tokens: Histogram,
}

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] = &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0];
const ITERATION_BUCKETS: &[f64] = &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

impl Metrics {
    pub fn new(model_name: &str) -> Metrics {
        let registry = Registry::new();
        let opts =
            |name: &str, help: &str| Opts::new(format!("weave:{name}"), help).const_label("model_name", model_name);
        let hopts = |name: &str, help: &str, buckets: &[f64]| HistogramOpts {
            common_opts: opts(name, help),
            buckets: buckets.to_vec(),
        };
        let m = Metrics {
            running: IntGauge::with_opts(opts("num_requests_running", "Sequences in the running batch."))
                .expect("valid"),
            waiting: IntGauge::with_opts(opts("num_requests_waiting", "Sequences waiting to be scheduled."))
                .expect("valid"),
            kv_usage: Gauge::with_opts(opts("kv_cache_usage_perc", "KV-cache blocks in use (1 = full)."))
                .expect("valid"),
            preemptions: IntCounter::with_opts(opts("num_preemptions_total", "Preemptions (by recompute)."))
                .expect("valid"),
            prefix_cache_queries: IntCounter::with_opts(opts(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            ))
            .expect("valid"),
            prefix_cache_hits: IntCounter::with_opts(opts(
                "prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
            ))
            .expect("valid"),
            prompt_tokens: IntCounter::with_opts(opts("prompt_tokens_total", "Prompt tokens prefilled."))
                .expect("valid"),
            generation_tokens: IntCounter::with_opts(opts("generation_tokens_total", "Tokens generated."))
                .expect("valid"),
            request_success: IntCounterVec::new(
                opts("request_success_total", "Sequences finished, by finish reason."),
                &["finished_reason"],
            )
            .expect("valid"),
            ttft: Histogram::with_opts(hopts(
                "time_to_first_token_seconds",
                "From arrival to the first token.",
                LATENCY_BUCKETS,
            ))
            .expect("valid"),
            itl: Histogram::with_opts(hopts(
                "inter_token_latency_seconds",
                "Between consecutive tokens of a sequence.",
                LATENCY_BUCKETS,
            ))
            .expect("valid"),
            e2e: Histogram::with_opts(hopts(
                "e2e_request_latency_seconds",
                "From arrival to the last token.",
                E2E_BUCKETS,
            ))
            .expect("valid"),
            iteration_tokens: Histogram::with_opts(hopts(
                "iteration_tokens_total",
                "Tokens (prefill + decode) per engine step.",
                ITERATION_BUCKETS,
            ))
            .expect("valid"),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.running.clone())).expect("unique");
        r.register(Box::new(m.waiting.clone())).expect("unique");
        r.register(Box::new(m.kv_usage.clone())).expect("unique");
        r.register(Box::new(m.preemptions.clone())).expect("unique");
        r.register(Box::new(m.prefix_cache_queries.clone())).expect("unique");
        r.register(Box::new(m.prefix_cache_hits.clone())).expect("unique");
        r.register(Box::new(m.prompt_tokens.clone())).expect("unique");
        r.register(Box::new(m.generation_tokens.clone())).expect("unique");
        r.register(Box::new(m.request_success.clone())).expect("unique");
        r.register(Box::new(m.ttft.clone())).expect("unique");
        r.register(Box::new(m.itl.clone())).expect("unique");
        r.register(Box::new(m.e2e.clone())).expect("unique");
        r.register(Box::new(m.iteration_tokens.clone())).expect("unique");
        m
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_the_model() {
        let m = Metrics::new("smol");
        m.generation_tokens.inc_by(5);
        m.request_success.with_label_values(&["stop"]).inc();
        m.ttft.observe(0.03);
        let t = m.render();
        assert!(t.contains("weave:generation_tokens_total{model_name=\"smol\"} 5"), "{t}");
        assert!(t.contains("weave:request_success_total{finished_reason=\"stop\",model_name=\"smol\"} 1"), "{t}");
        assert!(t.contains("weave:time_to_first_token_seconds_count{model_name=\"smol\"} 1"), "{t}");
        assert!(t.contains("weave:kv_cache_usage_perc"), "{t}");
    }
}
