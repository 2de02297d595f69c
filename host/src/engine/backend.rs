//! Backends execute a [`ScheduledBatch`] and return one token per sampling sequence.
//!
//! A backend never reaches into scheduler state and holds no scheduling policy: the batch is
//! all it sees. The engine loop is the same for all of them.

use crate::sampling::SamplingParams;
use crate::structured::masks::StepMasks;
use weave_scheduler::{RequestId, ScheduledBatch, StepOutput};

/// What a backend reports for one step.
#[derive(Debug, Clone, Default)]
pub struct StepResult {
    pub output: StepOutput,
    /// How long the step took on this backend's clock, in seconds, if it has its own clock
    /// (a simulator); `None` means the engine measures wall time.
    pub duration_s: Option<f64>,
    /// Beside `output.sampled`, each row's logprobs when its request asked for them; empty
    /// when no row did.
    pub logprobs: Vec<Option<TokenLogprobs>>,
    /// The backend's own phases (prepare, forward, sample), when it times them; the engine
    /// adds schedule and update.
    pub phases: Option<crate::engine::steplog::Phases>,
}

/// A sampled token's log-probability under the model (raw logits, before temperature and
/// truncation, as OpenAI and vLLM report it) and the `top` most likely tokens with theirs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub trait Backend {
    fn name(&self) -> &'static str;
    /// Whether the run's clock is wall time (real models) rather than the backend's own.
    fn wall_clock(&self) -> bool {
        false
    }
    /// A request was accepted; its sampling parameters apply to its rows from now on.
    fn add_request(&mut self, id: RequestId, params: &SamplingParams) {
        let _ = (id, params);
    }
    /// A request finished or was aborted.
    fn remove_request(&mut self, id: RequestId) {
        let _ = id;
    }
    /// Whether this backend applies token masks ([`Self::set_masks`]) before it samples: a
    /// backend that samples real logits does; one that makes tokens up cannot.
    fn applies_masks(&self) -> bool {
        false
    }
    /// The next step's token masks, by sampling row (`None` when no row is guided); the
    /// backend waits for a row's mask only when it samples that row.
    fn set_masks(&mut self, masks: Option<std::sync::Arc<StepMasks>>) {
        let _ = masks;
    }
    fn execute(&mut self, batch: &ScheduledBatch) -> anyhow::Result<StepResult>;
}

/// Delegates every method to the backend behind a pointer: `Box<dyn Backend>` (a backend
/// chosen at run time, `--device`) and `&mut B` (a backend a benchmark lends to each run).
macro_rules! delegate_backend {
    ($($ty:ty),*) => {$(
        impl<B: Backend + ?Sized> Backend for $ty {
            fn name(&self) -> &'static str {
                (**self).name()
            }
            fn wall_clock(&self) -> bool {
                (**self).wall_clock()
            }
            fn add_request(&mut self, id: RequestId, params: &SamplingParams) {
                (**self).add_request(id, params)
            }
            fn remove_request(&mut self, id: RequestId) {
                (**self).remove_request(id)
            }
            fn applies_masks(&self) -> bool {
                (**self).applies_masks()
            }
            fn set_masks(&mut self, masks: Option<std::sync::Arc<StepMasks>>) {
                (**self).set_masks(masks)
            }
            fn execute(&mut self, batch: &ScheduledBatch) -> anyhow::Result<StepResult> {
                (**self).execute(batch)
            }
        }
    )*};
}
delegate_backend!(Box<B>, &mut B);
