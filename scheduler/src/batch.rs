//! `ScheduledBatch`: the contract between the scheduler and every backend.
//!
//! Flat, varlen arrays, exactly what the attention and KV-write kernels take. Sequence `i`
//! owns token rows `query_start_loc[i]..query_start_loc[i + 1]`; its queries sit at positions
//! `context_lens[i]..seq_lens[i]`, attend causally to the cached `context_lens[i]` tokens and
//! to themselves, and their K/V go to `slot_mapping` (flat slot = block * block_size + offset).
//! Row `i` of `block_tables` (stride `max_blocks_per_seq`, padded with the null block 0)
//! lists sequence `i`'s blocks.
//!
//! A sliding-window model's layers come in `num_kv_groups` groups (see the block manager's
//! `KvGroups`), each with its own blocks: then `block_tables` holds one such table per group,
//! group after group, and `slot_mapping` one slot per token per group, group after group.
//! Group 0 comes first, so a one-group batch reads as it always has.

use crate::request::RequestId;

/// One scheduled sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqMeta {
    pub request_id: RequestId,
    /// Query tokens this step.
    pub num_query_tokens: u32,
    /// Tokens already in the KV cache before this step.
    pub context_len: u32,
    pub is_prefill: bool,
    /// Whether this sequence samples a token this step (a decode, or a prefill's last chunk).
    pub samples: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduledBatch {
    pub step: u64,
    pub seqs: Vec<SeqMeta>,
    pub input_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Cumulative query offsets, `seqs.len() + 1` entries, starting at 0.
    pub query_start_loc: Vec<u32>,
    /// Context + query tokens per sequence.
    pub seq_lens: Vec<u32>,
    pub context_lens: Vec<u32>,
    /// `seqs.len() * max_blocks_per_seq` block ids, row-major, padded with block 0.
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: usize,
    pub block_size: usize,
    /// Flat KV slot of every input token.
    pub slot_mapping: Vec<u32>,
    /// Token row whose logits are sampled, one per sampling sequence, in sequence order.
    pub logits_indices: Vec<u32>,
    /// Requests preempted while this step was scheduled.
    pub preempted: Vec<RequestId>,
    pub num_prefill_tokens: usize,
    pub num_decode_tokens: usize,
    pub num_prefill_seqs: usize,
    /// Prefill sequences whose prompt is not finished by this step.
    pub num_partial_prefills: usize,
    pub max_query_len: u32,
    pub max_seq_len: u32,
    /// Layer groups with their own block tables and slots; 0 is read as 1.
    pub num_kv_groups: usize,
}

impl ScheduledBatch {
    /// Empties every array, keeping their capacity.
    pub fn clear(&mut self) {
        let ScheduledBatch {
            step,
            seqs,
            input_ids,
            positions,
            query_start_loc,
            seq_lens,
            context_lens,
            block_tables,
            max_blocks_per_seq,
            block_size: _,
            slot_mapping,
            logits_indices,
            preempted,
            num_prefill_tokens,
            num_decode_tokens,
            num_prefill_seqs,
            num_partial_prefills,
            max_query_len,
            max_seq_len,
            num_kv_groups: _,
        } = self;
        *step = 0;
        for v in
            [input_ids, positions, query_start_loc, seq_lens, context_lens, block_tables, slot_mapping, logits_indices]
        {
            v.clear();
        }
        seqs.clear();
        preempted.clear();
        *max_blocks_per_seq = 0;
        *num_prefill_tokens = 0;
        *num_decode_tokens = 0;
        *num_prefill_seqs = 0;
        *num_partial_prefills = 0;
        *max_query_len = 0;
        *max_seq_len = 0;
    }

    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
    /// Block table row of sequence `i` in group 0, padding included.
    pub fn block_table(&self, i: usize) -> &[u32] {
        &self.block_tables[i * self.max_blocks_per_seq..(i + 1) * self.max_blocks_per_seq]
    }
    /// Layer groups in the tables and slots (at least 1).
    pub fn kv_groups(&self) -> usize {
        self.num_kv_groups.max(1)
    }
    /// Block table row of sequence `i` in group `g`, padding included.
    pub fn group_block_table(&self, g: usize, i: usize) -> &[u32] {
        // Sequences by their query offsets: hand-built batches may leave `seqs` empty.
        let row = g * self.query_start_loc.len().saturating_sub(1) + i;
        &self.block_tables[row * self.max_blocks_per_seq..(row + 1) * self.max_blocks_per_seq]
    }
    /// Every token's slot in group `g`.
    pub fn group_slot_mapping(&self, g: usize) -> &[u32] {
        let n = self.num_tokens();
        &self.slot_mapping[g * n..(g + 1) * n]
    }
    /// Ids of the sequences that sample, in `logits_indices` order.
    pub fn sampling_request_ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.seqs.iter().filter(|s| s.samples).map(|s| s.request_id)
    }
}

/// What a backend hands back: one sampled token per sampling sequence, in batch order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutput {
    pub sampled: Vec<u32>,
}

/// What [`crate::Scheduler::update`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepUpdate {
    /// Each token appended this step, with its request.
    pub new_tokens: Vec<(RequestId, u32)>,
    pub finished: Vec<crate::FinishedRequest>,
}
