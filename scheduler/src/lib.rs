//! One continuous-batching step at a time: which requests run, with how many tokens.
//!
//! **Owns**: requests' lifecycle (waiting, running, preempted, finished), the waiting queue
//! (FCFS or priority), the batching policy, the per-step token budget, chunked prefill,
//! preemption by recompute; and the packed [`ScheduledBatch`] that backends execute.
//!
//! **Must not**: touch tensors, clocks, threads or files. Same config and same calls give the
//! same steps, which is what makes replay, the simulator and real runs comparable.
//!
//! Main types: [`Scheduler`] ([`Scheduler::schedule`] then [`Scheduler::update`] each step),
//! [`SchedulerConfig`], [`NewRequest`], [`ScheduledBatch`], [`StepOutput`], [`BatchPolicy`].
//!
//! # Rules (vLLM V1's, `vllm/v1/core/sched/scheduler.py`)
//! - Running requests first, in admission order; then waiting requests in queue order. No
//!   prefill/decode phases: a request gets tokens until its computed tokens catch up with its
//!   known tokens (prompt + outputs). A chunk that completes them samples a token.
//! - A request's share is what it still needs, capped by `long_prefill_token_threshold` (not
//!   while it is the only request in the system), by the budget left, and for running
//!   requests by `max_model_len - 1 - computed`.
//! - Admission stops at the first of: budget spent, `max_num_seqs` running, the head waiting
//!   request's whole sequence not fitting the free pool (only this step's chunk is
//!   allocated), any preemption this step.
//! - A running request that cannot get a block preempts the most recently admitted running
//!   request (priority policy: the worst (priority, arrival)) until it fits or is itself the
//!   victim. Preempted requests lose their blocks and computed tokens and go back to the
//!   front of the waiting queue; on resume they recompute prompt + outputs in one prefill
//!   (which may hit their own blocks if those are still cached).
//!
//! # Where weave deliberately differs from vLLM
//! - Requests that could never finish are rejected at [`Scheduler::add_request`] instead of
//!   at engine start: prompt over `max_model_len`; `min(prompt + max_tokens, max_model_len)`
//!   tokens not fitting the KV pool (vLLM checks `max_model_len` against the pool once).
//! - Without chunked prefill, a resumed request whose prompt + outputs exceed the whole
//!   budget is chunked anyway (vLLM would never schedule it again).
//! - Extra knobs, off by default: `max_num_partial_prefills` (prefill sequences per step),
//!   `max_prefill_tokens_per_step` (the prefill share), `watermark_blocks`; and the static and
//!   adaptive policies. Under the adaptive policy's low-load budget, the first prompt of a
//!   step may exceed that budget (never `max_num_batched_tokens`, decodes included) since it
//!   is not chunked: otherwise a prompt longer than the budget would wait for every decode.
//! - Prefix-cache statistics count a request once, when admitted.

mod batch;
mod config;
pub mod policy;
mod queue;
mod request;

pub use batch::{ScheduledBatch, SeqMeta, StepOutput, StepUpdate};
pub use config::{AdaptiveConfig, PolicyKind, SchedulerConfig};
pub use policy::{BatchPolicy, Load, StepLimits};
pub use request::{FinishReason, FinishedRequest, NewRequest, RequestId};
pub use weave_block_manager::{BlockError, BlockManager, KvGroups, PrefixCacheStats};

use queue::{Slot, WaitingQueue};
use request::{Request, Status};
use std::collections::HashMap;
use weave_block_manager::BlockManagerConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    #[error("request {id}: {reason}")]
    Rejected { id: RequestId, reason: Rejection },
    #[error("step output has {got} sampled tokens but {expected} sequences sampled")]
    OutputMismatch { expected: usize, got: usize },
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// Why [`Scheduler::add_request`] refused a request (it could never finish, or is malformed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("an unfinished request already has this id")]
    DuplicateId,
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens is 0; at least one output token must be asked for")]
    ZeroMaxTokens,
    #[error("the prompt has {len} tokens, over max_model_len {max_model_len}")]
    PromptTooLong { len: usize, max_model_len: usize },
    #[error("the prompt has {len} tokens, over the token budget {budget}, and chunked prefill is off")]
    PromptOverBudget { len: usize, budget: usize },
    #[error("it may grow to {tokens} tokens but the KV cache holds {capacity} (less a watermark of {watermark} blocks); raise the cache size or lower max_tokens")]
    CacheTooSmall { tokens: usize, capacity: usize, watermark: usize },
}

/// The scheduler: see the crate docs.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    policy: Box<dyn BatchPolicy>,
    kv: BlockManager,
    slab: Vec<Option<Request>>,
    free_slots: Vec<Slot>,
    ids: HashMap<RequestId, Slot>,
    waiting: WaitingQueue,
    running: Vec<Slot>,
    step: u64,
    next_arrival: u64,
    /// (slot, arrival_seq) of each sequence that sampled in the last batch.
    last_sampling: Vec<(Slot, u64)>,
    /// Scratch for the step being planned, kept to avoid an allocation per step.
    planned: Vec<Planned>,
}

/// One request's place in the step being built.
#[derive(Debug, Clone, Copy)]
struct Planned {
    slot: Slot,
    num_new: usize,
    is_prefill: bool,
}

/// What is left of this step's limits while it is being built.
#[derive(Debug, Clone, Copy)]
struct Budget {
    tokens: usize,
    prefill_tokens: usize,
    prefill_seqs: usize,
}

impl Budget {
    fn take(&mut self, p: &Planned) {
        self.tokens = self.tokens.saturating_sub(p.num_new);
        if p.is_prefill {
            self.prefill_tokens = self.prefill_tokens.saturating_sub(p.num_new);
            self.prefill_seqs -= 1;
        }
    }
    fn give_back(&mut self, p: &Planned) {
        self.tokens += p.num_new;
        if p.is_prefill {
            self.prefill_tokens += p.num_new;
            self.prefill_seqs += 1;
        }
    }
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self, SchedError> {
        cfg.validate()?;
        let kv = BlockManager::new(BlockManagerConfig {
            num_blocks: cfg.num_gpu_blocks,
            block_size: cfg.block_size,
            enable_prefix_caching: cfg.enable_prefix_caching,
            watermark_blocks: cfg.watermark_blocks,
            kv_groups: cfg.kv_groups,
        })?;
        let waiting = match cfg.policy {
            PolicyKind::Priority => WaitingQueue::Priority(Default::default()),
            _ => WaitingQueue::Fcfs(Default::default()),
        };
        Ok(Scheduler {
            policy: policy::for_kind(cfg.policy),
            cfg,
            kv,
            slab: Vec::new(),
            free_slots: Vec::new(),
            ids: HashMap::new(),
            waiting,
            running: Vec::new(),
            step: 0,
            next_arrival: 0,
            last_sampling: Vec::new(),
            planned: Vec::new(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_unfinished(&self) -> usize {
        self.ids.len()
    }
    pub fn has_unfinished(&self) -> bool {
        !self.ids.is_empty()
    }
    pub fn kv_blocks_used(&self) -> usize {
        self.kv.num_used_blocks()
    }
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.kv.prefix_cache_stats()
    }
    pub fn block_manager(&self) -> &BlockManager {
        &self.kv
    }
    /// Steps scheduled so far; the next batch gets this number.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Queues a request, or says why it can never run. A rejected request changes nothing.
    pub fn add_request(&mut self, r: NewRequest) -> Result<(), SchedError> {
        let (id, len) = (r.id, r.prompt.len());
        let reject = |reason| Err(SchedError::Rejected { id, reason });
        if self.ids.contains_key(&id) {
            return reject(Rejection::DuplicateId);
        }
        if len == 0 {
            return reject(Rejection::EmptyPrompt);
        }
        if r.max_tokens == 0 {
            return reject(Rejection::ZeroMaxTokens);
        }
        if len > self.cfg.max_model_len {
            return reject(Rejection::PromptTooLong { len, max_model_len: self.cfg.max_model_len });
        }
        let never_chunks = !self.cfg.enable_chunked_prefill && self.cfg.policy != PolicyKind::Adaptive;
        if never_chunks && len > self.cfg.max_num_batched_tokens {
            return reject(Rejection::PromptOverBudget { len, budget: self.cfg.max_num_batched_tokens });
        }
        let max_len = (len + r.max_tokens).min(self.cfg.max_model_len);
        if self.kv.blocks_to_hold(max_len, self.cfg.max_num_batched_tokens) + self.cfg.watermark_blocks
            > self.kv.num_usable_blocks()
        {
            return reject(Rejection::CacheTooSmall {
                tokens: max_len,
                capacity: self.cfg.kv_capacity_tokens(),
                watermark: self.cfg.watermark_blocks,
            });
        }
        let req = Request::from_new(r, self.next_arrival, self.cfg.block_size);
        self.next_arrival += 1;
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.slab.push(None);
                (self.slab.len() - 1) as Slot
            }
        };
        self.waiting.push_back(slot, req.priority, req.arrival_seq);
        self.slab[slot as usize] = Some(req);
        self.ids.insert(id, slot);
        Ok(())
    }

    fn req(&self, slot: Slot) -> &Request {
        self.slab[slot as usize].as_ref().expect("live slot")
    }
    fn req_mut(&mut self, slot: Slot) -> &mut Request {
        self.slab[slot as usize].as_mut().expect("live slot")
    }

    /// Builds the next step. An empty batch means nothing can run now (no requests).
    pub fn schedule(&mut self) -> ScheduledBatch {
        let mut b = ScheduledBatch::default();
        self.schedule_into(&mut b);
        b
    }

    /// [`Self::schedule`] into `out`, reusing its buffers (the engine loop's hot path).
    pub fn schedule_into(&mut self, out: &mut ScheduledBatch) {
        let load = Load {
            num_running: self.running.len(),
            num_waiting: self.waiting.len(),
            running_has_outputs: self.running.iter().any(|&s| self.req(s).num_output_tokens() > 0),
        };
        let limits = self.policy.limits(load, &self.cfg);
        let uncapped = |cap: usize| if cap == 0 { usize::MAX } else { cap };
        let mut budget = Budget {
            tokens: limits.token_budget,
            prefill_tokens: uncapped(self.cfg.max_prefill_tokens_per_step),
            prefill_seqs: uncapped(self.cfg.max_num_partial_prefills),
        };
        // The long-prefill cap is moot when there is nobody else to make room for.
        let threshold =
            if load.num_running + load.num_waiting <= 1 { 0 } else { self.cfg.long_prefill_token_threshold };
        let mut planned = std::mem::take(&mut self.planned);
        planned.clear();
        let mut preempted: Vec<RequestId> = Vec::new();

        // 1. Running requests, in admission order.
        let mut i = 0;
        while i < self.running.len() && budget.tokens > 0 {
            let slot = self.running[i];
            // Window layers' blocks that no query from here on can see go back first.
            let computed = self.req(slot).num_computed_tokens;
            self.kv.release_outside_window(slot, computed);
            let r = self.req(slot);
            let is_prefill = !r.is_decoding();
            let mut n = r.num_tokens() - r.num_computed_tokens;
            if threshold > 0 {
                n = n.min(threshold);
            }
            n = n.min(budget.tokens);
            n = n.min((self.cfg.max_model_len - 1).saturating_sub(r.num_computed_tokens));
            if is_prefill {
                n = if budget.prefill_seqs == 0 { 0 } else { n.min(budget.prefill_tokens) };
            }
            if n == 0 {
                i += 1;
                continue;
            }
            let before = r.num_computed_tokens;
            let total = before + n;
            let mut fits = false;
            loop {
                let need = self.kv.num_blocks_to_allocate(slot, total, &[]);
                if need == 0 {
                    // The common decode case: the last block still has room.
                    fits = true;
                    break;
                }
                if need <= self.kv.num_free_blocks() {
                    self.kv.allocate(slot, &[], total).expect("fit checked");
                    fits = true;
                    break;
                }
                let vi = self.pick_victim();
                let victim = self.running.remove(vi);
                if vi < i {
                    i -= 1;
                }
                if let Some(k) = planned.iter().position(|p| p.slot == victim) {
                    budget.give_back(&planned.remove(k));
                }
                preempted.push(self.preempt(victim));
                if victim == slot {
                    break;
                }
            }
            if !fits {
                break;
            }
            if total / self.cfg.block_size > before / self.cfg.block_size {
                self.cache_blocks(slot, total);
            }
            let p = Planned { slot, num_new: n, is_prefill };
            budget.take(&p);
            planned.push(p);
            i += 1;
        }

        // 2. Waiting requests, never skipping the head.
        if preempted.is_empty() && self.policy.may_admit(load) {
            while budget.tokens > 0 && self.running.len() < self.cfg.max_num_seqs && budget.prefill_seqs > 0 {
                let Some(slot) = self.waiting.peek() else {
                    break;
                };
                let r = self.req(slot);
                let prefix = self.kv.lookup_prefix(&r.block_hashes, r.num_tokens());
                let hit_blocks = self.kv.prefix_blocks(&prefix);
                let computed = hit_blocks * self.cfg.block_size;
                let mut n = r.num_tokens() - computed;
                if threshold > 0 {
                    n = n.min(threshold);
                }
                if !limits.chunked_prefill {
                    // Whole prompts only: a misfit stops admission. The first prompt of a step
                    // may exceed the prefill share, and (adaptive) the low-load budget, or it
                    // could never run.
                    let first_prefill = !planned.iter().any(|p| p.is_prefill);
                    let used = limits.token_budget - budget.tokens;
                    let stretch = limits.token_budget < self.cfg.max_num_batched_tokens
                        && first_prefill
                        && used + n <= self.cfg.max_num_batched_tokens;
                    let fits_budget = n <= budget.tokens || stretch;
                    let fits_share = n <= budget.prefill_tokens || first_prefill;
                    if n > self.cfg.max_num_batched_tokens {
                        // A resumed request longer than any budget: chunk it after all.
                        n = budget.tokens.min(budget.prefill_tokens);
                    } else if !(fits_budget && fits_share) {
                        break;
                    }
                } else {
                    n = n.min(budget.tokens).min(budget.prefill_tokens);
                }
                if n == 0 {
                    break;
                }
                // Reserve for the whole known sequence, allocate only this chunk. A window
                // group's share is bounded by the budget, the one bound every chunk keeps: a
                // whole prompt may pass the prefill cap, and the long-prefill threshold is
                // lifted for a request alone (with the prefill cap, the property tests fail).
                let whole = self.kv.num_blocks_to_admit(slot, r.num_tokens(), &prefix, self.cfg.max_num_batched_tokens);
                if !self.kv.can_allocate(whole) {
                    break;
                }
                let total = computed + n;
                let num_tokens = r.num_tokens();
                self.kv.allocate(slot, &prefix, total).expect("whole sequence fits, so the chunk does");
                self.kv.record_prefix_lookup(num_tokens, hit_blocks);
                self.waiting.pop();
                self.running.push(slot);
                let r = self.req_mut(slot);
                r.status = Status::Running;
                r.num_computed_tokens = computed;
                r.num_cached_tokens.get_or_insert(computed);
                self.cache_blocks(slot, total);
                let p = Planned { slot, num_new: n, is_prefill: true };
                budget.take(&p);
                planned.push(p);
            }
        }

        self.build_batch(&planned, preempted, out);
        self.planned = planned;
        self.step += 1;
    }

    /// Registers the full blocks among `slot`'s first `total` tokens in the prefix cache as
    /// soon as they are allocated (as vLLM does): a request admitted later in the same step
    /// may reuse them, since every token's K/V is written before attention reads the cache.
    fn cache_blocks(&mut self, slot: Slot, total: usize) {
        let r = self.slab[slot as usize].as_ref().expect("live slot");
        self.kv.cache_full_blocks(slot, &r.block_hashes, total.min(r.num_tokens()));
    }

    /// Index in `running` of the request to preempt.
    fn pick_victim(&self) -> usize {
        match self.cfg.policy {
            PolicyKind::Priority => {
                let key = |&(_, &s): &(usize, &Slot)| {
                    let r = self.req(s);
                    (r.priority, r.arrival_seq)
                };
                self.running.iter().enumerate().max_by_key(key).map(|(i, _)| i).expect("running is not empty")
            }
            _ => self.running.len() - 1,
        }
    }

    fn preempt(&mut self, slot: Slot) -> RequestId {
        self.kv.free(slot).expect("running request has a table");
        let r = self.req_mut(slot);
        r.status = Status::Preempted;
        r.num_computed_tokens = 0;
        r.num_preemptions += 1;
        let (id, prio, arr) = (r.id, r.priority, r.arrival_seq);
        self.waiting.push_front(slot, prio, arr);
        id
    }

    fn build_batch(&mut self, planned: &[Planned], preempted: Vec<RequestId>, b: &mut ScheduledBatch) {
        b.clear();
        b.step = self.step;
        b.block_size = self.cfg.block_size;
        b.preempted = preempted;
        b.query_start_loc.push(0);
        b.max_blocks_per_seq = planned.iter().map(|p| self.kv.block_table(p.slot).len()).max().unwrap_or(0);
        let groups = self.cfg.kv_groups.len();
        b.num_kv_groups = groups;
        self.last_sampling.clear();
        for p in planned {
            let r = self.slab[p.slot as usize].as_mut().expect("planned slot is live");
            let before = r.num_computed_tokens;
            let after = before + p.num_new;
            r.num_computed_tokens = after;
            let samples = after == r.num_tokens();
            b.input_ids.extend_from_slice(&r.tokens[before..after]);
            b.positions.extend(before as u32..after as u32);
            self.kv
                .extend_slot_mapping(p.slot, 0, before, p.num_new, &mut b.slot_mapping)
                .expect("slots were allocated");
            let table = self.kv.block_table(p.slot);
            b.block_tables.extend_from_slice(table);
            b.block_tables
                .resize(b.block_tables.len() + b.max_blocks_per_seq - table.len(), weave_block_manager::NULL_BLOCK);
            let end = b.input_ids.len() as u32;
            if samples {
                b.logits_indices.push(end - 1);
                self.last_sampling.push((p.slot, r.arrival_seq));
            }
            b.query_start_loc.push(end);
            b.context_lens.push(before as u32);
            b.seq_lens.push(after as u32);
            b.max_query_len = b.max_query_len.max(p.num_new as u32);
            b.max_seq_len = b.max_seq_len.max(after as u32);
            if p.is_prefill {
                b.num_prefill_tokens += p.num_new;
                b.num_prefill_seqs += 1;
                b.num_partial_prefills += usize::from(!samples);
            } else {
                b.num_decode_tokens += p.num_new;
            }
            b.seqs.push(SeqMeta {
                request_id: r.id,
                num_query_tokens: p.num_new as u32,
                context_len: before as u32,
                is_prefill: p.is_prefill,
                samples,
            });
        }
        // The other groups' tables and slots, group after group (see `ScheduledBatch`).
        for g in 1..groups {
            for (p, s) in planned.iter().zip(&b.seqs) {
                let table = self.kv.group_table(p.slot, g);
                b.block_tables.extend_from_slice(table);
                b.block_tables
                    .resize(b.block_tables.len() + b.max_blocks_per_seq - table.len(), weave_block_manager::NULL_BLOCK);
                self.kv
                    .extend_slot_mapping(p.slot, g, s.context_len as usize, p.num_new, &mut b.slot_mapping)
                    .expect("slots were allocated in every group");
            }
        }
    }

    /// Applies a step's sampled tokens (one per sampling sequence of the last batch, in
    /// order): appends them, finishes requests that hit a stop condition and frees their
    /// blocks at once.
    pub fn update(&mut self, out: &StepOutput) -> Result<StepUpdate, SchedError> {
        if out.sampled.len() != self.last_sampling.len() {
            return Err(SchedError::OutputMismatch { expected: self.last_sampling.len(), got: out.sampled.len() });
        }
        let mut upd = StepUpdate { new_tokens: Vec::with_capacity(out.sampled.len()), finished: Vec::new() };
        let sampling = std::mem::take(&mut self.last_sampling);
        let bs = self.cfg.block_size;
        let max_model_len = self.cfg.max_model_len;
        for (&(slot, arrival), &tok) in sampling.iter().zip(&out.sampled) {
            // The request may have been aborted since the batch was built.
            let Some(r) =
                self.slab[slot as usize].as_mut().filter(|r| r.arrival_seq == arrival && r.status == Status::Running)
            else {
                continue;
            };
            r.tokens.push(tok);
            weave_block_manager::extend_block_hashes(&mut r.block_hashes, &r.tokens, bs);
            upd.new_tokens.push((r.id, tok));
            let reason = if r.num_tokens() >= max_model_len || r.num_output_tokens() >= r.max_tokens {
                Some(FinishReason::Length)
            } else if (!r.ignore_eos && r.eos_token_id == Some(tok)) || r.stop_token_ids.contains(&tok) {
                Some(FinishReason::Stop)
            } else {
                None
            };
            if let Some(reason) = reason {
                upd.finished.push(self.remove(slot, reason));
            }
        }
        self.last_sampling = sampling;
        self.last_sampling.clear();
        Ok(upd)
    }

    /// Ends a request now (client gone, or a stop string seen by the caller), freeing its
    /// blocks. `None` if no unfinished request has this id.
    pub fn finish_request(&mut self, id: RequestId, reason: FinishReason) -> Option<FinishedRequest> {
        let slot = *self.ids.get(&id)?;
        Some(self.remove(slot, reason))
    }

    /// [`Self::finish_request`] with [`FinishReason::Abort`].
    pub fn abort(&mut self, id: RequestId) -> Option<FinishedRequest> {
        self.finish_request(id, FinishReason::Abort)
    }

    fn remove(&mut self, slot: Slot, reason: FinishReason) -> FinishedRequest {
        let r = self.slab[slot as usize].take().expect("live slot");
        match r.status {
            Status::Running => {
                let i = self.running.iter().position(|&s| s == slot).expect("running request is listed");
                self.running.remove(i);
            }
            Status::Waiting | Status::Preempted => {
                self.waiting.remove(slot, r.priority, r.arrival_seq);
            }
        }
        if self.kv.has_seq(slot) {
            self.kv.free(slot).expect("table exists");
        }
        self.ids.remove(&r.id);
        self.free_slots.push(slot);
        FinishedRequest {
            id: r.id,
            reason,
            num_prompt_tokens: r.num_prompt_tokens,
            output_tokens: r.tokens[r.num_prompt_tokens..].to_vec(),
            num_cached_tokens: r.num_cached_tokens.unwrap_or(0),
            num_preemptions: r.num_preemptions,
        }
    }
}

#[cfg(test)]
mod tests;
