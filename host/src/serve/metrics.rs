//! `/metrics`: vLLM's metric names under a prefix (`weave:` by default; `--metrics-prefix
//! vllm` gives vLLM's exact names, which the Kubernetes inference gateway and llm-d scrape
//! without configuration), through the `prometheus` crate.

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
    /// Structured outputs, per step with guided rows: the mask workers' time, and the part
    /// of it the step thread waited for.
    pub mask_time: Histogram,
    pub mask_wait: Histogram,
    /// Sequences admitted with a structured-output constraint.
    pub guided_requests: IntCounter,
    /// vLLM's `lora_requests_info`: no adapters, set to the time of the last step (the
    /// gateway reads its labels, and vLLM stamps it the same way).
    pub lora_info: Gauge,
}

/// The KV cache's shape, exported as vLLM's `cache_config_info` labels.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheInfo {
    pub block_size: usize,
    /// Blocks in the pool (as vLLM counts them: the null block included).
    pub num_gpu_blocks: usize,
    pub cache_dtype: String,
    pub enable_prefix_caching: bool,
}

/// Why a metrics prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--metrics-prefix {0:?} is not a Prometheus name: use letters, digits, '_' or ':', not starting with a digit (e.g. weave or vllm)")]
pub struct BadPrefix(pub String);

/// Checks a metric-name prefix (`weave`, `vllm`, ...); the names are `PREFIX:name`.
pub fn check_prefix(prefix: &str) -> Result<(), BadPrefix> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    match prefix.chars().next() {
        Some(c) if !c.is_ascii_digit() && prefix.chars().all(ok_char) => Ok(()),
        _ => Err(BadPrefix(prefix.to_string())),
    }
}

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] = &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0];
const MASK_BUCKETS: &[f64] = &[0.0, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25];
const ITERATION_BUCKETS: &[f64] = &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

impl Metrics {
    /// Metrics named `{prefix}:...`; `prefix` must pass [`check_prefix`].
    pub fn new(model_name: &str, prefix: &str, cache: &CacheInfo) -> Result<Metrics, BadPrefix> {
        check_prefix(prefix)?;
        let registry = Registry::new();
        let opts =
            |name: &str, help: &str| Opts::new(format!("{prefix}:{name}"), help).const_label("model_name", model_name);
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
            mask_time: Histogram::with_opts(hopts(
                "structured_output_mask_seconds",
                "Per step with guided rows: time the mask workers spent on its token masks (beside the forward pass).",
                MASK_BUCKETS,
            ))
            .expect("valid"),
            mask_wait: Histogram::with_opts(hopts(
                "structured_output_mask_wait_seconds",
                "Per step with guided rows: time the step waited for token masks still being computed.",
                MASK_BUCKETS,
            ))
            .expect("valid"),
            guided_requests: IntCounter::with_opts(opts(
                "structured_output_requests_total",
                "Sequences admitted with a structured-output constraint.",
            ))
            .expect("valid"),
            lora_info: Gauge::with_opts(
                Opts::new(format!("{prefix}:lora_requests_info"), "Running and waiting LoRA adapters (none).")
                    .const_label("running_lora_adapters", "")
                    .const_label("waiting_lora_adapters", "")
                    .const_label("max_lora", "0"),
            )
            .expect("valid"),
            registry,
        };
        // An info metric: constant 1, the facts in its labels.
        let cache_info = Gauge::with_opts(
            Opts::new(format!("{prefix}:cache_config_info"), "The KV cache's configuration.")
                .const_label("block_size", cache.block_size.to_string())
                .const_label("num_gpu_blocks", cache.num_gpu_blocks.to_string())
                .const_label("num_cpu_blocks", "0")
                .const_label("cache_dtype", cache.cache_dtype.clone())
                .const_label("enable_prefix_caching", if cache.enable_prefix_caching { "True" } else { "False" }),
        )
        .expect("valid");
        cache_info.set(1.0);
        m.lora_info.set(unix_now_f64());
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
        r.register(Box::new(m.mask_time.clone())).expect("unique");
        r.register(Box::new(m.mask_wait.clone())).expect("unique");
        r.register(Box::new(m.guided_requests.clone())).expect("unique");
        r.register(Box::new(m.lora_info.clone())).expect("unique");
        r.register(Box::new(cache_info)).expect("unique");
        Ok(m)
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now_f64() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> CacheInfo {
        CacheInfo { block_size: 16, num_gpu_blocks: 1025, cache_dtype: "f16".into(), enable_prefix_caching: true }
    }

    #[test]
    fn names_carry_the_prefix_and_the_model() {
        let m = Metrics::new("smol", "weave", &cache()).unwrap();
        m.generation_tokens.inc_by(5);
        m.request_success.with_label_values(&["stop"]).inc();
        m.ttft.observe(0.03);
        let t = m.render();
        assert!(t.contains("weave:generation_tokens_total{model_name=\"smol\"} 5"), "{t}");
        assert!(t.contains("weave:request_success_total{finished_reason=\"stop\",model_name=\"smol\"} 1"), "{t}");
        assert!(t.contains("weave:time_to_first_token_seconds_count{model_name=\"smol\"} 1"), "{t}");
        assert!(t.contains("weave:kv_cache_usage_perc"), "{t}");
        assert!(!t.contains("vllm:"), "{t}");
    }

    /// What the gateway's endpoint picker reads, under vLLM's exact names.
    #[test]
    fn the_vllm_prefix_gives_the_gateway_its_names() {
        let m = Metrics::new("smol", "vllm", &cache()).unwrap();
        m.waiting.set(3);
        m.running.set(2);
        m.kv_usage.set(0.25);
        let t = m.render();
        for want in [
            "vllm:num_requests_waiting{model_name=\"smol\"} 3",
            "vllm:num_requests_running{model_name=\"smol\"} 2",
            "vllm:kv_cache_usage_perc{model_name=\"smol\"} 0.25",
            "vllm:prefix_cache_hits_total{model_name=\"smol\"} 0",
            "vllm:prefix_cache_queries_total{model_name=\"smol\"} 0",
        ] {
            assert!(t.contains(want), "missing {want} in\n{t}");
        }
        let info = t.lines().find(|l| l.starts_with("vllm:cache_config_info{")).expect("cache_config_info");
        for label in ["block_size=\"16\"", "num_gpu_blocks=\"1025\"", "enable_prefix_caching=\"True\""] {
            assert!(info.contains(label), "{info}");
        }
        assert!(info.ends_with(" 1"), "{info}");
        let lora = t.lines().find(|l| l.starts_with("vllm:lora_requests_info{")).expect("lora_requests_info");
        assert!(lora.contains("max_lora=\"0\"") && lora.contains("running_lora_adapters=\"\""), "{lora}");
        assert!(!t.contains("weave:"), "{t}");
    }

    #[test]
    fn a_bad_prefix_is_named() {
        for bad in ["", "9x", "a-b", "vllm "] {
            let e = Metrics::new("smol", bad, &cache()).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(check_prefix("my_org:llm").is_ok());
    }
}
