//! `weave logits`: one sequence decoded greedily, step by step, with each step's logits kept:
//! the raw material for comparing two backends (issue 10's proof: the first step's largest
//! difference, and where greedy tokens part, the top-2 gap at that step).
//!
//! The steps are built by hand (one sequence, its KV in blocks `1..`), not by the scheduler,
//! so that the comparison sees the model and nothing else.

use serde::{Deserialize, Serialize};
use weave_scheduler::ScheduledBatch;

/// A backend that gives a step's logits: the sampled rows', `[rows][vocab]`.
pub trait LogitsSource {
    fn step_logits(&mut self, b: &ScheduledBatch) -> anyhow::Result<Vec<f32>>;
    fn vocab_size(&self) -> usize;
    /// KV layer groups the batches must carry (more than one for sliding-window models).
    fn kv_groups(&self) -> usize {
        1
    }
}

impl LogitsSource for crate::backends::cpu::CpuBackend {
    fn step_logits(&mut self, b: &ScheduledBatch) -> anyhow::Result<Vec<f32>> {
        Ok(self.forward(b))
    }
    fn vocab_size(&self) -> usize {
        self.model().cfg.vocab_size
    }
    fn kv_groups(&self) -> usize {
        self.kv_layout().groups.len()
    }
}

impl LogitsSource for crate::backends::cuda::model::CudaBackend {
    fn step_logits(&mut self, b: &ScheduledBatch) -> anyhow::Result<Vec<f32>> {
        Ok(self.logits_of(b)?)
    }
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
}

/// What a greedy run of one sequence gave.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub device: String,
    /// The prompt's token ids, as run.
    pub prompt_ids: Vec<u32>,
    /// The greedy token of each step.
    pub tokens: Vec<u32>,
    /// Each step's two largest logits: `(id, logit)`, best first.
    pub top2: Vec<[(u32, f32); 2]>,
    /// The first step's (the prompt's) whole logits row.
    pub first_logits: Vec<f32>,
}

/// The step that brings `new` tokens at positions `ctx..` of one sequence whose KV lives in
/// blocks `1, 2, ...` of `block_size` tokens (block 0 is the null block).
pub fn one_sequence_step(new: &[u32], ctx: usize, block_size: usize) -> ScheduledBatch {
    one_sequence_step_in(new, ctx, block_size, 1, 0)
}

/// [`one_sequence_step`] for a cache of `groups` KV layer groups: group `g`'s blocks are
/// `1 + g * stride ..`, `stride` blocks apart (at least the sequence's blocks; the backend
/// needs `1 + groups * stride` blocks). Nothing is released: a window layer skips what it
/// does not see.
pub fn one_sequence_step_in(
    new: &[u32],
    ctx: usize,
    block_size: usize,
    groups: usize,
    stride: usize,
) -> ScheduledBatch {
    let n = new.len();
    let total = ctx + n;
    let blocks = total.div_ceil(block_size);
    let (groups, stride) = (groups.max(1), stride.max(blocks));
    let first = |g: usize| 1 + g * stride;
    ScheduledBatch {
        input_ids: new.to_vec(),
        positions: (ctx as u32..total as u32).collect(),
        query_start_loc: vec![0, n as u32],
        seq_lens: vec![total as u32],
        context_lens: vec![ctx as u32],
        block_tables: (0..groups).flat_map(|g| (first(g)..first(g) + blocks).map(|b| b as u32)).collect(),
        max_blocks_per_seq: blocks,
        block_size,
        slot_mapping: (0..groups)
            .flat_map(|g| (ctx..total).map(move |p| ((first(g) + p / block_size) * block_size + p % block_size) as u32))
            .collect(),
        num_kv_groups: groups,
        logits_indices: vec![n as u32 - 1],
        num_prefill_tokens: if ctx == 0 { n } else { 0 },
        num_decode_tokens: if ctx == 0 { 0 } else { n },
        max_query_len: n as u32,
        max_seq_len: total as u32,
        ..Default::default()
    }
}

/// The two largest of `row`, best first, ties to the lower id.
pub fn top2(row: &[f32]) -> [(u32, f32); 2] {
    let mut best = [(u32::MAX, f32::NEG_INFINITY); 2];
    for (i, &x) in row.iter().enumerate() {
        if x > best[0].1 {
            best = [(i as u32, x), best[0]];
        } else if x > best[1].1 {
            best[1] = (i as u32, x);
        }
    }
    best
}

/// Blocks one group of [`greedy_trace`]'s sequence of `tokens` tokens takes.
fn trace_stride(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// KV blocks a backend of `groups` layer groups needs for [`greedy_trace`] over `tokens`
/// tokens (prompt and steps), the null block included.
pub fn trace_blocks(groups: usize, tokens: usize, block_size: usize) -> usize {
    1 + groups * trace_stride(tokens, block_size)
}

/// `prompt` through `src`, then `steps - 1` greedy decode steps (`steps` tokens in all), on a
/// backend of [`trace_blocks`] blocks.
pub fn greedy_trace(
    src: &mut dyn LogitsSource,
    device: &str,
    prompt: &[u32],
    steps: usize,
    block_size: usize,
) -> anyhow::Result<Trace> {
    let (groups, stride) = (src.kv_groups(), trace_stride(prompt.len() + steps, block_size));
    anyhow::ensure!(!prompt.is_empty(), "the prompt has no tokens");
    let vocab = src.vocab_size();
    let mut t = Trace { device: device.into(), prompt_ids: prompt.to_vec(), ..Default::default() };
    let mut new = prompt.to_vec();
    let mut ctx = 0;
    for step in 0..steps {
        let logits = src.step_logits(&one_sequence_step_in(&new, ctx, block_size, groups, stride))?;
        anyhow::ensure!(logits.len() == vocab, "step {step}: {} logits for a vocabulary of {vocab}", logits.len());
        let best = top2(&logits);
        if step == 0 {
            t.first_logits = logits;
        }
        t.tokens.push(best[0].0);
        t.top2.push(best);
        ctx += new.len();
        new = vec![best[0].0];
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_address_the_sequence_blocks() {
        let b = one_sequence_step(&[5, 6, 7], 15, 16);
        assert_eq!(b.positions, [15, 16, 17]);
        assert_eq!(b.block_tables, [1, 2]);
        assert_eq!(b.slot_mapping, [16 + 15, 32, 33]);
        assert_eq!((b.logits_indices[0], b.max_seq_len), (2, 18));
        assert_eq!(top2(&[0.5, 3.0, 2.0, 3.0]), [(1, 3.0), (3, 3.0)]);
    }

    /// A fresh backend fed the same steps gives the same trace (tests/generation.rs checks
    /// the steps against the engine's greedy tokens on the real model).
    #[test]
    fn a_trace_repeats_on_a_fresh_backend() {
        let model = std::sync::Arc::new(crate::model::dummy::tiny_model(2, 9, 128));
        let run = || {
            let mut be = crate::backends::cpu::CpuBackend::new(model.clone(), 16, 16, 1, 0);
            greedy_trace(&mut be, "cpu", &[3, 1, 4, 1, 5, 9, 2, 6], 20, 16).unwrap()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert_eq!((a.tokens.len(), a.first_logits.len()), (20, 300));
        assert!(a.top2.iter().zip(&a.tokens).all(|(t, &tok)| t[0].0 == tok && t[0].1 >= t[1].1));
    }
}
