//! The host build of the paged-attention kernel's logic (same tiles, KV-head grid, context
//! splits and online softmax as the device kernel) against a plain reference: K and V gathered
//! into contiguous per-sequence arrays, scores and softmax in f64.

mod common;

use common::Case;
use proptest::prelude::*;
use weave_kernels_gpu::attention::{paged_attention_host, AttnShape, BatchMeta};
use weave_kernels_gpu::{Bf16, Elem, F16};

/// The obviously-correct version, written from the definition. With `window`, a token at
/// position `pos` sees the keys at `pos - window + 1 ..= pos` (sliding-window layers).
#[allow(clippy::too_many_arguments)]
fn reference(
    shape: &AttnShape,
    qsl: &[u32],
    ctx: &[u32],
    tables: &[u32],
    q: &[f64],
    kc: &[f64],
    vc: &[f64],
    window: Option<usize>,
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
                let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let scores: Vec<f64> = (lo..=pos)
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
                        (lo..=pos).map(|p| w[p - lo] * v[(p * nkv + kvh) * d + dd]).sum::<f64>() / z;
                }
            }
        }
    }
    out
}

/// Builds the batch, runs both, returns the largest absolute difference.
fn run<T: Elem>(c: &Case) -> f64 {
    let b = common::build::<T>(c);
    let nq = b.shape.num_q_heads as usize;
    let num_tokens = *b.qsl.last().unwrap() as usize;
    let mut out = vec![T::default(); b.q.len()];
    let mut partials =
        vec![0f32; b.shape.num_splits(b.max_seq_len) as usize * num_tokens * nq * b.shape.partial_stride()];
    let meta = BatchMeta { query_start_loc: &b.qsl, context_lens: &b.ctx, block_tables: &b.tables };
    paged_attention_host(&b.shape, meta, b.max_seq_len, &b.q, &b.kc, &b.vc, &mut out, &mut partials);
    let f = |x: &[T]| x.iter().map(|v| v.to_f32() as f64).collect::<Vec<_>>();
    let want = reference(&b.shape, &b.qsl, &b.ctx, &b.tables, &f(&b.q), &f(&b.kc), &f(&b.vc), None);
    out.iter().zip(&want).map(|(a, b)| (a.to_f32() as f64 - b).abs()).fold(0.0, f64::max)
}

/// The CPU backend's attention (GQA groups and query tiles sharing each widened KV block) on
/// the same batch, with its cache in `T` and its SIMD path on or off: the largest absolute
/// difference from the reference.
fn run_cpu_backend<T: Elem + weave::backends::cpu::attention::CacheElem>(
    c: &Case,
    simd: bool,
    window: Option<usize>,
) -> f64 {
    let b = common::build::<T>(c);
    let num_tokens = *b.qsl.last().unwrap() as usize;
    let mut positions = Vec::with_capacity(num_tokens);
    for (s, w) in b.qsl.windows(2).enumerate() {
        positions.extend((0..w[1] - w[0]).map(|i| b.ctx[s] + i));
    }
    let batch = weave_scheduler::ScheduledBatch {
        input_ids: vec![0; num_tokens],
        positions,
        query_start_loc: b.qsl.clone(),
        block_tables: b.tables.clone(),
        max_blocks_per_seq: b.shape.max_blocks_per_seq as usize,
        block_size: b.shape.block_size as usize,
        ..Default::default()
    };
    let q: Vec<f32> = b.q.iter().map(|x| x.to_f32()).collect();
    let mut out = vec![f32::NAN; q.len()];
    weave::backends::cpu::attention::attend(&b.shape, &batch, 0, &q, &b.kc, &b.vc, &mut out, simd, window);
    let f = |x: &[T]| x.iter().map(|v| v.to_f32() as f64).collect::<Vec<_>>();
    let want = reference(&b.shape, &b.qsl, &b.ctx, &b.tables, &f(&b.q), &f(&b.kc), &f(&b.vc), window);
    out.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn cpu_backend_matches_reference(c in common::case(), window in prop::option::of(1usize..40)) {
        let simd = weave::backends::cpu::attention::has_simd();
        for on in [false, simd] {
            // f32 out of f16/f32 caches: no output rounding, so f32's bound holds for both.
            let (e32, e16) = (run_cpu_backend::<f32>(&c, on, window), run_cpu_backend::<F16>(&c, on, window));
            prop_assert!(e32 < 2e-5 && e16 < 2e-5, "simd {on}, window {window:?}: max abs error f32 {e32}, f16 {e16}");
        }
    }
    #[test]
    fn f32_matches_reference(c in common::case()) {
        let err = run::<f32>(&c);
        prop_assert!(err < 2e-5, "max abs error {err}");
    }
    #[test]
    fn f16_matches_reference(c in common::case()) {
        // Output rounding to f16 (|v| <= 1): half an ulp is 2^-11.
        let err = run::<F16>(&c);
        prop_assert!(err < 1.5e-3, "max abs error {err}");
    }
    #[test]
    fn bf16_matches_reference(c in common::case()) {
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
            for simd in [false, weave::backends::cpu::attention::has_simd()] {
                // Windows inside a block, on a block edge, of one key, and past the context.
                for window in [None, Some(1), Some(5), Some(16), Some(500)] {
                    let err = run_cpu_backend::<f32>(&c, simd, window);
                    assert!(
                        err < 2e-5,
                        "CPU backend, {name} (d {hd}, group {group}, simd {simd}, window {window:?}): {err}"
                    );
                }
            }
        }
    }
}
