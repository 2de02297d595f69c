//! Batching policies: what may be admitted and with which limits, decided once per step.
//!
//! The scheduling loop itself (running first, then waiting; budget; preemption) is shared;
//! a policy only answers the two questions below, which is what keeps static and adaptive
//! batching a few lines each.

use crate::config::{PolicyKind, SchedulerConfig};

/// The load a policy sees at the start of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub num_running: usize,
    pub num_waiting: usize,
    /// Whether any running request has already produced an output token.
    pub running_has_outputs: bool,
}

/// This step's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    pub token_budget: usize,
    pub chunked_prefill: bool,
}

pub trait BatchPolicy: std::fmt::Debug + Send {
    fn limits(&self, load: Load, cfg: &SchedulerConfig) -> StepLimits {
        let _ = load;
        StepLimits { token_budget: cfg.max_num_batched_tokens, chunked_prefill: cfg.enable_chunked_prefill }
    }
    /// Whether waiting requests may be admitted this step.
    fn may_admit(&self, load: Load) -> bool {
        let _ = load;
        true
    }
}

/// vLLM's iteration-level scheduling (FCFS or priority: the queue differs, not the policy).
#[derive(Debug, Clone, Copy, Default)]
pub struct Continuous;
impl BatchPolicy for Continuous {}

/// A batch is the set of requests admitted while nothing running has produced output yet;
/// no one joins it after that, and the next batch forms once it has fully drained.
#[derive(Debug, Clone, Copy, Default)]
pub struct Static;
impl BatchPolicy for Static {
    fn may_admit(&self, load: Load) -> bool {
        load.num_running == 0 || !load.running_has_outputs
    }
}

/// Low load (few unfinished requests): a small budget and whole prompts, for short steps
/// and the lowest latency. High load: the full budget with chunked prefill, for throughput.
#[derive(Debug, Clone, Copy, Default)]
pub struct Adaptive;
impl BatchPolicy for Adaptive {
    fn limits(&self, load: Load, cfg: &SchedulerConfig) -> StepLimits {
        if load.num_running + load.num_waiting <= cfg.adaptive.low_load_requests {
            StepLimits {
                token_budget: cfg.adaptive.low_load_budget.min(cfg.max_num_batched_tokens),
                chunked_prefill: false,
            }
        } else {
            StepLimits { token_budget: cfg.max_num_batched_tokens, chunked_prefill: true }
        }
    }
}

pub(crate) fn for_kind(kind: PolicyKind) -> Box<dyn BatchPolicy> {
    match kind {
        PolicyKind::Fcfs | PolicyKind::Priority => Box::new(Continuous),
        PolicyKind::Static => Box::new(Static),
        PolicyKind::Adaptive => Box::new(Adaptive),
    }
}
