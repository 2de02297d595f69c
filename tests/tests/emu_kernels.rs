//! Every GPU kernel on the CPU, under the SIMT emulator (weave-simt): each family against the
//! references and tolerances `cuda_kernels.rs` uses on a GPU, launched with the grids and
//! shared memory the CUDA backend gives them (`Kernel::rows`, `Kernel::attention`), with every
//! barrier, shuffle mask, shared-memory access and global access checked. Runs on any machine.
//!
//! Attention is launched here the way `backends::cuda::launch` sequences it (tiles, split-KV
//! and its reduce, the tensor-core kernel for chunk tiles); the CUDA backend's own launchers
//! on the emulator are issue 19's fourth part.

mod common;

use common::{max_abs, rnd};
use proptest::prelude::*;
use weave::backends::cuda::AttnKernel;
use weave_kernels_gpu::gpu::Arg;
use weave_kernels_gpu::kernels::{norm, sampling};
use weave_kernels_gpu::ops::{self, RopeLayout};
use weave_kernels_gpu::{Bf16, Dtype, Elem, HeadDim, Kernel, LaunchDims, BLOCK_THREADS, F16};
use weave_simt::{Dim3, EmuError, Launch, Stats};

/// One shared f32 per warp: what the norm kernels need, and no more (an access past it is an
/// error).
fn launch(name: &str, rows: usize) -> Launch {
    Launch::new(name, Dim3::x(rows as u32), Dim3::x(BLOCK_THREADS)).smem(BLOCK_THREADS as usize / 32 * 4)
}

/// `x * w / sqrt(mean(x^2) + eps)` in f64.
fn rms_ref(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * inv * g as f64).collect()
}

fn max_err<T: Elem>(got: &[T], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(g, w)| (g.to_f32() as f64 - w).abs()).fold(0.0, f64::max)
}

type RmsLaunch<T> = fn(&Launch, *mut T, *const T, *const f32, u32, f32) -> Result<Stats, EmuError>;
type FusedLaunch<T> = fn(&Launch, *mut T, *mut T, *const f32, u32, f32) -> Result<Stats, EmuError>;

fn norms<T: Elem>(rms: RmsLaunch<T>, fused: FusedLaunch<T>, tol: f64) {
    let eps = 1e-5;
    // SmolLM2's hidden size, one under a multiple of the block, and a row shorter than it.
    for (rows, n) in [(7usize, 576usize), (3, 127), (2, 100)] {
        let conv = |v: &[f32]| v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
        let x = conv(&rnd(rows * n, 1 + n as u64));
        let w = rnd(n, 2 + n as u64);
        let mut out = vec![T::default(); rows * n];
        let l = launch(&format!("rms_norm_{}", T::NAME), rows).buffer("out", &out).buffer("x", &x).buffer("w", &w);
        let st = rms(&l, out.as_mut_ptr(), x.as_ptr(), w.as_ptr(), n as u32, eps).unwrap();
        assert_eq!((st.blocks, st.barriers), (rows as u64, rows as u64));
        let want: Vec<f64> = x
            .chunks(n)
            .flat_map(|r| rms_ref(&r.iter().map(|v| v.to_f32() as f64).collect::<Vec<_>>(), &w, eps as f64))
            .collect();
        let e = max_err(&out, &want);
        assert!(e < tol, "rms_norm_{} rows {rows} n {n}: {e}", T::NAME);

        // Fused: residual += x (stored as T), then x = rms_norm(residual).
        let mut xs = x.clone();
        let mut res = conv(&rnd(rows * n, 3 + n as u64));
        let res_new: Vec<T> = res.iter().zip(&xs).map(|(r, v)| T::from_f32(r.to_f32() + v.to_f32())).collect();
        let l = launch(&format!("fused_add_rms_norm_{}", T::NAME), rows)
            .buffer("x", &xs)
            .buffer("residual", &res)
            .buffer("w", &w);
        fused(&l, xs.as_mut_ptr(), res.as_mut_ptr(), w.as_ptr(), n as u32, eps).unwrap();
        assert!(res.iter().zip(&res_new).all(|(a, b)| a.to_f32() == b.to_f32()), "fused residual_{}", T::NAME);
        let want: Vec<f64> = res_new
            .chunks(n)
            .flat_map(|r| rms_ref(&r.iter().map(|v| v.to_f32() as f64).collect::<Vec<_>>(), &w, eps as f64))
            .collect();
        let e = max_err(&xs, &want);
        assert!(e < tol, "fused_add_rms_norm_{} rows {rows} n {n}: {e}", T::NAME);
    }
}

#[test]
fn norm_kernels_f32() {
    norms::<f32>(norm::rms_norm_f32::launch, norm::fused_add_rms_norm_f32::launch, 1e-4);
}

#[test]
fn norm_kernels_f16() {
    norms::<F16>(norm::rms_norm_f16::launch, norm::fused_add_rms_norm_f16::launch, 4e-3);
}

#[test]
fn norm_kernels_bf16() {
    norms::<Bf16>(norm::rms_norm_bf16::launch, norm::fused_add_rms_norm_bf16::launch, 3e-2);
}

/// The same kernel with each warp's lanes run last to first gives the same numbers (it leans
/// on no lane order), and a launch with too little shared memory is refused by name.
#[test]
fn norm_kernels_under_the_emulators_switches() {
    let (rows, n) = (4usize, 576usize);
    let x = rnd(rows * n, 9);
    let w = rnd(n, 10);
    let run = |l: Launch| {
        let mut out = vec![0f32; rows * n];
        let l = l.buffer("out", &out).buffer("x", &x).buffer("w", &w);
        norm::rms_norm_f32::launch(&l, out.as_mut_ptr(), x.as_ptr(), w.as_ptr(), n as u32, 1e-5).map(|_| out)
    };
    let fwd = run(launch("rms_norm_f32", rows)).unwrap();
    let checks = weave_simt::Checks { reverse_lanes: true, ..Default::default() };
    let rev = run(launch("rms_norm_f32", rows).checks(checks)).unwrap();
    let max = fwd.iter().zip(&rev).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max <= 1e-6, "lane order changed the result by {max}");
    let e = run(launch("rms_norm_f32", rows).smem(8)).unwrap_err();
    assert_eq!(e.kind, weave_simt::ErrorKind::OutOfBounds, "{e}");
    assert!(e.detail.contains("kernels/reduce.rs"), "the error names the line of the shared write: {e}");
}

// ------------------------------------------------------------------ launches

/// The emulator's launch for a kernel with the backend's shape.
fn emu(k: Kernel, d: LaunchDims) -> Launch {
    Launch::new(k.name(), Dim3::new(d.grid.0, d.grid.1, d.grid.2), Dim3::x(d.block)).smem(d.smem as usize)
}

/// A buffer as a kernel argument (read only).
fn ptr<T>(v: &[T]) -> Arg {
    Arg::Ptr(v.as_ptr() as u64)
}

/// A buffer the kernel writes, as a kernel argument.
fn ptr_mut<T>(v: &mut [T]) -> Arg {
    Arg::Ptr(v.as_mut_ptr() as u64)
}

fn conv<T: Elem>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

// ------------------------------------------------------------------ row kernels

fn row_kernels<T: Elem>(tol: f64) {
    let (nrows, n) = (7usize, 576usize);
    let t = T::DTYPE;
    // SiLU and multiply.
    let gu: Vec<T> = conv(&rnd(nrows * 2 * n, 3));
    let mut out = vec![T::default(); nrows * n];
    let k = Kernel::SiluAndMul(t);
    let l = emu(k, k.rows(nrows as u32)).buffer("out", &out).buffer("x", &gu);
    k.emulate(&l, &[ptr_mut(&mut out), ptr(&gu), Arg::U32(n as u32)]).unwrap();
    let want = common::silu_and_mul_ref(&gu, n);
    assert!(max_abs(&out, &want) < tol, "silu_and_mul_{}: {}", T::NAME, max_abs(&out, &want));
    // Embedding gather, bit for bit.
    let table: Vec<T> = conv(&rnd(50 * n, 4));
    let ids = vec![3u32, 49, 0, 3, 17, 8, 22];
    let mut out = vec![T::default(); nrows * n];
    let k = Kernel::Embedding(t);
    let l = emu(k, k.rows(nrows as u32)).buffer("out", &out).buffer("table", &table).buffer("ids", &ids);
    k.emulate(&l, &[ptr_mut(&mut out), ptr(&table), ptr(&ids), Arg::U32(n as u32)]).unwrap();
    let want: Vec<T> = ids.iter().flat_map(|&i| table[i as usize * n..(i as usize + 1) * n].to_vec()).collect();
    assert_eq!(max_abs(&out, &want), 0.0, "embedding_{}", T::NAME);
    // Rotary, both layouts: q with 9 heads, k with 3, head dim 64; positions up to 4095.
    let (nq, nk, hd) = (9usize, 3usize, 64usize);
    let positions: Vec<u32> = vec![0, 1, 2, 100, 4095, 7, 9];
    let mut cs = vec![0f32; 4096 * hd];
    for (p, r) in cs.chunks_mut(hd).enumerate() {
        ops::fill_cos_sin_row(p, hd, 10000.0, r);
    }
    for layout in [RopeLayout::Interleaved, RopeLayout::Neox] {
        let q: Vec<T> = conv(&rnd(nrows * nq * hd, 5));
        let kk: Vec<T> = conv(&rnd(nrows * nk * hd, 6));
        let (mut qd, mut kd) = (q.clone(), kk.clone());
        let k = Kernel::RotaryEmbedding(t);
        let l = emu(k, k.rows(nrows as u32))
            .buffer("q", &qd)
            .buffer("k", &kd)
            .buffer("positions", &positions)
            .buffer("cos_sin", &cs);
        let dims = [nq, nk, hd, hd].map(|x| Arg::U32(x as u32));
        let args = [ptr_mut(&mut qd), ptr_mut(&mut kd), ptr(&positions), ptr(&cs)];
        k.emulate(&l, &[&args[..], &dims, &[Arg::U32(layout as u32)]].concat()).unwrap();
        let rot = |v: &[T], heads: usize| common::rope_ref(v, heads, hd, &positions, &cs, layout);
        let (eq, ek) = (max_abs(&qd, &rot(&q, nq)), max_abs(&kd, &rot(&kk, nk)));
        assert!(eq < tol && ek < tol, "rotary_embedding_{} {layout:?}: q {eq}, k {ek}", T::NAME);
    }
    // The dummy-weight fill, bit for bit, past one grid's worth of blocks (grid-stride).
    let n_fill = 128 * 132 * 16 + 1001;
    let mut f = vec![T::default(); n_fill];
    let l = emu(Kernel::FillDummy(t), Kernel::fill(n_fill as u64)).buffer("out", &f);
    let args = [ptr_mut(&mut f), Arg::U64(n_fill as u64), Arg::U64(77), Arg::F32(0.03)];
    Kernel::FillDummy(t).emulate(&l, &args).unwrap();
    for i in (0..n_fill).step_by(97).chain([n_fill - 1]) {
        let v = T::from_f32(weave_kernels_gpu::sample::dummy_value(77, i as u64, 0.03));
        assert_eq!(f[i].to_f32().to_bits(), v.to_f32().to_bits(), "fill_dummy_{} element {i}", T::NAME);
    }
}

#[test]
fn row_kernels_f32() {
    row_kernels::<f32>(1e-4);
}

#[test]
fn row_kernels_f16() {
    row_kernels::<F16>(4e-3);
}

#[test]
fn row_kernels_bf16() {
    row_kernels::<Bf16>(3e-2);
}

// ------------------------------------------------------------------ sampling

#[test]
fn argmax_over_a_vocabulary() {
    let (nrows, vocab) = (5usize, 4099usize);
    let mut logits = rnd(nrows * vocab, 9);
    logits[3 * vocab + 4000] = 5.0;
    logits[4 * vocab + 7] = 5.0;
    logits[4 * vocab + 9] = 5.0; // a tie: the lower index wins
    let mut out = vec![0u32; nrows];
    let l = emu(Kernel::ArgmaxF32, Kernel::ArgmaxF32.rows(nrows as u32)).buffer("out", &out).buffer("logits", &logits);
    sampling::argmax_f32::launch(&l, out.as_mut_ptr(), logits.as_ptr(), vocab as u32).unwrap();
    let want: Vec<u32> = logits.chunks(vocab).map(ops::argmax_row).collect();
    assert_eq!(out, want);
    assert_eq!(out[4], 7);
}

#[test]
fn device_sampling_matches_its_host_definition() {
    use weave_kernels_gpu::sample::sample_row;
    let vocab = 1500usize;
    let params = common::sampling_params(2, 1400);
    let nrows = params.len();
    let logits: Vec<f32> = (0..nrows)
        .flat_map(|r| rnd(vocab, 100 + r as u64).into_iter().map(move |x| x * (1.0 + r as f32 % 7.0)))
        .collect();
    let words: Vec<u32> = params.iter().flat_map(|p| p.to_words()).collect();
    let (mut toks, mut lps) = (vec![0u32; nrows], vec![0f32; nrows]);
    let l = emu(Kernel::SampleF32, Kernel::SampleF32.rows(nrows as u32))
        .buffer("out", &toks)
        .buffer("out_logprob", &lps)
        .buffer("logits", &logits)
        .buffer("params", &words);
    sampling::sample_f32::launch(
        &l,
        toks.as_mut_ptr(),
        lps.as_mut_ptr(),
        logits.as_ptr(),
        words.as_ptr(),
        vocab as u32,
    )
    .unwrap();
    let mut differ = 0;
    for (r, p) in params.iter().enumerate() {
        let (want, want_lp) = sample_row(&logits[r * vocab..(r + 1) * vocab], p);
        // The block sums run in another order than the host's: as on a GPU, a draw may land on
        // another token only where two scores are within rounding; never a greedy row.
        if toks[r] != want {
            assert!(!p.greedy(), "row {r}: greedy {} != {want}", toks[r]);
            differ += 1;
        } else {
            assert!((lps[r] - want_lp).abs() < 1e-3, "row {r}: logprob {} vs {want_lp}", lps[r]);
        }
    }
    assert!(differ <= nrows / 16, "{differ} of {nrows} rows drew another token than the host definition");
}

// ------------------------------------------------------------------ attention

/// The batch's KV write (bit for bit against the host's) and its attention with `kind`, as
/// the CUDA backend sequences the launches; returns the largest difference from the host.
fn attention_case<T: Elem>(c: &common::Case, kind: AttnKernel) -> f64 {
    attention_case_with::<T>(c, kind, weave_simt::Checks::default())
}

/// [`attention_case`] with the emulator's `checks` (e.g. lanes run last to first).
fn attention_case_with<T: Elem>(c: &common::Case, kind: AttnKernel, checks: weave_simt::Checks) -> f64 {
    let b = common::build::<T>(c);
    let shape = b.shape;
    let t = T::DTYPE;
    let hd = HeadDim::of(shape.head_dim).unwrap();
    let num_tokens = *b.qsl.last().unwrap();
    // KV write.
    let (mut kc, mut vc) = (b.kc_before.clone(), b.vc_before.clone());
    let row = shape.num_kv_heads * shape.head_dim;
    let k = Kernel::ReshapeAndCache(t);
    let l = emu(k, k.rows(b.slots.len() as u32))
        .buffer("k", &b.k_new)
        .buffer("v", &b.v_new)
        .buffer("k_cache", &kc)
        .buffer("v_cache", &vc)
        .buffer("slots", &b.slots);
    let args = [ptr(&b.k_new), ptr(&b.v_new), ptr_mut(&mut kc), ptr_mut(&mut vc), ptr(&b.slots), Arg::U32(row)];
    k.emulate(&l, &args).unwrap();
    let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&kc) == bits(&b.kc) && bits(&vc) == bits(&b.vc),
        "reshape_and_cache_{} differs from the host",
        T::NAME
    );

    // Attention: the tiles for `kind`, CUDA-core tiles (split unless there are chunk tiles),
    // then tensor-core tiles.
    let (small, big) = kind.tiles(t, shape.block_size, &b.qsl, shape.tokens_per_tile());
    let shape = if big.is_empty() { shape } else { weave_kernels_gpu::AttnShape { blocks_per_split: 0, ..shape } };
    let splits = shape.num_splits(b.max_seq_len);
    let nq = shape.num_q_heads;
    let mut partials = vec![0f32; (splits * num_tokens * nq) as usize * shape.partial_stride()];
    let mut out = vec![T::default(); b.q.len()];
    let launch = |k: Kernel, d: LaunchDims, tiles: &[u32], out: &[T], partials: &[f32]| {
        emu(k, d)
            .checks(checks)
            .buffer("out", out)
            .buffer("partials", partials)
            .buffer("q", &b.q)
            .buffer("k_cache", &kc)
            .buffer("v_cache", &vc)
            .buffer("tiles", tiles)
            .buffer("query_start_loc", &b.qsl)
            .buffer("context_lens", &b.ctx)
            .buffer("block_tables", &b.tables)
    };
    // The pointer parameters every attention kernel starts with, after `out` (and `partials`).
    let inputs = |tiles: &[u32]| [ptr(&b.q), ptr(&kc), ptr(&vc), ptr(tiles), ptr(&b.qsl), ptr(&b.ctx), ptr(&b.tables)];
    let sizes = [num_tokens, nq, shape.num_kv_heads, shape.block_size, shape.max_blocks_per_seq].map(Arg::U32);
    if !small.is_empty() {
        let half = t != Dtype::F32;
        let kernel = match (kind.decode_rows(t, shape.block_size), half) {
            (AttnKernel::Fast, true) => Kernel::PagedDecode(t, hd),
            (AttnKernel::Pipelined, true) => Kernel::PagedAttentionPipelined(t, hd),
            _ => Kernel::PagedAttention(t, hd),
        };
        let l = launch(kernel, kernel.attention(&shape, small.len() as u32 / 2, splits), &small, &out, &partials);
        let outs = [ptr_mut(&mut out), ptr_mut(&mut partials)];
        let split = [Arg::U32(shape.blocks_per_split), Arg::U32(splits), Arg::F32(shape.scale)];
        let args = [&outs[..], &inputs(&small), &sizes, &split].concat();
        kernel.emulate(&l, &args).unwrap_or_else(|e| panic!("{e}"));
        if splits > 1 {
            let r = Kernel::AttentionReduce(t, hd);
            let l = emu(r, r.attention(&shape, num_tokens, 1))
                .checks(checks)
                .buffer("out", &out)
                .buffer("partials", &partials);
            let args = [ptr_mut(&mut out), ptr(&partials), Arg::U32(num_tokens), Arg::U32(nq), Arg::U32(splits)];
            r.emulate(&l, &args).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    if !big.is_empty() {
        let kernel = Kernel::PagedAttentionMma(t, hd);
        let l = launch(kernel, kernel.attention(&shape, big.len() as u32 / 2, 1), &big, &out, &partials);
        let args = [&[ptr_mut(&mut out)][..], &inputs(&big), &sizes, &[Arg::F32(shape.scale)]].concat();
        kernel.emulate(&l, &args).unwrap_or_else(|e| panic!("{e}"));
    }
    max_abs(&out, &common::host_attention(&b))
}

const KINDS: [AttnKernel; 4] = [AttnKernel::Staged, AttnKernel::Pipelined, AttnKernel::TensorCore, AttnKernel::Fast];

/// Random mixed batches from `common::case()`, every kernel choice on each.
fn attention_prop<T: Elem>(cases: u32, tol: f64) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
    let r = runner.run(&common::case(), |c| {
        for kind in KINDS {
            let err = attention_case::<T>(&c, kind);
            prop_assert!(err < tol, "paged_attention_{} ({kind:?}): max abs error {err} (tolerance {tol})", T::NAME);
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

#[test]
fn attention_f32() {
    attention_prop::<f32>(10, 1e-4);
}

#[test]
fn attention_f16() {
    attention_prop::<F16>(10, 2e-3);
}

#[test]
fn attention_bf16() {
    attention_prop::<Bf16>(10, 1.6e-2);
}

/// The tensor-core kernel on chunks longer than its 64-token tiles, mid-block starts, GQA
/// groups of 3, 4 and 8, block sizes 16 and 32, beside decode rows.
#[test]
fn tensor_core_attention_on_long_chunks() {
    for (block_size, head_dim, group) in [(16u32, 128u32, 4u32), (32, 64, 3), (16, 64, 8), (32, 128, 1)] {
        let c = common::Case {
            seqs: vec![(0, 100), (37, 70), (70, 1), (16, 65)],
            block_size,
            head_dim,
            num_kv_heads: 1,
            group,
            blocks_per_split: 0,
            seed: 5,
        };
        for kind in [AttnKernel::TensorCore, AttnKernel::Fast] {
            let e16 = attention_case::<F16>(&c, kind);
            let e_bf = attention_case::<Bf16>(&c, kind);
            assert!(
                e16 < 2e-3 && e_bf < 1.6e-2,
                "{kind:?}, block {block_size}, d {head_dim}, group {group}: f16 {e16}, bf16 {e_bf}"
            );
        }
    }
}

/// The decode kernel alone and split (decode-only batches split their KV), contexts from one
/// key to several blocks.
#[test]
fn decode_kernel_split_and_unsplit() {
    for (block_size, head_dim, group, bps) in
        [(16u32, 128u32, 4u32, 0u32), (16, 128, 4, 2), (32, 64, 3, 1), (16, 64, 8, 3)]
    {
        let c = common::Case {
            seqs: vec![(0, 1), (15, 1), (16, 1), (200, 1), (77, 1)],
            block_size,
            head_dim,
            num_kv_heads: 2,
            group,
            blocks_per_split: bps,
            seed: 11,
        };
        let e16 = attention_case::<F16>(&c, AttnKernel::Fast);
        let e_bf = attention_case::<Bf16>(&c, AttnKernel::Fast);
        assert!(
            e16 < 2e-3 && e_bf < 1.6e-2,
            "split {bps}, block {block_size}, d {head_dim}, group {group}: f16 {e16}, bf16 {e_bf}"
        );
    }
}

// ------------------------------------------------------------------ the conformance kernel

/// The conformance kernel under the emulator against the PTX ISA's definitions of each
/// primitive, computed here from the inputs alone (a GPU run compares its output with the
/// emulator's: `cuda_kernels.rs`, first in `tools/gpu/check.sh`).
#[test]
fn conformance_kernel_follows_the_ptx_definitions() {
    use weave_kernels_gpu::kernels::conformance::{self as cf, region, slot, GRID, NTHREADS, OUT_WORDS};
    let inp = cf::input(7);
    let run = |checks: weave_simt::Checks| {
        let mut out = vec![0u32; NTHREADS * OUT_WORDS];
        let k = Kernel::GpuConformance;
        let l = emu(k, k.rows(GRID)).buffer("inp", &inp).buffer("out", &out).checks(checks);
        cf::gpu_conformance::launch(&l, inp.as_ptr(), out.as_mut_ptr()).unwrap_or_else(|e| panic!("{e}"));
        out
    };
    let out = run(Default::default());
    // Lane order changes nothing, bit for bit.
    let rev = run(weave_simt::Checks { reverse_lanes: true, ..Default::default() });
    assert_eq!(cf::compare(&out, &rev), Ok(()));
    let at = |t: usize, s: usize| out[t * OUT_WORDS + s];
    let h16 = |w: u32, hi: bool| if hi { w >> 16 } else { w & 0xffff };
    for gt in 0..NTHREADS {
        let (t, bx) = (gt % 128, gt / 128);
        let (lane, warp) = (t % 32, t / 32);
        let wbase = gt - lane; // the warp's first thread in the launch
        assert_eq!(at(gt, slot::INDEX), t as u32 | (bx as u32) << 8 | GRID << 16);
        for (k, m) in [1usize, 2, 4, 8, 16].into_iter().enumerate() {
            assert_eq!(at(gt, slot::XOR + k), inp[region::INTS + wbase + (lane ^ m)], "shfl.bfly {m} thread {gt}");
        }
        assert_eq!(at(gt, slot::XOR_F32), inp[region::FLOATS + wbase + (lane ^ 1)]);
        assert_eq!(at(gt, slot::XOR_F32 + 1), inp[region::FLOATS + wbase + (lane ^ 16)]);
        let src = inp[region::LANES + gt] as usize % 32;
        assert_eq!(at(gt, slot::IDX), inp[region::FLOATS + wbase + src], "shfl.idx thread {gt}");
        let peer = 128 * bx + (7 * t + 3) % 128;
        assert_eq!(at(gt, slot::SHARED), inp[region::INTS + peer] ^ 0x5a5a_5a5a);
        for k in 0..4 {
            assert_eq!(at(gt, slot::V4 + k), inp[region::V4 + 4 * (t % 64) + k]);
        }
        // ldmatrix: the block's 128 INTS words as 32 rows of 16 bytes (4 words); lane `8i + r`
        // points at row (5 (8i + r) + warp) % 32, which is matrix i's row r.
        let row_of = |i: usize, r: usize| (5 * (8 * i + r) + warp) % 32;
        let half_at = |row: usize, col: usize| h16(inp[region::INTS + 128 * bx + 4 * row + col / 2], col % 2 == 1);
        for i in 0..4 {
            // Register i: matrix i's row lane / 4, columns 2 (lane % 4) and + 1.
            let r = row_of(i, lane / 4);
            let want = half_at(r, 2 * (lane % 4)) | half_at(r, 2 * (lane % 4) + 1) << 16;
            assert_eq!(at(gt, slot::LDMATRIX + i), want, "ldmatrix thread {gt} register {i}");
            // .trans: column lane / 4, rows 2 (lane % 4) and + 1.
            let (r0, r1) = (row_of(i, 2 * (lane % 4)), row_of(i, 2 * (lane % 4) + 1));
            let want = half_at(r0, lane / 4) | half_at(r1, lane / 4) << 16;
            assert_eq!(at(gt, slot::LDMATRIX_T + i), want, "ldmatrix.trans thread {gt} register {i}");
        }
        assert_eq!(at(gt, slot::ASYNC), inp[region::ASYNC + 4 * ((t + 1) % 128) + t % 4], "cp.async thread {gt}");
    }
    // mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
    // with g = lane / 4 and c = lane % 4, a[r] holds A's row g + 8 (r & 1), columns
    // 2c + 8 (r >> 1) and + 1; b[r] holds B's column g, rows 2c + 8r and + 1; c[i] and d[i]
    // are row g + 8 (i >> 1), column 2c + (i & 1).
    for (a_reg, b_reg, d_slot, wide) in [
        (region::A16, region::B16, slot::MMA_F16, (|h: u32| F16(h as u16).to_f32()) as fn(u32) -> f32),
        (region::ABF, region::BBF, slot::MMA_BF16, |h: u32| Bf16(h as u16).to_f32()),
    ] {
        for w0 in (0..NTHREADS).step_by(32) {
            let (mut a, mut b, mut c) = ([[0f32; 16]; 16], [[0f32; 8]; 16], [[0f32; 8]; 16]);
            for lane in 0..32 {
                let (g, q) = (lane / 4, lane % 4);
                for r in 0..4 {
                    let w = inp[a_reg + 4 * (w0 + lane) + r];
                    let (row, col) = (g + 8 * (r & 1), 2 * q + 8 * (r >> 1));
                    a[row][col] = wide(h16(w, false));
                    a[row][col + 1] = wide(h16(w, true));
                }
                for r in 0..2 {
                    let w = inp[b_reg + 2 * (w0 + lane) + r];
                    b[2 * q + 8 * r][g] = wide(h16(w, false));
                    b[2 * q + 8 * r + 1][g] = wide(h16(w, true));
                }
                for i in 0..4 {
                    c[g + 8 * (i >> 1)][2 * q + (i & 1)] = f32::from_bits(inp[region::C + 4 * (w0 + lane) + i]);
                }
            }
            for lane in 0..32 {
                let (g, q) = (lane / 4, lane % 4);
                for i in 0..4 {
                    let (row, col) = (g + 8 * (i >> 1), 2 * q + (i & 1));
                    let want: f64 =
                        c[row][col] as f64 + (0..16).map(|k| a[row][k] as f64 * b[k][col] as f64).sum::<f64>();
                    let got = f32::from_bits(out[(w0 + lane) * OUT_WORDS + d_slot + i]) as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "mma warp {} lane {lane} d[{i}]: {got} vs {want}",
                        w0 / 32
                    );
                }
            }
        }
    }
}

/// Every attention kernel with each warp's lanes run last to first: none leans on an order of
/// lanes the hardware does not promise (a split batch, so the reduce runs too).
#[test]
fn attention_kernels_do_not_depend_on_lane_order() {
    let rev = weave_simt::Checks { reverse_lanes: true, ..Default::default() };
    for bps in [0u32, 1] {
        let c = common::Case {
            seqs: if bps == 0 { vec![(0, 70), (20, 9), (33, 1)] } else { vec![(40, 1), (17, 1)] },
            block_size: 16,
            head_dim: 64,
            num_kv_heads: 2,
            group: 3,
            blocks_per_split: bps,
            seed: 21,
        };
        for kind in KINDS {
            let (e32, e16) = (attention_case_with::<f32>(&c, kind, rev), attention_case_with::<F16>(&c, kind, rev));
            assert!(e32 < 1e-4 && e16 < 2e-3, "{kind:?} split {bps}, lanes reversed: f32 {e32}, f16 {e16}");
        }
    }
}

/// A kernel by type with its arguments as a launch passes them (`Kernel::emulate`, what a
/// device seam over the emulator calls): the same result as the typed launch, and a launch
/// whose arguments do not fit the kernel is refused, naming the parameter.
#[test]
fn kernels_launch_by_type_with_checked_arguments() {
    let (nrows, n) = (3usize, 300usize);
    let x = rnd(nrows * n, 31);
    let w = rnd(n, 32);
    let k = Kernel::RmsNorm(Dtype::F32);
    let (mut a, mut b) = (vec![0f32; nrows * n], vec![0f32; nrows * n]);
    let l = |out: &[f32]| emu(k, k.rows(nrows as u32)).buffer("out", out).buffer("x", &x).buffer("w", &w);
    norm::rms_norm_f32::launch(&l(&a), a.as_mut_ptr(), x.as_ptr(), w.as_ptr(), n as u32, 1e-5).unwrap();
    let args = [ptr_mut(&mut b), ptr(&x), ptr(&w), Arg::U32(n as u32), Arg::F32(1e-5)];
    k.emulate(&l(&b), &args).unwrap();
    assert_eq!(a, b);
    assert!(b.iter().any(|&v| v != 0.0));
    // A u32 where the kernel takes an f32, and an argument short.
    let mut wrong = args;
    wrong[4] = Arg::U32(1);
    let e = k.emulate(&l(&b), &wrong).unwrap_err();
    assert_eq!(e.kind, weave_simt::ErrorKind::BadLaunch);
    assert!(e.detail.contains("parameter 4 `eps` takes an f32"), "{e}");
    let e = k.emulate(&l(&b), &args[..4]).unwrap_err();
    assert!(e.detail.contains("rms_norm_f32 takes 5 arguments (out, x, w, n, eps), the launch gives 4"), "{e}");
}
