//! Property tests: random arrivals and configs, every invariant checked at every step.

use proptest::prelude::*;
use weave_scheduler::*;

#[derive(Debug, Clone)]
struct Req {
    arrival: u64,
    prompt_len: usize,
    max_tokens: usize,
    /// Requests with the same group share their first `prefix` tokens.
    group: Option<(u32, usize)>,
}

fn req() -> impl Strategy<Value = Req> {
    (0u64..30, 1usize..300, 1usize..40, prop::option::of((0u32..3, 1usize..200)))
        .prop_map(|(arrival, prompt_len, max_tokens, group)| Req { arrival, prompt_len, max_tokens, group })
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    (
        (16usize..600, 1usize..10, prop::sample::select(vec![1usize, 4, 16]), 8usize..200),
        (any::<bool>(), prop::sample::select(vec![0usize, 32, 100]), any::<bool>()),
        (prop::sample::select(vec![0usize, 1, 2]), prop::sample::select(vec![0usize, 48])),
        (
            prop::sample::select(vec![
                PolicyKind::Fcfs,
                PolicyKind::Priority,
                PolicyKind::Static,
                PolicyKind::Adaptive,
            ]),
            // No windows, or a sliding-window model's groups.
            prop::sample::select(vec![None, Some((1usize, 2usize, 8usize)), Some((2, 3, 40))]),
        ),
    )
        .prop_map(|((budget, seqs, bs, blocks_k), (chunked, thr, caching), (partial, pcap), (policy, windows))| {
            let kv_groups =
                windows.map_or(KvGroups::default(), |(full, windowed, window)| KvGroups { full, windowed, window });
            SchedulerConfig {
                max_num_batched_tokens: budget,
                max_num_seqs: seqs,
                max_model_len: 320,
                block_size: bs,
                // From barely enough for one request to plenty: preemption gets exercised.
                enable_chunked_prefill: chunked,
                long_prefill_token_threshold: thr,
                max_num_partial_prefills: partial,
                max_prefill_tokens_per_step: pcap,
                enable_prefix_caching: caching,
                watermark_blocks: 0,
                policy,
                adaptive: AdaptiveConfig { low_load_requests: 2, low_load_budget: 64 },
                // The pool grows with the groups, so each keeps about the same room.
                num_gpu_blocks: 2 + (340usize.div_ceil(bs)) * blocks_k / 50 * kv_groups.len(),
                kv_groups,
            }
        })
}

fn tokens(id: u64, r: &Req) -> Vec<u32> {
    (0..r.prompt_len)
        .map(|i| match r.group {
            Some((g, p)) if i < p => 1_000_000 * (g + 1) + i as u32,
            _ => (id as u32 + 1) * 10_000 + i as u32,
        })
        .collect()
}

/// `known(id)`: the request's prompt + outputs so far.
fn check_batch(b: &ScheduledBatch, cfg: &SchedulerConfig, known: impl Fn(u64) -> usize) -> Result<(), TestCaseError> {
    prop_assert!(b.num_tokens() <= cfg.max_num_batched_tokens, "budget exceeded: {}", b.num_tokens());
    prop_assert!(b.seqs.len() <= cfg.max_num_seqs);
    prop_assert_eq!(b.query_start_loc.len(), b.seqs.len() + 1);
    prop_assert_eq!(b.num_prefill_tokens + b.num_decode_tokens, b.num_tokens());
    let groups = cfg.kv_groups.len();
    prop_assert_eq!(b.kv_groups(), groups);
    prop_assert_eq!(b.slot_mapping.len(), b.num_tokens() * groups);
    prop_assert_eq!(b.block_tables.len(), b.seqs.len() * b.max_blocks_per_seq * groups);
    let bs = b.block_size as u32;
    let mut ids = std::collections::HashSet::new();
    for (i, q) in b.seqs.iter().enumerate() {
        prop_assert!(ids.insert(q.request_id), "sequence scheduled twice");
        let (lo, hi) = (b.query_start_loc[i] as usize, b.query_start_loc[i + 1] as usize);
        prop_assert_eq!(hi - lo, q.num_query_tokens as usize);
        prop_assert!(q.num_query_tokens > 0);
        prop_assert_eq!(b.seq_lens[i], b.context_lens[i] + q.num_query_tokens);
        prop_assert!(b.seq_lens[i] as usize <= cfg.max_model_len);
        for g in 0..groups {
            let table = b.group_block_table(g, i);
            for k in lo..hi {
                let pos = b.positions[k];
                prop_assert_eq!(pos, b.context_lens[i] + (k - lo) as u32);
                let blk = table[(pos / bs) as usize];
                prop_assert!(blk != 0, "token mapped to the null block in group {}", g);
                prop_assert_eq!(b.group_slot_mapping(g)[k], blk * bs + pos % bs);
            }
            // Every key the sequence's first query sees (all of them, or its window's) is in a
            // live block.
            let first = if cfg.kv_groups.is_windowed(g) {
                (b.context_lens[i] + 1).saturating_sub(cfg.kv_groups.window as u32)
            } else {
                0
            };
            for j in first / bs..b.seq_lens[i].div_ceil(bs) {
                prop_assert!(table[j as usize] != 0, "group {} block {} is needed but null", g, j);
            }
        }
        let chunking_off =
            !cfg.enable_chunked_prefill && cfg.policy != PolicyKind::Adaptive && cfg.long_prefill_token_threshold == 0;
        if chunking_off && q.is_prefill && known(q.request_id) <= cfg.max_num_batched_tokens {
            prop_assert!(q.samples, "a prompt was chunked with chunked prefill off");
        }
    }
    let mut slots = b.slot_mapping.clone();
    slots.sort_unstable();
    slots.dedup();
    prop_assert_eq!(slots.len(), b.num_tokens() * groups, "two tokens written to one slot");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn every_request_finishes_within_limits(cfg in config(), reqs in prop::collection::vec(req(), 1..25)) {
        let mut s = Scheduler::new(cfg.clone()).unwrap();
        let mut accepted = std::collections::HashMap::new();
        let mut first_scheduled: Vec<(u64, u64)> = Vec::new(); // (step, id)
        let mut seen = std::collections::HashSet::new();
        let mut finished = Vec::new();
        let mut outputs: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by_key(|&i| reqs[i].arrival);
        let mut next = 0;
        let mut step = 0u64;
        while next < order.len() || s.has_unfinished() {
            while next < order.len() && reqs[order[next]].arrival <= step {
                let i = order[next];
                let r = &reqs[i];
                let nr = NewRequest { priority: (i % 3) as i32, ..NewRequest::new(i as u64, tokens(i as u64, r), r.max_tokens) };
                match s.add_request(nr) {
                    Ok(()) => { accepted.insert(i as u64, r.clone()); }
                    Err(SchedError::Rejected {
                        reason: Rejection::CacheTooSmall { .. } | Rejection::PromptOverBudget { .. } | Rejection::PromptTooLong { .. },
                        ..
                    }) => {}
                    Err(e) => prop_assert!(false, "unexpected rejection: {e}"),
                }
                next += 1;
            }
            let b = s.schedule();
            check_batch(&b, &cfg, |id| accepted[&id].prompt_len + outputs.get(&id).copied().unwrap_or(0))?;
            prop_assert!(s.num_running() <= cfg.max_num_seqs);
            for q in &b.seqs {
                if seen.insert(q.request_id) { first_scheduled.push((step, q.request_id)); }
            }
            let u = s.update(&StepOutput { sampled: vec![3; b.logits_indices.len()] }).unwrap();
            for (id, _) in &u.new_tokens { *outputs.entry(*id).or_insert(0) += 1; }
            finished.extend(u.finished);
            if let Err(e) = s.block_manager().audit() { prop_assert!(false, "{}", e); }
            step += 1;
            prop_assert!(step < 20_000, "did not finish: {} unfinished", s.num_unfinished());
        }
        prop_assert_eq!(finished.len(), accepted.len());
        for f in &finished {
            let r = &accepted[&f.id];
            prop_assert_eq!(f.reason, FinishReason::Length);
            let want = r.max_tokens.min(cfg.max_model_len - r.prompt_len).max(1);
            prop_assert_eq!(f.output_tokens.len(), want, "request {} (preempted {}x)", f.id, f.num_preemptions);
        }
        prop_assert_eq!(s.kv_blocks_used(), 0);
        prop_assert_eq!(s.block_manager().num_free_blocks(), cfg.num_gpu_blocks - 1);
        if cfg.policy != PolicyKind::Priority {
            // FCFS admission: requests are first scheduled in the order they were queued.
            let queued: Vec<u64> = order.iter().map(|&i| i as u64).filter(|i| accepted.contains_key(i)).collect();
            let firsts: Vec<u64> = first_scheduled.iter().map(|x| x.1).collect();
            prop_assert_eq!(firsts, queued);
        }
    }
}
