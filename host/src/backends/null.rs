//! The null backend: no model, no time; for replaying traces through the scheduler.

use crate::engine::{Backend, StepResult};
use weave_scheduler::{ScheduledBatch, StepOutput};

/// No model: every sampling sequence gets the same synthetic token (never an EOS, since
/// replayed requests carry none); time is counted in steps.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullBackend;

/// The token the null backend samples.
pub const NULL_TOKEN: u32 = 0;

impl Backend for NullBackend {
    fn name(&self) -> &'static str {
        "null"
    }
    fn execute(&mut self, batch: &ScheduledBatch) -> anyhow::Result<StepResult> {
        Ok(StepResult {
            output: StepOutput { sampled: vec![NULL_TOKEN; batch.logits_indices.len()] },
            duration_s: Some(1.0),
            logprobs: Vec::new(),
            phases: None,
        })
    }
}
