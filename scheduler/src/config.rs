//! Scheduler configuration and its validation.

use crate::SchedError;

/// Which batching policy drives admission and the per-step limits (see [`crate::policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Continuous batching, waiting queue first come first served (vLLM's default).
    #[default]
    Fcfs,
    /// Continuous batching, waiting queue by (priority, arrival); lowest value first.
    /// Preemption evicts the running request with the highest (priority, arrival).
    Priority,
    /// Static batching: admit a batch, run it to completion, then admit the next.
    Static,
    /// Continuous batching whose budget and chunking follow the load.
    Adaptive,
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fcfs" => Ok(Self::Fcfs),
            "priority" => Ok(Self::Priority),
            "static" => Ok(Self::Static),
            "adaptive" => Ok(Self::Adaptive),
            _ => Err(format!("unknown policy {s:?}; known: fcfs, priority, static, adaptive")),
        }
    }
}

/// Knobs of the adaptive policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveConfig {
    /// At or below this many unfinished requests (running + waiting) the load is low.
    pub low_load_requests: usize,
    /// Token budget under low load (no chunking); under high load the budget is
    /// `max_num_batched_tokens` with chunked prefill on.
    pub low_load_budget: usize,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig { low_load_requests: 4, low_load_budget: 512 }
    }
}

/// Defaults are vLLM V1's (offline engine) where vLLM has the knob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Token budget per step: prefill chunk tokens + one per decode.
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    /// Blocks in the KV pool, the reserved null block included.
    pub num_gpu_blocks: usize,
    pub enable_chunked_prefill: bool,
    /// Cap on one request's prefill chunk per step; 0 = no cap.
    pub long_prefill_token_threshold: usize,
    /// Cap on sequences in prefill per step; 0 = no cap (vLLM V1 has no such cap).
    pub max_num_partial_prefills: usize,
    /// Cap on prefill tokens per step (the "prefill share" knob); 0 = no cap.
    pub max_prefill_tokens_per_step: usize,
    pub enable_prefix_caching: bool,
    /// Blocks kept free when admitting a waiting request; 0 as in vLLM V1.
    pub watermark_blocks: usize,
    pub policy: PolicyKind,
    pub adaptive: AdaptiveConfig,
    /// How the model's layers share the KV pool: one full group, or (sliding-window models)
    /// full and windowed groups of equal size, each block holding one group's layers.
    pub kv_groups: weave_block_manager::KvGroups,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            max_model_len: 8192,
            block_size: 16,
            num_gpu_blocks: 4096,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: 0,
            max_num_partial_prefills: 0,
            max_prefill_tokens_per_step: 0,
            enable_prefix_caching: true,
            watermark_blocks: 0,
            policy: PolicyKind::Fcfs,
            adaptive: AdaptiveConfig::default(),
            kv_groups: weave_block_manager::KvGroups::default(),
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), SchedError> {
        let bad = |msg: String| Err(SchedError::InvalidConfig(msg));
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens must be at least 1".into());
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs must be at least 1".into());
        }
        if self.max_model_len < 2 {
            return bad(format!("max_model_len is {}; it must be at least 2", self.max_model_len));
        }
        if self.block_size == 0 {
            return bad("block_size must be at least 1".into());
        }
        if self.num_gpu_blocks < 2 {
            return bad(format!(
                "num_gpu_blocks is {}; at least 2 are needed (block 0 is reserved)",
                self.num_gpu_blocks
            ));
        }
        if self.policy == PolicyKind::Adaptive && self.adaptive.low_load_budget == 0 {
            return bad("adaptive.low_load_budget must be at least 1".into());
        }
        Ok(())
    }

    /// Tokens the usable part of the KV pool holds in every layer group (with windowed
    /// groups a long sequence can hold more: their old blocks are given back).
    pub fn kv_capacity_tokens(&self) -> usize {
        (self.num_gpu_blocks - 1) / self.kv_groups.len().max(1) * self.block_size
    }
}
