//! The host build of the paged-attention kernel's logic (same tiles, KV-head grid, context
//! splits and online softmax as the device kernel) against a plain reference: K and V gathered
//! into contiguous per-sequence arrays, scores and softmax in f64.

use proptest::prelude::*;
use weave_kernels_gpu::attention::{paged_attention_host, reshape_and_cache_host, AttnShape, BatchMeta};
use weave_kernels_gpu::{Bf16, Elem, F16};

/// The obviously-correct version, written from the definition.
#[allow(clippy::too_many_arguments)]
fn reference(
    shape: &AttnShape,
    qsl: &[u32],
    ctx: &[u32],
    tables: &[u32],
    q: &[f64],
    kc: &[f64],
    vc: &[f64],
) -> Vec<f64> {
    let (nq, nkv, d, bs) =
        (shape.num_q_heads as usize, shape.num_kv_heads as usize, shape.head_dim as usize, shape.block_size as usize);
    let mbs = shape.max_blocks_per_seq as usize;
    let mut out = vec![0.0; q.len()];
    for s in 0..ctx.len() {
        let qlen = (qsl[s + 1] - qsl[s]) as usize;
        let len = ctx[s] as usize + qlen;
        // Gather this sequence's keys and values: [pos][kv_head][d].
        let mut k = vec![0.0; len * nkv * d];
        let mut v = vec![0.0; len * nkv * d];
        for pos in 0..len {
            let slot = tables[s * mbs + pos / bs] as usize * bs + pos % bs;
            k[pos * nkv * d..(pos + 1) * nkv * d].copy_from_slice(&kc[slot * nkv * d..(slot + 1) * nkv * d]);
            v[pos * nkv * d..(pos + 1) * nkv * d].copy_from_slice(&vc[slot * nkv * d..(slot + 1) * nkv * d]);
        }
        for i in 0..qlen {
            let token = qsl[s] as usize + i;
            let pos = ctx[s] as usize + i;
            for h in 0..nq {
                let kvh = h / (nq / nkv);
                let qv = &q[(token * nq + h) * d..][..d];
                let scores: Vec<f64> = (0..=pos)
                    .map(|p| {
                        qv.iter().zip(&k[(p * nkv + kvh) * d..][..d]).map(|(a, b)| a * b).sum::<f64>()
                            * shape.scale as f64
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for dd in 0..d {
                    out[(token * nq + h) * d + dd] =
                        (0..=pos).map(|p| w[p] * v[(p * nkv + kvh) * d + dd]).sum::<f64>() / z;
                }
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Case {
    /// (context tokens, query tokens) per sequence.
    seqs: Vec<(u32, u32)>,
    block_size: u32,
    head_dim: u32,
    num_kv_heads: u32,
    group: u32,
    blocks_per_split: u32,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    let seq = prop_oneof![
        (1u32..90, Just(1u32)), // decode
        (Just(0u32), 1u32..50), // first chunk (incl. one-token prompts)
        (1u32..70, 2u32..40),   // later chunk, starting anywhere in a block
    ];
    (
        prop::collection::vec(seq, 1..5),
        prop::sample::select(vec![1u32, 4, 5, 16, 32]),
        prop::sample::select(vec![64u32, 128]),
        1u32..3,
        prop::sample::select(vec![1u32, 3, 8]),
        prop::sample::select(vec![0u32, 1, 2, 3]),
        any::<u64>(),
    )
        .prop_map(|(seqs, block_size, head_dim, num_kv_heads, group, blocks_per_split, seed)| Case {
            seqs,
            block_size,
            head_dim,
            num_kv_heads,
            group,
            blocks_per_split,
            seed,
        })
}

struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// Builds the batch, runs both, returns the largest absolute difference.
fn run<T: Elem>(c: &Case) -> f64 {
    let bs = c.block_size as usize;
    let nkv = c.num_kv_heads;
    let shape0 = AttnShape {
        num_q_heads: nkv * c.group,
        num_kv_heads: nkv,
        head_dim: c.head_dim,
        block_size: c.block_size,
        max_blocks_per_seq: 0,
        blocks_per_split: c.blocks_per_split,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
    };
    let (nq, d) = (shape0.num_q_heads as usize, c.head_dim as usize);
    let lens: Vec<usize> = c.seqs.iter().map(|&(ctx, q)| (ctx + q) as usize).collect();
    let mbs = lens.iter().map(|l| l.div_ceil(bs)).max().unwrap();
    let shape = AttnShape { max_blocks_per_seq: mbs as u32, ..shape0 };
    assert!(shape.check().is_ok());
    // Physical blocks shuffled across sequences; block 0 stays unused (the null block).
    let total_blocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 1;
    let mut rng = Rng(c.seed | 1);
    let mut phys: Vec<u32> = (1..total_blocks as u32).collect();
    for i in (1..phys.len()).rev() {
        let j = ((rng.uniform() + 1.0) * 0.5 * (i + 1) as f64) as usize % (i + 1);
        phys.swap(i, j);
    }
    let mut tables = vec![0u32; c.seqs.len() * mbs];
    let mut next = 0;
    for (s, l) in lens.iter().enumerate() {
        for b in 0..l.div_ceil(bs) {
            tables[s * mbs + b] = phys[next];
            next += 1;
        }
    }
    let row = nkv as usize * d;
    let cache_len = total_blocks * bs * row;
    let mut kc = vec![T::from_f32(f32::NAN); cache_len]; // never-written slots must never be read
    let mut vc = kc.clone();
    let mut rnd = |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.uniform() as f32)).collect() };
    let mut qsl = vec![0u32];
    let mut slots = Vec::new();
    let (mut k_new, mut v_new) = (Vec::new(), Vec::new());
    for (s, &(ctx, ql)) in c.seqs.iter().enumerate() {
        let slot = |pos: usize| tables[s * mbs + pos / bs] * c.block_size + (pos % bs) as u32;
        // Earlier steps' K/V already in the cache.
        for pos in 0..ctx as usize {
            let o = slot(pos) as usize * row;
            kc[o..o + row].copy_from_slice(&rnd(row));
            vc[o..o + row].copy_from_slice(&rnd(row));
        }
        // This step's tokens go through the KV-write kernel's logic.
        for pos in ctx as usize..(ctx + ql) as usize {
            slots.push(slot(pos));
            k_new.extend(rnd(row));
            v_new.extend(rnd(row));
        }
        qsl.push(qsl.last().unwrap() + ql);
    }
    slots.push(u32::MAX); // a padding token: skipped
    k_new.extend(rnd(row));
    v_new.extend(rnd(row));
    reshape_and_cache_host(&shape, &k_new, &v_new, &slots, &mut kc, &mut vc);
    let num_tokens = *qsl.last().unwrap() as usize;
    let q = rnd(num_tokens * nq * d);
    let ctx: Vec<u32> = c.seqs.iter().map(|s| s.0).collect();
    let max_seq_len = *lens.iter().max().unwrap() as u32;
    let mut out = vec![T::default(); q.len()];
    let mut partials = vec![0f32; shape.num_splits(max_seq_len) as usize * num_tokens * nq * shape.partial_stride()];
    let meta = BatchMeta { query_start_loc: &qsl, context_lens: &ctx, block_tables: &tables };
    paged_attention_host(&shape, meta, max_seq_len, &q, &kc, &vc, &mut out, &mut partials);
    let f = |x: &[T]| x.iter().map(|v| v.to_f32() as f64).collect::<Vec<_>>();
    let want = reference(&shape, &qsl, &ctx, &tables, &f(&q), &f(&kc), &f(&vc));
    out.iter().zip(&want).map(|(a, b)| (a.to_f32() as f64 - b).abs()).fold(0.0, f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn f32_matches_reference(c in case()) {
        let err = run::<f32>(&c);
        prop_assert!(err < 2e-5, "max abs error {err}");
    }
    #[test]
    fn f16_matches_reference(c in case()) {
        // Output rounding to f16 (|v| <= 1): half an ulp is 2^-11.
        let err = run::<F16>(&c);
        prop_assert!(err < 1.5e-3, "max abs error {err}");
    }
    #[test]
    fn bf16_matches_reference(c in case()) {
        let err = run::<Bf16>(&c);
        prop_assert!(err < 8e-3, "max abs error {err}");
    }
}

#[test]
fn edge_cases_by_name() {
    let base =
        Case { seqs: vec![], block_size: 16, head_dim: 64, num_kv_heads: 1, group: 1, blocks_per_split: 0, seed: 7 };
    let cases = [
        ("context 0, one-token prompt", vec![(0, 1)]),
        ("decode at a block boundary", vec![(16, 1), (15, 1), (17, 1)]),
        ("chunk starting mid-block", vec![(23, 19)]),
        ("mixed prefill + decodes", vec![(0, 40), (70, 1), (5, 1), (33, 12)]),
    ];
    for (name, seqs) in cases {
        for (hd, group, split) in [(64, 1, 0), (128, 8, 1), (64, 3, 2)] {
            let c = Case { seqs: seqs.clone(), head_dim: hd, group, blocks_per_split: split, ..base.clone() };
            let err = run::<f32>(&c);
            assert!(err < 2e-5, "{name} (d {hd}, group {group}, split {split}): {err}");
        }
    }
}
