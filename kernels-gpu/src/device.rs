//! The CUDA kernels (nvptx only). Raw pointers throughout: no slices, hence no bounds-check
//! panics on the device. Indexing conventions and math come from the portable modules.

use crate::attention::{split_blocks, MAX_BLOCK_SIZE, MMA_TILE_TOKENS, ROWS_PER_TILE};
use crate::elem::{Bf16, Elem, F16};
use crate::fmath::{exp, ln, max, silu};
use crate::kernels::reduce::{block_sum, warp_sum};
use crate::ops::{argmax_pick, rope_pair, RopeLayout};
use crate::sample::{bisect_key, dummy_value, ord_key, race_score, uniform_open, weight, RowParams, PARAM_WORDS};
use crate::{udiv, urem};
use core::arch::nvptx::*;

unsafe extern "C" {
    #[link_name = "llvm.nvvm.shfl.sync.bfly.f32"]
    fn shfl_bfly_f32(mask: u32, v: f32, lane_mask: u32, clamp: u32) -> f32;
    #[link_name = "llvm.nvvm.shfl.sync.bfly.i32"]
    fn shfl_bfly_i32(mask: u32, v: i32, lane_mask: u32, clamp: u32) -> i32;
    #[link_name = "llvm.nvvm.shfl.sync.idx.f32"]
    fn shfl_idx_f32(mask: u32, v: f32, lane: u32, clamp: u32) -> f32;
}

const FULL: u32 = 0xffff_ffff;
const THREADS: u32 = crate::BLOCK_THREADS;
const WARPS: u32 = THREADS / 32;

core::arch::global_asm!(".extern .shared .align 16 .b8 WEAVE_SMEM[];");

/// Generic pointer to the dynamic shared memory.
#[inline(always)]
unsafe fn smem() -> *mut f32 {
    let p: u64;
    unsafe { core::arch::asm!("cvta.shared.u64 {p}, WEAVE_SMEM;", p = out(reg64) p) };
    p as *mut f32
}

#[inline(always)]
fn tid() -> u32 {
    unsafe { _thread_idx_x() as u32 }
}
#[inline(always)]
fn bx() -> u32 {
    unsafe { _block_idx_x() as u32 }
}
#[inline(always)]
fn by() -> u32 {
    unsafe { _block_idx_y() as u32 }
}
#[inline(always)]
fn bz() -> u32 {
    unsafe { _block_idx_z() as u32 }
}

#[inline(always)]
fn warp_max(mut v: f32) -> f32 {
    let mut o = 16;
    while o > 0 {
        v = max(v, unsafe { shfl_bfly_f32(FULL, v, o, 0x1f) });
        o >>= 1;
    }
    v
}

// ---------------------------------------------------------------- KV-cache write

#[inline(always)]
unsafe fn reshape_and_cache<T: Elem>(k: *const T, v: *const T, kc: *mut T, vc: *mut T, slots: *const u32, row: u32) {
    let token = bx() as usize;
    let slot = unsafe { *slots.add(token) };
    if slot == u32::MAX {
        return;
    }
    let (src, dst) = (token * row as usize, slot as usize * row as usize);
    let mut i = tid();
    while i < row {
        unsafe {
            *kc.add(dst + i as usize) = *k.add(src + i as usize);
            *vc.add(dst + i as usize) = *v.add(src + i as usize);
        }
        i += THREADS;
    }
}

// ---------------------------------------------------------------- paged attention

/// Scalars of an attention launch, in kernel-parameter order.
#[derive(Clone, Copy)]
struct AttnArgs {
    num_tokens: u32,
    nq: u32,
    nkv: u32,
    bs: u32,
    max_bps: u32,
    bps: u32,
    num_splits: u32,
    scale: f32,
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn paged_attention<T: Elem, const DL: usize, const PIPE: bool>(
    out: *mut T,
    partials: *mut f32,
    q: *const T,
    kc: *const T,
    vc: *const T,
    tiles: *const u32,
    qsl: *const u32,
    ctx_lens: *const u32,
    block_tables: *const u32,
    a: AttnArgs,
) {
    let d = (DL * 32) as u32;
    let (t, warp, lane) = (tid(), tid() / 32, tid() % 32);
    let (tile, kv_head, split) = (bx(), by(), bz());
    unsafe {
        let seq = *tiles.add(2 * tile as usize);
        let q0 = *tiles.add(2 * tile as usize + 1);
        let qstart = *qsl.add(seq as usize);
        let qlen = *qsl.add(seq as usize + 1) - qstart;
        let ctx = *ctx_lens.add(seq as usize);
        let g = udiv(a.nq, a.nkv);
        let tq = if g >= ROWS_PER_TILE { 1 } else { udiv(ROWS_PER_TILE, g) };
        let ntok = if qlen - q0 < tq { qlen - q0 } else { tq };
        let rows = ntok * g;
        let (first, end) = split_blocks(split, a.bps, a.bs, ctx + q0 + ntok);

        let sq = smem();
        let sk = sq.add((ROWS_PER_TILE * d) as usize);
        // The pipelined variant sizes K and V's staging by the launch's block size (the host
        // gives it `attention_smem_bytes_for(d, bs)`), so more thread blocks fit an SM.
        let kv_rows = if PIPE { a.bs } else { MAX_BLOCK_SIZE };
        let sv = sk.add((kv_rows * (d + 1)) as usize);
        // Stage the tile's query rows, pre-scaled.
        let mut i = t;
        while i < rows * d {
            let (r, dd) = (i / d, i % d); // d is a constant
            let token = qstart + q0 + udiv(r, g);
            let head = kv_head * g + urem(r, g);
            *sq.add(i as usize) = (*q.add(((token * a.nq + head) * d + dd) as usize)).to_f32() * a.scale;
            i += THREADS;
        }

        let table = block_tables.add((seq * a.max_bps) as usize);
        // Four rows per warp, as four separate locals, each touched with a constant name
        // (`rows4!` expands the body once per row), so their state stays in registers.
        let (mut s0, mut s1, mut s2, mut s3) =
            (RowState::<DL>::new(), RowState::<DL>::new(), RowState::<DL>::new(), RowState::<DL>::new());
        macro_rules! rows4 {
            (|$s:ident, $r:ident| $body:block) => {{
                let ($s, $r) = (&mut s0, warp);
                $body
            }
            {
                let ($s, $r) = (&mut s1, warp + WARPS);
                $body
            }
            {
                let ($s, $r) = (&mut s2, warp + 2 * WARPS);
                $body
            }
            {
                let ($s, $r) = (&mut s3, warp + 3 * WARPS);
                $body
            }};
        }
        // 16-bit caches in the pipelined variant: each thread holds its share of the next
        // block's K and V (16-byte loads, at most VEC_SLOTS a thread) in registers while the
        // warps work on the staged block, so the loads' latency hides behind the math.
        let vec16 = PIPE && core::mem::size_of::<T>() == 2;
        let mut rk = [[0u32; 4]; VEC_SLOTS];
        let mut rv = [[0u32; 4]; VEC_SLOTS];
        let nvec = a.bs * (d / 8);
        if vec16 && first < end {
            load_block(&mut rk, &mut rv, kc, vc, *table.add(first as usize), a, kv_head, d, nvec, t);
        }
        let mut j = first;
        while j < end {
            _syncthreads(); // the previous block's readers are done (and Q is staged)
            if vec16 {
                store_block::<T>(&rk, &rv, sk, sv, d, nvec, t);
                if j + 1 < end {
                    load_block(&mut rk, &mut rv, kc, vc, *table.add(j as usize + 1), a, kv_head, d, nvec, t);
                }
                j += 1;
                _syncthreads();
                let j = j - 1;
                rows4!(|s, r| {
                    if r < rows {
                        s.attend_block::<DL>(
                            sq.add((r * d) as usize),
                            sk,
                            sv,
                            a.bs,
                            j * a.bs,
                            ctx + q0 + udiv(r, g) + 1,
                            lane,
                        );
                    }
                });
                continue;
            }
            let phys = *table.add(j as usize);
            let mut i = t;
            while i < a.bs * d {
                let (kt, dd) = (i / d, i % d); // d is a constant
                let o = (((phys * a.bs + kt) * a.nkv + kv_head) * d + dd) as usize;
                *sk.add((kt * (d + 1) + dd) as usize) = (*kc.add(o)).to_f32();
                *sv.add(i as usize) = (*vc.add(o)).to_f32();
                i += THREADS;
            }
            _syncthreads();
            rows4!(|s, r| {
                if r < rows {
                    s.attend_block::<DL>(
                        sq.add((r * d) as usize),
                        sk,
                        sv,
                        a.bs,
                        j * a.bs,
                        ctx + q0 + udiv(r, g) + 1,
                        lane,
                    );
                }
            });
            j += 1;
        }
        rows4!(|s, r| {
            if r < rows {
                let token = qstart + q0 + udiv(r, g);
                let head = kv_head * g + urem(r, g);
                if a.num_splits == 1 {
                    let inv = 1.0 / s.l;
                    let o = out.add(((token * a.nq + head) * d + lane) as usize);
                    for e in 0..DL {
                        *o.add(32 * e) = T::from_f32(s.acc[e] * inv);
                    }
                } else {
                    let po = partials.add((((split * a.num_tokens + token) * a.nq + head) * (d + 2)) as usize);
                    if lane == 0 {
                        *po = s.m;
                        *po.add(1) = s.l;
                    }
                    for e in 0..DL {
                        *po.add(2 + lane as usize + 32 * e) = s.acc[e];
                    }
                }
            }
        });
    }
}

/// 16-byte vectors of one KV block a thread holds: a block of up to `MAX_BLOCK_SIZE` tokens
/// of a 128-wide head in 16-bit values is 512 vectors of K, 4 for each of 128 threads.
const VEC_SLOTS: usize = (MAX_BLOCK_SIZE * 128 / 8 / THREADS) as usize;

/// 16 bytes from global memory through the read-only path (the KV cache does not change
/// during the launch). `p` is 16-byte aligned: head rows are multiples of 8 values.
#[inline(always)]
unsafe fn ld_v4(p: *const u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    unsafe {
        core::arch::asm!(
            "{{ .reg .u64 g; cvta.to.global.u64 g, {p}; ld.global.nc.v4.u32 {{{a}, {b}, {c}, {d}}}, [g]; }}",
            p = in(reg64) p as u64,
            a = out(reg32) a,
            b = out(reg32) b,
            c = out(reg32) c,
            d = out(reg32) d,
        )
    };
    [a, b, c, d]
}

/// This thread's vectors of block `phys`'s K and V rows for `kv_head`: vector `i` (of
/// `nvec`, `d / 8` a token) holds values `8 (i % (d/8))..` of token `i / (d/8)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn load_block<T: Elem>(
    rk: &mut [[u32; 4]; VEC_SLOTS],
    rv: &mut [[u32; 4]; VEC_SLOTS],
    kc: *const T,
    vc: *const T,
    phys: u32,
    a: AttnArgs,
    kv_head: u32,
    d: u32,
    nvec: u32,
    t: u32,
) {
    let per_tok = d / 8;
    for s in 0..VEC_SLOTS {
        let i = t + s as u32 * THREADS;
        if i < nvec {
            let (kt, dv) = (i / per_tok, i % per_tok);
            let o = (((phys * a.bs + kt) * a.nkv + kv_head) * d + dv * 8) as usize;
            unsafe {
                rk[s] = ld_v4(kc.add(o) as *const u32);
                rv[s] = ld_v4(vc.add(o) as *const u32);
            }
        }
    }
}

/// Widens the held vectors to f32 into the staging buffers: K at row stride `d + 1` (the
/// lanes scoring 32 keys hit 32 banks), V at `d`.
#[inline(always)]
unsafe fn store_block<T: Elem>(
    rk: &[[u32; 4]; VEC_SLOTS],
    rv: &[[u32; 4]; VEC_SLOTS],
    sk: *mut f32,
    sv: *mut f32,
    d: u32,
    nvec: u32,
    t: u32,
) {
    let per_tok = d / 8;
    for s in 0..VEC_SLOTS {
        let i = t + s as u32 * THREADS;
        if i < nvec {
            let (kt, dv) = (i / per_tok, i % per_tok);
            for e in 0..8 {
                let shift = 16 * (e % 2);
                // SAFETY: T is a 16-bit storage type here (f16 or bf16 bits).
                let kh: T = unsafe { core::mem::transmute_copy(&((rk[s][e / 2] >> shift) as u16)) };
                let vh: T = unsafe { core::mem::transmute_copy(&((rv[s][e / 2] >> shift) as u16)) };
                unsafe {
                    *sk.add((kt * (d + 1) + dv * 8) as usize + e) = kh.to_f32();
                    *sv.add((kt * d + dv * 8) as usize + e) = vh.to_f32();
                }
            }
        }
    }
}

/// One query row's online-softmax state, spread over a warp: lane `x` owns output dims
/// `x, x + 32, ...`.
#[derive(Clone, Copy)]
struct RowState<const DL: usize> {
    m: f32,
    l: f32,
    acc: [f32; DL],
}

impl<const DL: usize> RowState<DL> {
    #[inline(always)]
    fn new() -> Self {
        RowState { m: f32::NEG_INFINITY, l: 0.0, acc: [0.0; DL] }
    }

    /// Folds one staged KV block into the row: lane `t` scores key `first_key + t`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend_block<const DL2: usize>(
        &mut self,
        qr: *const f32,
        sk: *const f32,
        sv: *const f32,
        bs: u32,
        first_key: u32,
        visible: u32,
        lane: u32,
    ) {
        let d = (DL * 32) as u32;
        let mut s = f32::NEG_INFINITY;
        if lane < bs && first_key + lane < visible {
            let kr = unsafe { sk.add((lane * (d + 1)) as usize) };
            let mut dot = 0.0;
            let mut e = 0;
            while e < d as usize {
                dot += unsafe { *qr.add(e) * *kr.add(e) };
                e += 1;
            }
            s = dot;
        }
        let bmax = warp_max(s);
        if bmax == f32::NEG_INFINITY {
            return; // every key of the block is masked for this row
        }
        let m_new = max(self.m, bmax);
        let alpha = if self.m == f32::NEG_INFINITY { 0.0 } else { exp(self.m - m_new) };
        let p = if s == f32::NEG_INFINITY { 0.0 } else { exp(s - m_new) };
        self.l = self.l * alpha + warp_sum(p);
        for e in 0..DL {
            self.acc[e] *= alpha;
        }
        let mut kt = 0;
        while kt < bs {
            let pt = unsafe { shfl_idx_f32(FULL, p, kt, 0x1f) };
            let vr = unsafe { sv.add((kt * d + lane) as usize) };
            for e in 0..DL {
                self.acc[e] += pt * unsafe { *vr.add(32 * e) };
            }
            kt += 1;
        }
        self.m = m_new;
    }
}

#[inline(always)]
unsafe fn attention_reduce<T: Elem, const DL: usize>(
    out: *mut T,
    partials: *const f32,
    num_tokens: u32,
    nq: u32,
    num_splits: u32,
) {
    let d = (DL * 32) as u32;
    let (token, head, lane) = (bx(), by(), tid());
    let row = |s: u32| unsafe { partials.add((((s * num_tokens + token) * nq + head) * (d + 2)) as usize) };
    let mut gm = f32::NEG_INFINITY;
    for s in 0..num_splits {
        gm = max(gm, unsafe { *row(s) });
    }
    let mut l = 0.0;
    let mut acc = [0.0f32; DL];
    for s in 0..num_splits {
        let p = row(s);
        let ls = unsafe { *p.add(1) };
        if ls == 0.0 {
            continue;
        }
        let w = exp(unsafe { *p } - gm);
        l += ls * w;
        for e in 0..DL {
            acc[e] += unsafe { *p.add(2 + lane as usize + 32 * e) } * w;
        }
    }
    let inv = 1.0 / l;
    let o = unsafe { out.add(((token * nq + head) * d + lane) as usize) };
    for e in 0..DL {
        unsafe { *o.add(32 * e) = T::from_f32(acc[e] * inv) };
    }
}

// ---------------------------------------------------------------- rope, mlp, sampling
// (the norms are in kernels/norm.rs, over the gpu seam)

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rotary_embedding<T: Elem>(
    q: *mut T,
    k: *mut T,
    positions: *const u32,
    cos_sin: *const f32,
    nq: u32,
    nk: u32,
    head_dim: u32,
    rot_dim: u32,
    layout: u32,
) {
    let token = bx();
    let layout = if layout == 0 { RopeLayout::Interleaved } else { RopeLayout::Neox };
    let half = rot_dim / 2;
    unsafe {
        let row = cos_sin.add((*positions.add(token as usize) * rot_dim) as usize);
        let mut i = tid();
        while i < (nq + nk) * half {
            let (h, p) = (udiv(i, half), urem(i, half));
            let x = if h < nq {
                q.add(((token * nq + h) * head_dim) as usize)
            } else {
                k.add(((token * nk + h - nq) * head_dim) as usize)
            };
            let (ia, ib) = layout.pair(p as usize, rot_dim as usize);
            let (y0, y1) = rope_pair(
                (*x.add(ia)).to_f32(),
                (*x.add(ib)).to_f32(),
                *row.add(p as usize),
                *row.add((half + p) as usize),
            );
            *x.add(ia) = T::from_f32(y0);
            *x.add(ib) = T::from_f32(y1);
            i += THREADS;
        }
    }
}

#[inline(always)]
unsafe fn silu_and_mul<T: Elem>(out: *mut T, x: *const T, inter: u32) {
    let (src, dst) = ((bx() * 2 * inter) as usize, (bx() * inter) as usize);
    let mut i = tid();
    while i < inter {
        unsafe {
            let gate = (*x.add(src + i as usize)).to_f32();
            let up = (*x.add(src + (inter + i) as usize)).to_f32();
            *out.add(dst + i as usize) = T::from_f32(silu(gate) * up);
        }
        i += THREADS;
    }
}

#[inline(always)]
unsafe fn embedding<T: Elem>(out: *mut T, table: *const T, ids: *const u32, hidden: u32) {
    unsafe {
        let src = (*ids.add(bx() as usize) * hidden) as usize;
        let dst = (bx() * hidden) as usize;
        let mut i = tid();
        while i < hidden {
            *out.add(dst + i as usize) = *table.add(src + i as usize);
            i += THREADS;
        }
    }
}

/// Block-wide (value, index) maximum, ties to the lower index (`argmax_pick`); every thread
/// gets it. Ends on a barrier, so it may run again at once (as may [`block_sum_sync`]).
#[inline(always)]
unsafe fn block_argmax(mut best: (f32, u32)) -> (f32, u32) {
    let mut o = 16;
    while o > 0 {
        let v = unsafe { shfl_bfly_f32(FULL, best.0, o, 0x1f) };
        let ix = unsafe { shfl_bfly_i32(FULL, best.1 as i32, o, 0x1f) } as u32;
        best = argmax_pick(best, (v, ix));
        o >>= 1;
    }
    let s = unsafe { smem() };
    let si = s as *mut u32;
    if tid() % 32 == 0 {
        unsafe {
            *s.add((tid() / 32) as usize) = best.0;
            *si.add((WARPS + tid() / 32) as usize) = best.1;
        }
    }
    unsafe { _syncthreads() };
    let mut b = unsafe { (*s, *si.add(WARPS as usize)) };
    for w in 1..WARPS as usize {
        b = argmax_pick(b, unsafe { (*s.add(w), *si.add(WARPS as usize + w)) });
    }
    unsafe { _syncthreads() };
    b
}

/// [`block_sum`] followed by a barrier, for reductions in a loop: no warp writes the next
/// partials before every warp has read these.
#[inline(always)]
unsafe fn block_sum_sync(v: f32) -> f32 {
    let t = unsafe { block_sum(v) };
    unsafe { _syncthreads() };
    t
}

#[inline(always)]
unsafe fn argmax(out: *mut u32, logits: *const f32, vocab: u32) {
    let base = (bx() * vocab) as usize;
    let mut best = (f32::NEG_INFINITY, u32::MAX);
    let mut i = tid();
    while i < vocab {
        best = argmax_pick(best, (unsafe { *logits.add(base + i as usize) }, i));
        i += THREADS;
    }
    let b = unsafe { block_argmax(best) };
    if tid() == 0 {
        unsafe { *out.add(bx() as usize) = b.1 };
    }
}

// ---------------------------------------------------------------- sampling

/// One row of `sample_f32`: `crate::sample::sample_row` with block reductions. Writes the
/// token and its logprob under the raw logits.
#[inline(always)]
unsafe fn sample(out: *mut u32, out_logprob: *mut f32, logits: *const f32, params: *const u32, vocab: u32) {
    let r = bx() as usize;
    let row = unsafe { logits.add(r * vocab as usize) };
    let pw = unsafe { params.add(r * PARAM_WORDS) };
    let p = unsafe { RowParams::from_words(&[*pw, *pw.add(1), *pw.add(2), *pw.add(3), *pw.add(4), *pw.add(5)]) };
    let at = |i: u32| unsafe { *row.add(i as usize) };
    let mut best = (f32::NEG_INFINITY, u32::MAX);
    let mut i = tid();
    while i < vocab {
        best = argmax_pick(best, (at(i), i));
        i += THREADS;
    }
    let best = unsafe { block_argmax(best) };
    let m = best.0;
    let mut s = 0.0;
    let mut i = tid();
    while i < vocab {
        s += exp(at(i) - m);
        i += THREADS;
    }
    let lse = m + ln(unsafe { block_sum_sync(s) });
    let mut tok = best.1;
    if !p.greedy() {
        // Every branch below depends only on the row's parameters and block-wide results,
        // so all threads take it together and meet at each reduction's barriers.
        let tau_k = if p.top_k > 0 && p.top_k < vocab {
            bisect_key(0, |c| {
                let mut n = 0u32;
                let mut i = tid();
                while i < vocab {
                    n += u32::from(ord_key(at(i)) >= c);
                    i += THREADS;
                }
                (unsafe { block_sum_sync(n as f32) }) >= p.top_k as f32
            })
        } else {
            0
        };
        let inv_t = 1.0 / p.temperature;
        let mass = |c: u32| {
            let mut acc = 0.0;
            let mut i = tid();
            while i < vocab {
                let x = at(i);
                if ord_key(x) >= c {
                    acc += weight(x, m, inv_t);
                }
                i += THREADS;
            }
            unsafe { block_sum_sync(acc) }
        };
        let tau = if p.top_p < 1.0 {
            let target = p.top_p * mass(tau_k);
            bisect_key(tau_k, |c| mass(c) >= target)
        } else {
            tau_k
        };
        let mut win = (f32::NEG_INFINITY, u32::MAX);
        let mut i = tid();
        while i < vocab {
            let x = at(i);
            if ord_key(x) >= tau {
                win = argmax_pick(win, (race_score(x, m, inv_t, uniform_open(p.seed, p.counter, i)), i));
            }
            i += THREADS;
        }
        tok = unsafe { block_argmax(win) }.1;
    }
    // A row of NaNs has no winner: token 0, as the host reference.
    if tok >= vocab {
        tok = 0;
    }
    if tid() == 0 {
        unsafe {
            *out.add(r) = tok;
            *out_logprob.add(r) = at(tok) - lse;
        }
    }
}

// ---------------------------------------------------------------- dummy weights

/// `out[i] = dummy_value(seed, i, scale)` for `i < n`, grid-stride.
#[inline(always)]
unsafe fn fill_dummy<T: Elem>(out: *mut T, n: u64, seed: u64, scale: f32) {
    let stride = unsafe { _grid_dim_x() } as u64 * THREADS as u64;
    let mut i = bx() as u64 * THREADS as u64 + tid() as u64;
    while i < n {
        unsafe { *out.add(i as usize) = T::from_f32(dummy_value(seed, i, scale)) };
        i += stride;
    }
}

// ---------------------------------------------------------------- decode attention

/// Paged attention for decode rows (sequences that bring one token), bandwidth-first: a thread
/// block is one sequence, one query head and one split; its four warps take the split's KV
/// blocks in turn. Within a warp, `LPT = d / 8` lanes share a key row and each holds 8
/// contiguous values of it (one 16-byte load), so a warp step reads `32 / LPT` whole rows of K
/// and of V coalesced; the row's dot is summed over those lanes by shuffles, the softmax is
/// online over the warp, and each lane accumulates its 8 output values. The warps' states are
/// merged through shared memory at the end. 16-bit caches only (the loads are 8 values wide).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn paged_decode<T: Elem, const LPT: u32>(
    out: *mut T,
    partials: *mut f32,
    q: *const T,
    kc: *const T,
    vc: *const T,
    tiles: *const u32,
    qsl: *const u32,
    ctx_lens: *const u32,
    block_tables: *const u32,
    a: AttnArgs,
) {
    let d = LPT * 8;
    let tpw = 32 / LPT; // key rows a warp reads per step
    let (warp, lane) = (tid() / 32, tid() % 32);
    let (row_in_step, part) = (lane / LPT, lane % LPT); // which row of the step, which 8 values
    let (tile, head, split) = (bx(), by(), bz());
    unsafe {
        let seq = *tiles.add(2 * tile as usize);
        let token = *qsl.add(seq as usize);
        let ctx = *ctx_lens.add(seq as usize);
        let visible = ctx + 1;
        let kv_head = udiv(head, udiv(a.nq, a.nkv));
        let (first, end) = split_blocks(split, a.bps, a.bs, visible);
        let unpack = |w: [u32; 4], out: &mut [f32; 8]| {
            for e in 0..8 {
                // SAFETY: T is a 16-bit storage type here.
                let h: T = core::mem::transmute_copy(&((w[e / 2] >> (16 * (e % 2))) as u16));
                out[e] = h.to_f32();
            }
        };
        // This lane's 8 query values, pre-scaled.
        let mut qv = [0f32; 8];
        unpack(ld_v4(q.add(((token * a.nq + head) * d + part * 8) as usize) as *const u32), &mut qv);
        for x in qv.iter_mut() {
            *x *= a.scale;
        }
        let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
        let mut acc = [0f32; 8];
        let table = block_tables.add((seq * a.max_bps) as usize);
        let mut j = first + warp;
        while j < end {
            let phys = *table.add(j as usize);
            let mut t0 = 0;
            while t0 < a.bs {
                let t = t0 + row_in_step;
                let key = j * a.bs + t;
                let valid = t < a.bs && key < visible;
                let (mut kf, mut vf) = ([0f32; 8], [0f32; 8]);
                if valid {
                    let o = (((phys * a.bs + t) * a.nkv + kv_head) * d + part * 8) as usize;
                    unpack(ld_v4(kc.add(o) as *const u32), &mut kf);
                    unpack(ld_v4(vc.add(o) as *const u32), &mut vf);
                }
                let mut dot = 0f32;
                for e in 0..8 {
                    dot += qv[e] * kf[e];
                }
                // The row's lanes are LPT consecutive lanes: xor over the low bits sums them.
                let mut o = LPT / 2;
                while o > 0 {
                    dot += shfl_bfly_f32(FULL, dot, o, 0x1f);
                    o >>= 1;
                }
                let s = if valid { dot } else { f32::NEG_INFINITY };
                // The step's max over its rows (lanes LPT apart), then the online update.
                let mut smax = s;
                let mut o = 16;
                while o >= LPT {
                    smax = max(smax, shfl_bfly_f32(FULL, smax, o, 0x1f));
                    o >>= 1;
                }
                if smax != f32::NEG_INFINITY {
                    let m_new = max(m, smax);
                    let alpha = if m == f32::NEG_INFINITY { 0.0 } else { exp(m - m_new) };
                    let p = if valid { exp(s - m_new) } else { 0.0 };
                    // Each row's p counted once: its lanes share it, so sum over rows only.
                    let mut psum = p;
                    let mut o = 16;
                    while o >= LPT {
                        psum += shfl_bfly_f32(FULL, psum, o, 0x1f);
                        o >>= 1;
                    }
                    l = l * alpha + psum;
                    for e in 0..8 {
                        acc[e] = acc[e] * alpha + p * vf[e];
                    }
                    m = m_new;
                }
                t0 += tpw;
            }
            j += WARPS;
        }
        // Rows of a step sat in different lanes: add the accumulators of lanes holding the
        // same 8 values (same `part`), which share m.
        let mut o = 16;
        while o >= LPT {
            for e in 0..8 {
                acc[e] += shfl_bfly_f32(FULL, acc[e], o, 0x1f);
            }
            o >>= 1;
        }
        // Merge the four warps: each leaves (m, l) and its d values in shared memory.
        let sm = smem();
        let stride = d + 2;
        let mine = sm.add((warp * stride) as usize);
        if lane == 0 {
            *mine = m;
            *mine.add(1) = l;
        }
        if lane < LPT {
            for e in 0..8 {
                *mine.add((2 + lane * 8) as usize + e) = acc[e];
            }
        }
        _syncthreads();
        if warp == 0 {
            let mut gm = f32::NEG_INFINITY;
            for w in 0..WARPS {
                gm = max(gm, *sm.add((w * stride) as usize));
            }
            let mut gl = 0f32;
            let mut ga = [0f32; 8];
            for w in 0..WARPS {
                let st = sm.add((w * stride) as usize);
                let wl = *st.add(1);
                if wl == 0.0 {
                    continue;
                }
                let f = exp(*st - gm);
                gl += wl * f;
                if lane < LPT {
                    for e in 0..8 {
                        ga[e] += *st.add((2 + lane * 8) as usize + e) * f;
                    }
                }
            }
            if lane < LPT {
                if a.num_splits == 1 {
                    let inv = if gl > 0.0 { 1.0 / gl } else { 0.0 };
                    let base = ((token * a.nq + head) * d + lane * 8) as usize;
                    for e in 0..8 {
                        *out.add(base + e) = T::from_f32(ga[e] * inv);
                    }
                } else {
                    let po = partials.add((((split * a.num_tokens + token) * a.nq + head) * stride) as usize);
                    if lane == 0 {
                        *po = gm;
                        *po.add(1) = gl;
                    }
                    for e in 0..8 {
                        *po.add((2 + lane * 8) as usize + e) = ga[e];
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- tensor-core attention

/// `d += a * b` on tensor cores: one m16n8k16 MMA, 16-bit inputs (f16 or bf16 by `T`), f32
/// accumulators. `a` holds the 16x16 row-major fragment, `b` the 16x8 column-major one, in
/// PTX's per-lane layout.
#[inline(always)]
unsafe fn mma_16816<T: Elem>(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
    macro_rules! mma {
        ($ty:literal) => {
            unsafe {
                core::arch::asm!(
                    concat!(
                        "mma.sync.aligned.m16n8k16.row.col.f32.",
                        $ty,
                        ".",
                        $ty,
                        ".f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};"
                    ),
                    d0 = inout(reg32) d[0],
                    d1 = inout(reg32) d[1],
                    d2 = inout(reg32) d[2],
                    d3 = inout(reg32) d[3],
                    a0 = in(reg32) a[0],
                    a1 = in(reg32) a[1],
                    a2 = in(reg32) a[2],
                    a3 = in(reg32) a[3],
                    b0 = in(reg32) b[0],
                    b1 = in(reg32) b[1],
                )
            }
        };
    }
    if matches!(T::DTYPE, crate::kernel::Dtype::Bf16) {
        mma!("bf16")
    } else {
        mma!("f16")
    }
}

/// Two values as one 32-bit register of `T`s: `lo` in the low half (the lower column).
#[inline(always)]
fn pack2<T: Elem>(lo: f32, hi: f32) -> u32 {
    // SAFETY: T is a 16-bit storage type in the tensor-core kernel.
    let (l, h): (u16, u16) =
        unsafe { (core::mem::transmute_copy(&T::from_f32(lo)), core::mem::transmute_copy(&T::from_f32(hi))) };
    l as u32 | (h as u32) << 16
}

#[inline(always)]
fn xor_max(v: f32) -> f32 {
    let v = max(v, unsafe { shfl_bfly_f32(FULL, v, 1, 0x1f) });
    max(v, unsafe { shfl_bfly_f32(FULL, v, 2, 0x1f) })
}

#[inline(always)]
fn xor_sum(v: f32) -> f32 {
    let v = v + unsafe { shfl_bfly_f32(FULL, v, 1, 0x1f) };
    v + unsafe { shfl_bfly_f32(FULL, v, 2, 0x1f) }
}

/// Paged attention on tensor cores for the rows of prefill chunks (FlashAttention-2's loop).
/// A thread block is [`MMA_TILE_TOKENS`] query tokens of one sequence and one query head; warp
/// `w` owns tokens `16w..16w+16` of the tile. The context is walked 16 keys at a time (a
/// whole sub-block of a paged block, so `block_size` is a multiple of 16): K and V are staged
/// in shared memory (K row-major with 8 values of padding, V transposed, both so the lanes'
/// 32-bit fragment loads hit 32 banks), S = QK^T and O += PV are MMAs, the softmax is online
/// in f32 registers, P goes from S's accumulators to the next MMA's A fragment without
/// leaving registers. Each lane of a warp holds rows `group` and `group + 8` (lane / 4) and
/// columns `2 (lane % 4)` and `+1` (and `+8`) of every fragment.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn paged_attention_mma<T: Elem, const KS: usize, const NT: usize>(
    out: *mut T,
    q: *const T,
    kc: *const T,
    vc: *const T,
    tiles: *const u32,
    qsl: *const u32,
    ctx_lens: *const u32,
    block_tables: *const u32,
    a: AttnArgs,
) {
    // KS = d / 16 k-steps of QK^T, NT = d / 8 n-tiles of PV. Every loop over them is unrolled
    // (build-ptx raises LLVM's unroll threshold), so the accumulators stay in registers.
    let d = (KS * 16) as u32;
    let kstride = d + 8; // K staging row, in 16-bit values
    const VT_STRIDE: u32 = 24; // V^T staging row: 16 keys and 8 of padding
    let (t, warp, lane) = (tid(), tid() / 32, tid() % 32);
    let (group, tig) = (lane / 4, lane % 4);
    let (tile, head) = (bx(), by());
    unsafe {
        let seq = *tiles.add(2 * tile as usize);
        let q0 = *tiles.add(2 * tile as usize + 1);
        let qstart = *qsl.add(seq as usize);
        let qlen = *qsl.add(seq as usize + 1) - qstart;
        let ctx = *ctx_lens.add(seq as usize);
        let ntok = if qlen - q0 < MMA_TILE_TOKENS { qlen - q0 } else { MMA_TILE_TOKENS };
        let kv_head = udiv(head, udiv(a.nq, a.nkv));
        let wt0 = q0 + warp * 16; // the warp's first token in the sequence's chunk
        let tok_end = q0 + ntok;

        // Q as the A fragments of every k-step, for the lane's two rows.
        let mut qf = [[0u32; 4]; KS];
        let q_at = |tok: u32, col: u32| -> u32 {
            if tok < tok_end {
                *(q.add((((qstart + tok) * a.nq + head) * d + col) as usize) as *const u32)
            } else {
                0
            }
        };
        for (ks, f) in qf.iter_mut().enumerate() {
            let c = ks as u32 * 16 + tig * 2;
            *f = [
                q_at(wt0 + group, c),
                q_at(wt0 + group + 8, c),
                q_at(wt0 + group, c + 8),
                q_at(wt0 + group + 8, c + 8),
            ];
        }
        let mut o = [[0f32; 4]; NT];
        let (mut m0, mut m1) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        let (mut l0, mut l1) = (0f32, 0f32);
        // Keys row `group` sees (and row `group + 8`, 8 more).
        let vis0 = ctx + wt0 + group + 1;
        let vis1 = vis0 + 8;
        let warp_keys = ctx + wt0 + 16; // no row of the warp sees a key at or past this
        let kv_end = ctx + tok_end;

        let ks_s = smem() as *mut u16;
        let vt_s = ks_s.add((16 * kstride) as usize);
        let table = block_tables.add((seq * a.max_bps) as usize);
        let nvec = 16 * d / 8; // 16-byte vectors of a 16-key sub-block, per tensor
        let mut sb = 0;
        while sb * 16 < kv_end {
            let key0 = sb * 16;
            let phys = *table.add(udiv(key0, a.bs) as usize);
            let off = urem(key0, a.bs);
            _syncthreads(); // the previous sub-block's readers are done
            let mut i = t;
            while i < nvec {
                let (kt, dv) = (i / (d / 8), i % (d / 8));
                let go = (((phys * a.bs + off + kt) * a.nkv + kv_head) * d + dv * 8) as usize;
                let kv = ld_v4(kc.add(go) as *const u32);
                let kd = ks_s.add((kt * kstride + dv * 8) as usize) as *mut u32;
                for w in 0..4 {
                    *kd.add(w) = kv[w];
                }
                let vv = ld_v4(vc.add(go) as *const u32);
                for e in 0..8u32 {
                    *vt_s.add(((dv * 8 + e) * VT_STRIDE + kt) as usize) =
                        (vv[(e / 2) as usize] >> (16 * (e % 2))) as u16;
                }
                i += THREADS;
            }
            _syncthreads();
            if key0 < warp_keys {
                // S = Q K^T for keys key0..key0+16: two n-tiles of 8 keys.
                let mut sc = [[0f32; 4]; 2];
                for (nt, acc) in sc.iter_mut().enumerate() {
                    let kr = ks_s.add(((nt as u32 * 8 + group) * kstride + tig * 2) as usize);
                    for (ks, f) in qf.iter().enumerate() {
                        let b = kr.add(ks * 16);
                        mma_16816::<T>(acc, *f, [*(b as *const u32), *(b.add(8) as *const u32)]);
                    }
                }
                // Scale and mask: column c of n-tile nt is key key0 + 8 nt + 2 tig + (c & 1);
                // entries 0, 1 are row `group`, 2, 3 row `group + 8`.
                for (nt, acc) in sc.iter_mut().enumerate() {
                    for (c, x) in acc.iter_mut().enumerate() {
                        let key = key0 + nt as u32 * 8 + tig * 2 + (c as u32 & 1);
                        let vis = if c < 2 { vis0 } else { vis1 };
                        *x = if key < vis { *x * a.scale } else { f32::NEG_INFINITY };
                    }
                }
                let mx0 = xor_max(max(max(sc[0][0], sc[0][1]), max(sc[1][0], sc[1][1])));
                let mx1 = xor_max(max(max(sc[0][2], sc[0][3]), max(sc[1][2], sc[1][3])));
                let (mn0, mn1) = (max(m0, mx0), max(m1, mx1));
                let alpha = |m: f32, mn: f32| if m == f32::NEG_INFINITY { 0.0 } else { exp(m - mn) };
                let (a0, a1) = (alpha(m0, mn0), alpha(m1, mn1));
                let pexp = |x: f32, mn: f32| if x == f32::NEG_INFINITY { 0.0 } else { exp(x - mn) };
                let mut p = [[0f32; 4]; 2];
                for nt in 0..2 {
                    p[nt] = [pexp(sc[nt][0], mn0), pexp(sc[nt][1], mn0), pexp(sc[nt][2], mn1), pexp(sc[nt][3], mn1)];
                }
                // Per-lane partial sums; the four lanes of a row add theirs at the end.
                l0 = l0 * a0 + p[0][0] + p[0][1] + p[1][0] + p[1][1];
                l1 = l1 * a1 + p[0][2] + p[0][3] + p[1][2] + p[1][3];
                m0 = mn0;
                m1 = mn1;
                for acc in o.iter_mut() {
                    acc[0] *= a0;
                    acc[1] *= a0;
                    acc[2] *= a1;
                    acc[3] *= a1;
                }
                // P (16 rows x 16 keys) as an A fragment: S's accumulators, narrowed.
                let pa = [
                    pack2::<T>(p[0][0], p[0][1]),
                    pack2::<T>(p[0][2], p[0][3]),
                    pack2::<T>(p[1][0], p[1][1]),
                    pack2::<T>(p[1][2], p[1][3]),
                ];
                // O += P V: n-tile nt is dims 8 nt..; B's column `group` is V^T's row.
                for (nt, acc) in o.iter_mut().enumerate() {
                    let vr = vt_s.add(((nt as u32 * 8 + group) * VT_STRIDE + tig * 2) as usize);
                    mma_16816::<T>(acc, pa, [*(vr as *const u32), *(vr.add(8) as *const u32)]);
                }
            }
            sb += 1;
        }
        let (l0, l1) = (xor_sum(l0), xor_sum(l1));
        let (inv0, inv1) = (if l0 > 0.0 { 1.0 / l0 } else { 0.0 }, if l1 > 0.0 { 1.0 / l1 } else { 0.0 });
        // Row `group` from accumulator entries 0 and 1, row `group + 8` from 2 and 3: each
        // written out with constant indices, so the accumulators stay in registers.
        let row0 = wt0 + group;
        if row0 < tok_end {
            let base = (((qstart + row0) * a.nq + head) * d + tig * 2) as usize;
            for (nt, acc) in o.iter().enumerate() {
                *(out.add(base + nt * 8) as *mut u32) = pack2::<T>(acc[0] * inv0, acc[1] * inv0);
            }
        }
        let row1 = row0 + 8;
        if row1 < tok_end {
            let base = (((qstart + row1) * a.nq + head) * d + tig * 2) as usize;
            for (nt, acc) in o.iter().enumerate() {
                *(out.add(base + nt * 8) as *mut u32) = pack2::<T>(acc[2] * inv1, acc[3] * inv1);
            }
        }
    }
}

// ---------------------------------------------------------------- exported entry points

macro_rules! typed_kernels {
    ($t:ty, $cache:ident, $rope:ident, $silu:ident, $emb:ident) => {
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $cache(
            k: *const $t,
            v: *const $t,
            kc: *mut $t,
            vc: *mut $t,
            slots: *const u32,
            row: u32,
        ) {
            unsafe { reshape_and_cache::<$t>(k, v, kc, vc, slots, row) }
        }
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $rope(
            q: *mut $t,
            k: *mut $t,
            positions: *const u32,
            cos_sin: *const f32,
            nq: u32,
            nk: u32,
            head_dim: u32,
            rot_dim: u32,
            layout: u32,
        ) {
            unsafe { rotary_embedding::<$t>(q, k, positions, cos_sin, nq, nk, head_dim, rot_dim, layout) }
        }
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $silu(out: *mut $t, x: *const $t, inter: u32) {
            unsafe { silu_and_mul::<$t>(out, x, inter) }
        }
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $emb(out: *mut $t, table: *const $t, ids: *const u32, hidden: u32) {
            unsafe { embedding::<$t>(out, table, ids, hidden) }
        }
    };
}

typed_kernels!(f32, reshape_and_cache_f32, rotary_embedding_f32, silu_and_mul_f32, embedding_f32);
typed_kernels!(F16, reshape_and_cache_f16, rotary_embedding_f16, silu_and_mul_f16, embedding_f16);
typed_kernels!(Bf16, reshape_and_cache_bf16, rotary_embedding_bf16, silu_and_mul_bf16, embedding_bf16);

macro_rules! attention_kernels {
    (@attn $t:ty, $f:path, $attn:ident) => {
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $attn(
            out: *mut $t,
            partials: *mut f32,
            q: *const $t,
            k_cache: *const $t,
            v_cache: *const $t,
            tiles: *const u32,
            query_start_loc: *const u32,
            context_lens: *const u32,
            block_tables: *const u32,
            num_tokens: u32,
            num_q_heads: u32,
            num_kv_heads: u32,
            block_size: u32,
            max_blocks_per_seq: u32,
            blocks_per_split: u32,
            num_splits: u32,
            scale: f32,
        ) {
            let a = AttnArgs {
                num_tokens,
                nq: num_q_heads,
                nkv: num_kv_heads,
                bs: block_size,
                max_bps: max_blocks_per_seq,
                bps: blocks_per_split,
                num_splits,
                scale,
            };
            unsafe {
                $f(
                    out,
                    partials,
                    q,
                    k_cache,
                    v_cache,
                    tiles,
                    query_start_loc,
                    context_lens,
                    block_tables,
                    a,
                )
            }
        }
    };
    ($t:ty, $dl:literal, $attn:ident, $reduce:ident) => {
        attention_kernels!(@attn $t, paged_attention::<$t, $dl, false>, $attn);
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $reduce(
            out: *mut $t,
            partials: *const f32,
            num_tokens: u32,
            num_q_heads: u32,
            num_splits: u32,
        ) {
            unsafe { attention_reduce::<$t, $dl>(out, partials, num_tokens, num_q_heads, num_splits) }
        }
    };
}

attention_kernels!(f32, 2, paged_attention_f32_d64, attention_reduce_f32_d64);
attention_kernels!(f32, 4, paged_attention_f32_d128, attention_reduce_f32_d128);
attention_kernels!(F16, 2, paged_attention_f16_d64, attention_reduce_f16_d64);
attention_kernels!(F16, 4, paged_attention_f16_d128, attention_reduce_f16_d128);
attention_kernels!(Bf16, 2, paged_attention_bf16_d64, attention_reduce_bf16_d64);
attention_kernels!(Bf16, 4, paged_attention_bf16_d128, attention_reduce_bf16_d128);
attention_kernels!(@attn F16, paged_attention::<F16, 2, true>, paged_attention_pipelined_f16_d64);
attention_kernels!(@attn F16, paged_attention::<F16, 4, true>, paged_attention_pipelined_f16_d128);
attention_kernels!(@attn Bf16, paged_attention::<Bf16, 2, true>, paged_attention_pipelined_bf16_d64);
attention_kernels!(@attn Bf16, paged_attention::<Bf16, 4, true>, paged_attention_pipelined_bf16_d128);

#[no_mangle]
pub unsafe extern "ptx-kernel" fn argmax_f32(out: *mut u32, logits: *const f32, vocab: u32) {
    unsafe { argmax(out, logits, vocab) }
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn sample_f32(
    out: *mut u32,
    out_logprob: *mut f32,
    logits: *const f32,
    params: *const u32,
    vocab: u32,
) {
    unsafe { sample(out, out_logprob, logits, params, vocab) }
}

macro_rules! fill_kernels {
    ($t:ty, $name:ident) => {
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(out: *mut $t, n: u64, seed: u64, scale: f32) {
            unsafe { fill_dummy::<$t>(out, n, seed, scale) }
        }
    };
}

fill_kernels!(f32, fill_dummy_f32);
fill_kernels!(F16, fill_dummy_f16);
fill_kernels!(Bf16, fill_dummy_bf16);

macro_rules! mma_kernels {
    ($t:ty, $ks:literal, $nt:literal, $name:ident) => {
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(
            out: *mut $t,
            q: *const $t,
            k_cache: *const $t,
            v_cache: *const $t,
            tiles: *const u32,
            query_start_loc: *const u32,
            context_lens: *const u32,
            block_tables: *const u32,
            num_tokens: u32,
            num_q_heads: u32,
            num_kv_heads: u32,
            block_size: u32,
            max_blocks_per_seq: u32,
            scale: f32,
        ) {
            let a = AttnArgs {
                num_tokens,
                nq: num_q_heads,
                nkv: num_kv_heads,
                bs: block_size,
                max_bps: max_blocks_per_seq,
                bps: 0,
                num_splits: 1,
                scale,
            };
            unsafe {
                paged_attention_mma::<$t, $ks, $nt>(
                    out,
                    q,
                    k_cache,
                    v_cache,
                    tiles,
                    query_start_loc,
                    context_lens,
                    block_tables,
                    a,
                )
            }
        }
    };
}

mma_kernels!(F16, 4, 8, paged_attention_mma_f16_d64);
mma_kernels!(F16, 8, 16, paged_attention_mma_f16_d128);
mma_kernels!(Bf16, 4, 8, paged_attention_mma_bf16_d64);
mma_kernels!(Bf16, 8, 16, paged_attention_mma_bf16_d128);

// The decode kernel takes the same parameters (one query head a thread block; see the launcher).
attention_kernels!(@attn F16, paged_decode::<F16, 8>, paged_decode_f16_d64);
attention_kernels!(@attn F16, paged_decode::<F16, 16>, paged_decode_f16_d128);
attention_kernels!(@attn Bf16, paged_decode::<Bf16, 8>, paged_decode_bf16_d64);
attention_kernels!(@attn Bf16, paged_decode::<Bf16, 16>, paged_decode_bf16_d128);
