use super::*;

fn cfg() -> SchedulerConfig {
    SchedulerConfig { num_gpu_blocks: 1024, max_model_len: 4096, ..Default::default() }
}

/// Distinct token ids per request so the prefix cache never hits by accident.
fn prompt(id: u64, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (id as u32) * 100_000 + i + 1).collect()
}

fn add(s: &mut Scheduler, id: u64, len: usize, max_tokens: usize) {
    s.add_request(NewRequest::new(id, prompt(id, len), max_tokens)).unwrap();
}

/// One step with a synthetic token (7) for every sampling sequence.
fn step(s: &mut Scheduler) -> (ScheduledBatch, StepUpdate) {
    let b = s.schedule();
    let out = StepOutput { sampled: vec![7; b.logits_indices.len()] };
    let u = s.update(&out).unwrap();
    (b, u)
}

fn tokens_of(b: &ScheduledBatch) -> Vec<(u64, u32)> {
    b.seqs.iter().map(|s| (s.request_id, s.num_query_tokens)).collect()
}

#[test]
fn textbook_771_token_batch() {
    let mut s = Scheduler::new(cfg()).unwrap();
    for id in 0..3 {
        add(&mut s, id, 10, 100);
    }
    let (b0, _) = step(&mut s);
    assert_eq!(b0.num_tokens(), 30);
    add(&mut s, 3, 256, 100);
    add(&mut s, 4, 512, 100);
    let b = s.schedule();
    assert_eq!(b.num_tokens(), 771);
    assert_eq!((b.num_prefill_tokens, b.num_decode_tokens), (768, 3));
    assert_eq!(b.query_start_loc, vec![0, 1, 2, 3, 259, 771]);
    assert_eq!(b.context_lens, vec![10, 10, 10, 0, 0]);
    assert_eq!(b.seq_lens, vec![11, 11, 11, 256, 512]);
    assert_eq!(b.logits_indices, vec![0, 1, 2, 258, 770]);
    assert_eq!(b.slot_mapping.len(), 771);
    assert_eq!(b.positions[3..6], [0, 1, 2]);
    assert!(b.seqs[..3].iter().all(|q| !q.is_prefill && q.samples));
    assert!(b.seqs[3..].iter().all(|q| q.is_prefill && q.samples));
}

#[test]
fn long_prompt_is_chunked_over_four_steps() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_batched_tokens: 512, ..cfg() }).unwrap();
    add(&mut s, 1, 2000, 5);
    let mut chunks = Vec::new();
    for _ in 0..4 {
        let (b, u) = step(&mut s);
        chunks.push((b.seqs[0].context_len, b.seqs[0].num_query_tokens, b.seqs[0].samples, b.num_partial_prefills));
        // Slot mapping follows the block table across chunk boundaries.
        let bs = b.block_size as u32;
        for (k, &pos) in b.positions.iter().enumerate() {
            let blk = b.block_table(0)[(pos / bs) as usize];
            assert_eq!(b.slot_mapping[k], blk * bs + pos % bs);
        }
        assert_eq!(u.new_tokens.len(), usize::from(b.seqs[0].samples));
    }
    assert_eq!(chunks, vec![(0, 512, false, 1), (512, 512, false, 1), (1024, 512, false, 1), (1536, 464, true, 0)]);
    // Then it decodes one token per step.
    let (b, _) = step(&mut s);
    assert_eq!(tokens_of(&b), vec![(1, 1)]);
    assert!(!b.seqs[0].is_prefill);
}

/// Steps (0-based) at which each request was first scheduled, and the step each finished.
fn run(policy: PolicyKind) -> (Vec<u64>, Vec<u64>) {
    let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 4, policy, ..cfg() }).unwrap();
    for (id, max_tokens) in [8, 14, 16, 18, 4].into_iter().enumerate() {
        add(&mut s, id as u64, 8, max_tokens);
    }
    let (mut first, mut done) = (vec![u64::MAX; 5], vec![0; 5]);
    while s.has_unfinished() {
        let (b, u) = step(&mut s);
        for q in &b.seqs {
            first[q.request_id as usize] = first[q.request_id as usize].min(b.step);
        }
        for f in u.finished {
            done[f.id as usize] = b.step;
            assert_eq!(f.output_tokens.len(), [8, 14, 16, 18, 4][f.id as usize]);
        }
        assert!(b.step < 100);
    }
    (first, done)
}

#[test]
fn static_vs_continuous_admission() {
    // Four requests sample one token per step from step 0, so they finish after their 8th,
    // 14th, 16th and 18th step (steps 7, 13, 15, 17).
    let (first, done) = run(PolicyKind::Fcfs);
    assert_eq!(&done[..4], &[7, 13, 15, 17]);
    assert_eq!(first[4], 8, "continuous batching admits the fifth as soon as a slot frees");
    let (first, done) = run(PolicyKind::Static);
    assert_eq!(&done[..4], &[7, 13, 15, 17]);
    assert_eq!(first[4], 18, "static batching waits for the whole batch");
}

#[test]
fn preemption_by_recompute_and_resume() {
    // 8 usable blocks of 4 tokens = 32 slots; two requests of 12 tokens growing to 18.
    let c = SchedulerConfig { num_gpu_blocks: 9, block_size: 4, enable_prefix_caching: false, ..cfg() };
    let mut s = Scheduler::new(c).unwrap();
    add(&mut s, 1, 12, 6);
    add(&mut s, 2, 12, 6);
    let mut preempted = Vec::new();
    let mut finished = Vec::new();
    for _ in 0..40 {
        let (b, u) = step(&mut s);
        preempted.extend(b.preempted.iter().copied());
        if !b.preempted.is_empty() {
            // A step with a preemption admits nobody.
            assert!(b.seqs.iter().all(|q| q.request_id != 2 || !q.is_prefill));
        }
        finished.extend(u.finished);
        s.block_manager().audit().unwrap();
        if !s.has_unfinished() {
            break;
        }
    }
    assert_eq!(preempted, vec![2], "the most recently admitted request is the victim");
    assert_eq!(finished.len(), 2);
    for f in &finished {
        assert_eq!(f.output_tokens.len(), 6);
    }
    assert_eq!(finished.iter().find(|f| f.id == 2).unwrap().num_preemptions, 1);
    assert_eq!(s.kv_blocks_used(), 0);
}

#[test]
fn resumed_request_recomputes_prompt_and_outputs() {
    let c = SchedulerConfig { num_gpu_blocks: 9, block_size: 4, enable_prefix_caching: false, ..cfg() };
    let mut s = Scheduler::new(c).unwrap();
    add(&mut s, 1, 12, 6);
    add(&mut s, 2, 12, 6);
    let mut outputs_at_preempt = None;
    loop {
        let b = s.schedule();
        if let Some(n) = outputs_at_preempt {
            if let Some(q) = b.seqs.iter().find(|q| q.request_id == 2) {
                assert_eq!((q.context_len, q.num_query_tokens as usize, q.is_prefill), (0, 12 + n, true));
                break;
            }
        }
        if b.preempted.contains(&2) {
            outputs_at_preempt = Some(b.step as usize); // one output per step since step 0
        }
        s.update(&StepOutput { sampled: vec![7; b.logits_indices.len()] }).unwrap();
    }
}

#[test]
fn priority_policy_orders_waiting_and_preempts_worst() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 1, policy: PolicyKind::Priority, ..cfg() }).unwrap();
    for (id, prio) in [(1, 5), (2, -1), (3, 0)] {
        let mut r = NewRequest::new(id, prompt(id, 4), 2);
        r.priority = prio;
        s.add_request(r).unwrap();
    }
    let mut order = Vec::new();
    while s.has_unfinished() {
        let (_, u) = step(&mut s);
        order.extend(u.finished.iter().map(|f| f.id));
    }
    assert_eq!(order, vec![2, 3, 1]);
}

#[test]
fn prefix_cache_hit_skips_shared_blocks() {
    let mut s = Scheduler::new(SchedulerConfig { block_size: 16, ..cfg() }).unwrap();
    let shared: Vec<u32> = (1..=40).collect();
    let mut a = shared.clone();
    a.extend([900, 901]);
    let mut b = shared.clone();
    b.extend([800]);
    s.add_request(NewRequest::new(1, a, 3)).unwrap();
    step(&mut s);
    s.add_request(NewRequest::new(2, b, 3)).unwrap();
    let batch = s.schedule();
    let q = batch.seqs.iter().find(|q| q.request_id == 2).unwrap();
    // 41 tokens: two full blocks (32 tokens) come from the cache.
    assert_eq!((q.context_len, q.num_query_tokens), (32, 9));
    assert_eq!(batch.block_table(1)[..2], batch.block_table(0)[..2]);
    let st = s.prefix_cache_stats();
    assert_eq!((st.lookups, st.queried_tokens, st.hit_tokens), (2, 42 + 41, 32));
}

#[test]
fn long_prefill_threshold_caps_chunks_but_not_a_lone_request() {
    let c = SchedulerConfig { long_prefill_token_threshold: 100, ..cfg() };
    let mut s = Scheduler::new(c.clone()).unwrap();
    add(&mut s, 1, 300, 1);
    assert_eq!(tokens_of(&s.schedule()), vec![(1, 300)]);
    let mut s = Scheduler::new(c).unwrap();
    add(&mut s, 1, 300, 1);
    add(&mut s, 2, 50, 1);
    assert_eq!(tokens_of(&s.schedule()), vec![(1, 100), (2, 50)]);
}

#[test]
fn prefill_share_and_partial_prefill_caps() {
    let c = SchedulerConfig { max_prefill_tokens_per_step: 64, max_num_partial_prefills: 1, ..cfg() };
    let mut s = Scheduler::new(c).unwrap();
    add(&mut s, 1, 100, 3);
    add(&mut s, 2, 100, 3);
    let (b, _) = step(&mut s);
    assert_eq!(tokens_of(&b), vec![(1, 64)]);
    let (b, _) = step(&mut s);
    assert_eq!(tokens_of(&b), vec![(1, 36)]);
    let (b, _) = step(&mut s);
    assert_eq!(tokens_of(&b), vec![(1, 1), (2, 64)], "decodes are not limited by the prefill caps");
}

#[test]
fn no_chunking_stops_admission_at_the_first_misfit() {
    let c = SchedulerConfig { max_num_batched_tokens: 100, enable_chunked_prefill: false, ..cfg() };
    let mut s = Scheduler::new(c).unwrap();
    add(&mut s, 1, 60, 2);
    add(&mut s, 2, 60, 2);
    add(&mut s, 3, 10, 2);
    assert_eq!(tokens_of(&s.schedule()), vec![(1, 60)]);
    let err = s.add_request(NewRequest::new(9, prompt(9, 101), 1)).unwrap_err();
    assert_eq!(err, SchedError::Rejected { id: 9, reason: Rejection::PromptOverBudget { len: 101, budget: 100 } });
    assert_eq!(
        err.to_string(),
        "request 9: the prompt has 101 tokens, over the token budget 100, and chunked prefill is off"
    );
}

#[test]
fn adaptive_switches_budget_with_load() {
    let c = SchedulerConfig {
        policy: PolicyKind::Adaptive,
        adaptive: AdaptiveConfig { low_load_requests: 2, low_load_budget: 64 },
        max_num_batched_tokens: 1000,
        ..cfg()
    };
    let mut s = Scheduler::new(c.clone()).unwrap();
    add(&mut s, 1, 50, 2);
    add(&mut s, 2, 50, 2);
    // Low load: budget 64, no chunking: only the first fits.
    assert_eq!(tokens_of(&s.schedule()), vec![(1, 50)]);
    let mut s = Scheduler::new(c).unwrap();
    for id in 1..=3 {
        add(&mut s, id, 500, 2);
    }
    // High load: budget 1000 with chunking.
    assert_eq!(tokens_of(&s.schedule()), vec![(1, 500), (2, 500)]);
}

#[test]
fn stop_tokens_eos_and_max_model_len() {
    let mut s = Scheduler::new(SchedulerConfig { max_model_len: 10, ..cfg() }).unwrap();
    let mut r = NewRequest::new(1, prompt(1, 4), 100);
    r.eos_token_id = Some(7);
    s.add_request(r).unwrap();
    let (_, u) = step(&mut s);
    assert_eq!(u.finished[0].reason, FinishReason::Stop);
    let mut r = NewRequest::new(2, prompt(2, 4), 100);
    r.eos_token_id = Some(7);
    r.ignore_eos = true;
    s.add_request(r).unwrap();
    let mut n = 0;
    while s.has_unfinished() {
        let (_, u) = step(&mut s);
        n += u.new_tokens.len();
        if let Some(f) = u.finished.first() {
            assert_eq!(f.reason, FinishReason::Length);
        }
    }
    assert_eq!(n, 6, "4 prompt tokens + 6 outputs = max_model_len 10");
}

#[test]
fn abort_frees_at_once_and_late_output_is_ignored() {
    let mut s = Scheduler::new(cfg()).unwrap();
    add(&mut s, 1, 40, 10);
    add(&mut s, 2, 40, 10);
    let b = s.schedule();
    assert!(s.kv_blocks_used() > 0);
    let f = s.abort(1).unwrap();
    assert_eq!(f.reason, FinishReason::Abort);
    assert!(s.abort(1).is_none());
    let u = s.update(&StepOutput { sampled: vec![5; b.logits_indices.len()] }).unwrap();
    assert_eq!(u.new_tokens, vec![(2, 5)]);
    s.abort(2).unwrap();
    assert_eq!(s.kv_blocks_used(), 0);
    assert!(!s.has_unfinished());
}

#[test]
fn bad_requests_are_rejected_with_their_id() {
    let mut s =
        Scheduler::new(SchedulerConfig { max_model_len: 100, num_gpu_blocks: 5, block_size: 16, ..cfg() }).unwrap();
    let rej = |id, reason| Err(SchedError::Rejected { id, reason });
    assert_eq!(s.add_request(NewRequest::new(1, vec![], 5)), rej(1, Rejection::EmptyPrompt));
    assert_eq!(s.add_request(NewRequest::new(2, prompt(2, 5), 0)), rej(2, Rejection::ZeroMaxTokens));
    assert_eq!(
        s.add_request(NewRequest::new(3, prompt(3, 101), 1)),
        rej(3, Rejection::PromptTooLong { len: 101, max_model_len: 100 })
    );
    assert_eq!(
        s.add_request(NewRequest::new(4, prompt(4, 60), 20)),
        rej(4, Rejection::CacheTooSmall { tokens: 80, capacity: 64, watermark: 0 })
    );
    s.add_request(NewRequest::new(5, prompt(5, 10), 1)).unwrap();
    assert_eq!(s.add_request(NewRequest::new(5, prompt(5, 10), 1)), rej(5, Rejection::DuplicateId));
    assert_eq!(s.num_unfinished(), 1);
    let b = s.schedule();
    assert!(matches!(
        s.update(&StepOutput { sampled: vec![] }),
        Err(SchedError::OutputMismatch { expected: 1, got: 0 })
    ));
    assert_eq!(b.seqs.len(), 1);
    assert!(Scheduler::new(SchedulerConfig { max_num_seqs: 0, ..cfg() }).is_err());
}

/// A sliding-window model's groups: one full and five windowed (window 64), blocks of 16.
fn windowed_cfg() -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens: 128,
        enable_prefix_caching: false,
        kv_groups: KvGroups { full: 1, windowed: 5, window: 64 },
        ..cfg()
    }
}

#[test]
fn windowed_groups_keep_a_window_of_blocks_and_every_slot_the_kernels_need() {
    let mut s = Scheduler::new(windowed_cfg()).unwrap();
    add(&mut s, 1, 1000, 40);
    let bs = 16;
    let mut peak = 0;
    loop {
        let b = s.schedule();
        if b.is_empty() {
            break;
        }
        assert_eq!(b.kv_groups(), 6);
        assert_eq!(b.block_tables.len(), 6 * b.seqs.len() * b.max_blocks_per_seq);
        assert_eq!(b.slot_mapping.len(), 6 * b.num_tokens());
        let (ctx, q) = (b.context_lens[0] as usize, b.seqs[0].num_query_tokens as usize);
        for g in 0..6 {
            let table = b.group_block_table(g, 0);
            let slots = b.group_slot_mapping(g);
            // Each new token's slot is in the block the table names for its position.
            for (t, &sl) in slots.iter().enumerate() {
                assert_eq!(sl / bs, table[(ctx + t) / bs as usize], "group {g} token {t}");
                assert_ne!(sl / bs, 0, "a slot in the null block");
            }
            // Every key the step's queries can see is in a live block; a windowed group's
            // blocks wholly before the first query's window are released.
            let first_seen = if g == 0 { 0 } else { (ctx + 1).saturating_sub(64) };
            let needed = first_seen / bs as usize..(ctx + q).div_ceil(bs as usize);
            assert!(needed.clone().all(|i| table[i] != 0), "group {g}: a needed block is the null block");
            if g > 0 {
                assert!(table[..needed.start].iter().all(|&x| x == 0), "group {g}: an unseen block is held");
            }
        }
        peak = peak.max(s.kv_blocks_used());
        let out = StepOutput { sampled: vec![7; b.logits_indices.len()] };
        s.update(&out).unwrap();
    }
    // The full group holds all 1040 tokens (65 blocks); each windowed one at most
    // (63 + 128) / 16 rounded up, plus one: 13.
    assert!(peak <= 65 + 5 * 13, "peak {peak} blocks");
    assert!(peak < 6 * 65 / 2, "peak {peak}: the windowed groups should hold far less than everything");
    assert_eq!(s.kv_blocks_used(), 0, "finished: every block back");
}

#[test]
fn windowed_groups_admit_what_a_window_needs_and_refuse_what_cannot_fit() {
    // 1 + 5 groups, 200 usable blocks: a 2000-token request needs 125 blocks in the full
    // group and 13 in each windowed one (190): admitted, although all six groups' whole
    // tables (750) would not fit.
    let mut s = Scheduler::new(SchedulerConfig { num_gpu_blocks: 201, ..windowed_cfg() }).unwrap();
    add(&mut s, 1, 1990, 10);
    // 3000 tokens need 188 + 65 = 253 blocks at once: refused, with the reason.
    let err = s.add_request(NewRequest::new(2, prompt(2, 2990), 10)).unwrap_err();
    assert!(matches!(err, SchedError::Rejected { reason: Rejection::CacheTooSmall { .. }, .. }), "{err:?}");
    let mut finished = 0;
    for _ in 0..100 {
        let (_, u) = step(&mut s);
        finished += u.finished.len();
    }
    assert_eq!(finished, 1);
}

#[test]
fn windowed_groups_reuse_a_cached_prefix_with_every_block_the_next_query_sees() {
    let mut s = Scheduler::new(SchedulerConfig { enable_prefix_caching: true, ..windowed_cfg() }).unwrap();
    add(&mut s, 1, 1000, 4);
    while s.has_unfinished() {
        step(&mut s);
    }
    // The same prompt again: its cached blocks (the window groups' last ones released but
    // still cached) are reused, all but the block holding the last token.
    s.add_request(NewRequest::new(2, prompt(1, 1000), 4)).unwrap();
    let b = s.schedule();
    let ctx = b.context_lens[0] as usize;
    assert_eq!(ctx, 992, "62 of 63 blocks reused");
    for g in 0..6 {
        let table = b.group_block_table(g, 0);
        let first_seen = if g == 0 { 0 } else { (ctx + 1).saturating_sub(64) };
        assert!((first_seen / 16..1000usize.div_ceil(16)).all(|i| table[i] != 0), "group {g}: a needed block is null");
    }
    assert!(s.prefix_cache_stats().hit_tokens >= 992);
}
