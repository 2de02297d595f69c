//! Paged attention of the mixed batch on the CPU.
//!
//! The work is split the way the GPU kernel splits it (`weave_kernels_gpu::attention`): an
//! item is one sequence, one KV head and a tile of up to [`TILE_TOKENS`] of its query tokens.
//! The item walks the tile's KV blocks once; each block's K and V rows of that head are read
//! from the paged cache once, widened to f32 into a buffer that stays in L1, and used by every
//! query row of the item: the GQA group's query heads (3 for SmolLM2) times the tile's tokens.
//! A decode row so reads each K/V row once per group instead of once per query head, and a
//! prefill tile reads it once per 16 tokens instead of once per token.
//!
//! The causal mask, the block walk through the block table and the online softmax
//! (`SoftmaxState::fold_scores`) are kernels-gpu's.

use rayon::prelude::*;
use weave_kernels_gpu::attention::AttnShape;
use weave_kernels_gpu::softmax::SoftmaxState;
use weave_kernels_gpu::{Elem, F16};
use weave_scheduler::ScheduledBatch;

/// Query tokens per work item (the GPU kernel's tile, for a group of 1).
pub const TILE_TOKENS: usize = 16;

/// Whether the widening and the item loop can use F16C, AVX2 and FMA.
pub fn has_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// An element type of the KV cache, with its widening to f32.
pub trait CacheElem: Elem + Copy + Send + Sync {
    /// `dst = src` in f32; `simd`: [`has_simd`] said yes.
    fn widen(src: &[Self], dst: &mut [f32], simd: bool);
}

impl CacheElem for f32 {
    #[inline(always)]
    fn widen(src: &[f32], dst: &mut [f32], _simd: bool) {
        dst.copy_from_slice(src);
    }
}

impl CacheElem for F16 {
    #[inline(always)]
    fn widen(src: &[F16], dst: &mut [f32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when F16C and AVX2 were detected.
            return unsafe { x86::widen_f16(src, dst) };
        }
        let _ = simd;
        for (o, x) in dst.iter_mut().zip(src) {
            *o = x.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use weave_kernels_gpu::{Elem, F16};

    /// # Safety
    /// The CPU must have F16C and AVX2.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_f16(src: &[F16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n` elements of both; F16 is a transparent u16.
            unsafe {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i).cast()));
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    /// Sum of each of eight vectors, as one vector (lane `i` = the sum of `v[i]`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum8(v: [__m256; 8]) -> __m256 {
        let s01 = _mm256_hadd_ps(v[0], v[1]);
        let s23 = _mm256_hadd_ps(v[2], v[3]);
        let s45 = _mm256_hadd_ps(v[4], v[5]);
        let s67 = _mm256_hadd_ps(v[6], v[7]);
        // Lanes: sums of v0..v3 over the low 128 bits, then over the high 128 bits.
        let s0123 = _mm256_hadd_ps(s01, s23);
        let s4567 = _mm256_hadd_ps(s45, s67);
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(s0123, s4567), _mm256_permute2f128_ps::<0x31>(s0123, s4567))
    }

    /// One query row (`NC` x 8 floats, scaled) against one KV block of widened rows `k`, `v`
    /// (`valid` keys of `scores.len()`): the scores eight keys at a time, kernels-gpu's online
    /// softmax step, then `acc = acc * alpha + Σ p v`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA. `q` and `acc` hold `NC * 8` floats, `k` and `v` that
    /// many per key, and `scores.len()` is a multiple of 8 (asserted).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_block<const NC: usize>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        valid: usize,
        scores: &mut [f32],
        state: &mut weave_kernels_gpu::softmax::SoftmaxState,
        acc: &mut [f32],
    ) {
        let d = NC * 8;
        assert!(q.len() >= d && acc.len() >= d && k.len() >= valid * d && v.len() >= valid * d);
        assert!(scores.len().is_multiple_of(8) && valid <= scores.len());
        // SAFETY: every load below is inside the lengths asserted above.
        unsafe {
            let qv: [__m256; NC] = std::array::from_fn(|c| _mm256_loadu_ps(q.as_ptr().add(8 * c)));
            for t0 in (0..scores.len()).step_by(8) {
                let dots: [__m256; 8] = std::array::from_fn(|i| {
                    let t = t0 + i;
                    if t >= valid {
                        return _mm256_setzero_ps();
                    }
                    let kr = k.as_ptr().add(t * d);
                    let mut a = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kr));
                    for (c, qc) in qv.iter().enumerate().skip(1) {
                        a = _mm256_fmadd_ps(*qc, _mm256_loadu_ps(kr.add(8 * c)), a);
                    }
                    a
                });
                // Keys past `valid` are masked.
                let idx = _mm256_add_epi32(_mm256_set1_epi32(t0 as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                let live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), idx));
                let s = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), sum8(dots), live);
                _mm256_storeu_ps(scores.as_mut_ptr().add(t0), s);
            }
            let Some(alpha) = state.fold_scores(scores) else { return };
            let mut av: [__m256; NC] = std::array::from_fn(|c| _mm256_loadu_ps(acc.as_ptr().add(8 * c)));
            if alpha != 1.0 {
                let a = _mm256_set1_ps(alpha);
                av = av.map(|x| _mm256_mul_ps(x, a));
            }
            for (t, &p) in scores[..valid].iter().enumerate() {
                let (pv, vr) = (_mm256_set1_ps(p), v.as_ptr().add(t * d));
                for (c, a) in av.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vr.add(8 * c)), *a);
                }
            }
            for (c, a) in av.iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(8 * c), *a);
            }
        }
    }
}

/// One work item: query tokens `t0..t1` (batch rows, all of sequence `seq`) against KV head
/// `kv_head`.
#[derive(Debug, Clone, Copy)]
struct Item {
    seq: usize,
    kv_head: u32,
    t0: usize,
    t1: usize,
}

/// Buffers an item reuses.
#[derive(Debug, Default)]
struct Scratch {
    q: Vec<f32>,
    acc: Vec<f32>,
    state: Vec<SoftmaxState>,
    k: Vec<f32>,
    v: Vec<f32>,
    scores: Vec<f32>,
}

/// The output pointer the items share; each writes its own (token, head) rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: items write disjoint rows (their tokens x their KV head's query heads), and the
// buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[token][q_head][head_dim]`: every batch token's attention over its sequence's visible
/// keys (`positions[token] + 1` of them), with `q` laid out the same way (unscaled) and this
/// step's K/V already written into the caches.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: CacheElem>(
    shape: &AttnShape,
    b: &ScheduledBatch,
    group: usize,
    q: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    out: &mut [f32],
    simd: bool,
    window: Option<usize>,
) {
    let qd = (shape.num_q_heads * shape.head_dim) as usize;
    assert_eq!(q.len(), b.num_tokens() * qd);
    assert_eq!(out.len(), q.len());
    let mut items = Vec::new();
    for (seq, w) in b.query_start_loc.windows(2).enumerate() {
        let (s, e) = (w[0] as usize, w[1] as usize);
        for t0 in (s..e).step_by(TILE_TOKENS) {
            for kv_head in 0..shape.num_kv_heads {
                items.push(Item { seq, kv_head, t0, t1: (t0 + TILE_TOKENS).min(e) });
            }
        }
    }
    let out = OutPtr(out.as_mut_ptr());
    let inp = Inputs { shape, b, group, q, k_cache, v_cache, window };
    items.par_iter().for_each_init(Scratch::default, |sc, it| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when F16C, AVX2 and FMA were detected.
            return unsafe { item_avx2(inp, *it, sc, out) };
        }
        item(inp, *it, sc, out, false)
    });
}

/// What every item reads.
struct Inputs<'a, T> {
    shape: &'a AttnShape,
    b: &'a ScheduledBatch,
    /// The layer's KV group: whose block tables it reads.
    group: usize,
    q: &'a [f32],
    k_cache: &'a [T],
    v_cache: &'a [T],
    /// Sliding-window layers: a token sees only the last `window` keys, itself included.
    window: Option<usize>,
}

impl<T> Clone for Inputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Inputs<'_, T> {}

/// [`item`] compiled for AVX2 and FMA, so that its loops over `head_dim` and over a block's
/// keys vectorize.
///
/// # Safety
/// The CPU must have F16C, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn item_avx2<T: CacheElem>(inp: Inputs<'_, T>, it: Item, sc: &mut Scratch, out: OutPtr) {
    item(inp, it, sc, out, true)
}

/// `x * y + a`: fused where the code is compiled for FMA (`simd`), where it is one
/// instruction; a plain multiply-add elsewhere, where `mul_add` would be a library call.
#[inline(always)]
fn madd(simd: bool, x: f32, y: f32, a: f32) -> f32 {
    if simd {
        x.mul_add(y, a)
    } else {
        x * y + a
    }
}

/// `a . b` in 16 independent lanes (one or two vector registers) and a tree of sums.
#[inline(always)]
fn dot(simd: bool, a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = madd(simd, x[i], y[i], acc[i]);
        }
    }
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + tail
}

#[inline(always)]
fn item<T: CacheElem>(inp: Inputs<'_, T>, it: Item, sc: &mut Scratch, out: OutPtr, simd: bool) {
    let Inputs { shape, b, group, q, k_cache, v_cache, window } = inp;
    let (d, g, bs) = (shape.head_dim as usize, shape.group() as usize, shape.block_size as usize);
    let qd = shape.num_q_heads as usize * d;
    let rows = (it.t1 - it.t0) * g;
    // Row `r` is token `t0 + r / g` and query head `kv_head * g + r % g`.
    let head = |r: usize| it.kv_head as usize * g + r % g;
    let visible = |r: usize| b.positions[it.t0 + r / g] as usize + 1;
    // The first key a row sees: 0, or the start of its window.
    let first_seen = |r: usize| window.map_or(0, |w| visible(r).saturating_sub(w));
    sc.q.resize(rows * d, 0.0);
    for (r, qr) in sc.q.chunks_exact_mut(d).enumerate() {
        let src = &q[(it.t0 + r / g) * qd + head(r) * d..][..d];
        for (a, &x) in qr.iter_mut().zip(src) {
            *a = x * shape.scale;
        }
    }
    sc.acc.clear();
    sc.acc.resize(rows * d, 0.0);
    sc.state.clear();
    sc.state.resize(rows, SoftmaxState::EMPTY);
    sc.k.resize(bs * d, 0.0);
    sc.v.resize(bs * d, 0.0);
    sc.scores.resize(bs, 0.0);
    let table = b.group_block_table(group, it.seq);
    // Tokens rise within a tile, so the last row sees the most keys.
    let last_visible = visible(rows - 1);
    // Blocks wholly before the first row's window are nobody's: skipped unread.
    let first_block = first_seen(0) / bs;
    for (j, &phys) in table.iter().enumerate().take(last_visible.div_ceil(bs)).skip(first_block) {
        let first_key = j * bs;
        let keys = bs.min(last_visible - first_key);
        for t in 0..keys {
            let o = shape.kv_offset(phys * bs as u32 + t as u32, it.kv_head);
            T::widen(&k_cache[o..o + d], &mut sc.k[t * d..(t + 1) * d], simd);
            T::widen(&v_cache[o..o + d], &mut sc.v[t * d..(t + 1) * d], simd);
        }
        for r in 0..rows {
            let vis = visible(r);
            if first_key >= vis {
                continue; // this row's keys end before the block
            }
            // This row's keys in the block: from `skip` (its window's start) to `end`.
            let (skip, end) = (first_seen(r).saturating_sub(first_key), keys.min(vis - first_key));
            if skip >= end {
                continue; // the block ends before this row's window
            }
            let valid = end - skip;
            let (kb, vb) = (&sc.k[skip * d..], &sc.v[skip * d..]);
            let (qr, acc) = (&sc.q[r * d..(r + 1) * d], &mut sc.acc[r * d..(r + 1) * d]);
            #[cfg(target_arch = "x86_64")]
            if simd && bs.is_multiple_of(8) && (d == 64 || d == 128) {
                let (st, s) = (&mut sc.state[r], &mut sc.scores[..]);
                // SAFETY: `simd` is only true when AVX2 and FMA were detected; the sizes are
                // as the kernel needs (it asserts them).
                unsafe {
                    if d == 64 {
                        x86::row_block::<8>(qr, kb, vb, valid, s, st, acc)
                    } else {
                        x86::row_block::<16>(qr, kb, vb, valid, s, st, acc)
                    }
                }
                continue;
            }
            for (t, s) in sc.scores.iter_mut().enumerate() {
                *s = if t < valid { dot(simd, qr, &kb[t * d..(t + 1) * d]) } else { f32::NEG_INFINITY };
            }
            let Some(alpha) = sc.state[r].fold_scores(&mut sc.scores) else { continue };
            if alpha != 1.0 {
                acc.iter_mut().for_each(|a| *a *= alpha);
            }
            for (&p, vrow) in sc.scores[..valid].iter().zip(vb.chunks_exact(d)) {
                for (a, &x) in acc.iter_mut().zip(vrow) {
                    *a = madd(simd, p, x, *a);
                }
            }
        }
    }
    for (r, acc) in sc.acc.chunks_exact(d).enumerate() {
        let inv = 1.0 / sc.state[r].l;
        let o = (it.t0 + r / g) * qd + head(r) * d;
        for (k, &a) in acc.iter().enumerate() {
            // SAFETY: `o + k` is inside `out` (`num_tokens * qd` floats), and only this item
            // writes its tokens' rows of its KV head's query heads.
            unsafe { *out.0.add(o + k) = a * inv };
        }
    }
}
