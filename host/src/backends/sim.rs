//! The simulator's backend: no model; a cost model says how long each step took.
//!
//! [`CostModel`] is the one question the simulator asks of a step. Its implementations (the
//! roofline, the log-fitted and the profiled models) live in `study`, which drives this backend.

use crate::backends::null::NULL_TOKEN;
use crate::engine::{Backend, StepResult};
use weave_scheduler::{ScheduledBatch, StepOutput};

/// What a step costs, from its shape alone: `tokens` rows, `sampled` sampled rows, and each
/// sequence's `(query rows, cached context)`. The same shape comes from a scheduled batch
/// (simulating) or a logged step (checking a model against a real run).
pub trait CostModel: std::fmt::Debug {
    fn time(&self, tokens: f64, sampled: f64, seqs: impl Iterator<Item = (f64, f64)>) -> f64;

    fn step_time(&self, b: &ScheduledBatch) -> f64 {
        let seqs = b.seqs.iter().map(|s| (s.num_query_tokens as f64, s.context_len as f64));
        self.time(b.num_tokens() as f64, b.logits_indices.len() as f64, seqs)
    }

    /// The prediction for a logged step.
    fn record_time(&self, s: &crate::engine::steplog::StepRecord) -> f64 {
        self.time(s.total_tokens() as f64, s.sampled_rows() as f64, s.seq_shapes())
    }
}

/// Query-key pairs a sequence's attention computes this step: `q` queries over `c` cached
/// tokens and, causally, over themselves.
pub fn attention_pairs(q: f64, c: f64) -> f64 {
    q * c + q * (q + 1.0) / 2.0
}

/// The simulator's backend: no model, a synthetic token per sampling row, the cost model's time.
#[derive(Debug)]
pub struct SimBackend<C> {
    pub cost: C,
}

impl<C: CostModel> Backend for SimBackend<C> {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn execute(&mut self, b: &ScheduledBatch) -> anyhow::Result<StepResult> {
        Ok(StepResult {
            output: StepOutput { sampled: vec![NULL_TOKEN; b.logits_indices.len()] },
            duration_s: Some(self.cost.step_time(b)),
            logprobs: Vec::new(),
            phases: None,
        })
    }
}
