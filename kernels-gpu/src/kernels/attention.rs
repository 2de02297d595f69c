//! Paged attention on CUDA cores, for any mix of prefill chunks and decodes: the staged kernel
//! (every cache type) and the pipelined one (16-bit caches: the next KV block held in
//! registers, 16-byte loads), and the reduce that merges split-KV partial results. The crate
//! doc describes the tiling; the launch shapes are the host's (`AttnShape`).

use super::reduce::{warp_max, warp_sum};
use crate::attention::{split_blocks, MAX_BLOCK_SIZE, ROWS_PER_TILE};
use crate::elem::{Bf16, Elem, F16};
use crate::fmath::{exp, max};
use crate::gpu::{self, Global, Shared, FULL};
use crate::{udiv, urem};

const THREADS: u32 = crate::BLOCK_THREADS;
const WARPS: u32 = THREADS / 32;

/// Scalars of an attention launch, in kernel-parameter order.
#[derive(Clone, Copy)]
pub(crate) struct AttnArgs {
    pub num_tokens: u32,
    pub nq: u32,
    pub nkv: u32,
    pub bs: u32,
    pub max_bps: u32,
    pub bps: u32,
    pub num_splits: u32,
    pub scale: f32,
}

/// The buffers of an attention launch, in kernel-parameter order (`partials` unused by the
/// tensor-core kernel).
#[derive(Clone, Copy)]
pub(crate) struct AttnBufs<T> {
    pub out: Global<T>,
    pub partials: Global<f32>,
    pub q: Global<T>,
    pub kc: Global<T>,
    pub vc: Global<T>,
    pub tiles: Global<u32>,
    pub qsl: Global<u32>,
    pub ctx_lens: Global<u32>,
    pub block_tables: Global<u32>,
}

impl<T: Copy> AttnBufs<T> {
    /// From an entry point's pointer parameters, in their order.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        out: *mut T,
        partials: *mut f32,
        q: *const T,
        kc: *const T,
        vc: *const T,
        tiles: *const u32,
        qsl: *const u32,
        ctx_lens: *const u32,
        block_tables: *const u32,
    ) -> AttnBufs<T> {
        AttnBufs {
            out: Global::new(out),
            partials: Global::new(partials),
            q: Global::new(q),
            kc: Global::new(kc),
            vc: Global::new(vc),
            tiles: Global::new(tiles),
            qsl: Global::new(qsl),
            ctx_lens: Global::new(ctx_lens),
            block_tables: Global::new(block_tables),
        }
    }
}

#[inline(always)]
unsafe fn paged_attention<T: Elem, const DL: usize, const PIPE: bool>(b: AttnBufs<T>, a: AttnArgs) {
    let d = (DL * 32) as u32;
    let (t, warp, lane) = (gpu::tid(), gpu::tid() / 32, gpu::tid() % 32);
    let (tile, kv_head, split) = (gpu::bx(), gpu::by(), gpu::bz());
    unsafe {
        let seq = b.tiles.add(2 * tile as usize).read();
        let q0 = b.tiles.add(2 * tile as usize + 1).read();
        let qstart = b.qsl.add(seq as usize).read();
        let qlen = b.qsl.add(seq as usize + 1).read() - qstart;
        let ctx = b.ctx_lens.add(seq as usize).read();
        let g = udiv(a.nq, a.nkv);
        let tq = if g >= ROWS_PER_TILE { 1 } else { udiv(ROWS_PER_TILE, g) };
        let ntok = if qlen - q0 < tq { qlen - q0 } else { tq };
        let rows = ntok * g;
        let (first, end) = split_blocks(split, a.bps, a.bs, ctx + q0 + ntok);

        let sq = Shared::<f32>::base();
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
            sq.add(i as usize).write(b.q.add(((token * a.nq + head) * d + dd) as usize).read().to_f32() * a.scale);
            i += THREADS;
        }

        let table = b.block_tables.add((seq * a.max_bps) as usize);
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
            load_block(&mut rk, &mut rv, b.kc, b.vc, table.add(first as usize).read(), a, kv_head, d, nvec, t);
        }
        let mut j = first;
        while j < end {
            gpu::sync_threads(); // the previous block's readers are done (and Q is staged)
            if vec16 {
                store_block::<T>(&rk, &rv, sk, sv, d, nvec, t);
                if j + 1 < end {
                    load_block(&mut rk, &mut rv, b.kc, b.vc, table.add(j as usize + 1).read(), a, kv_head, d, nvec, t);
                }
                j += 1;
                gpu::sync_threads();
                let j = j - 1;
                rows4!(|s, r| {
                    if r < rows {
                        s.attend_block(
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
            let phys = table.add(j as usize).read();
            let mut i = t;
            while i < a.bs * d {
                let (kt, dd) = (i / d, i % d); // d is a constant
                let o = (((phys * a.bs + kt) * a.nkv + kv_head) * d + dd) as usize;
                sk.add((kt * (d + 1) + dd) as usize).write(b.kc.add(o).read().to_f32());
                sv.add(i as usize).write(b.vc.add(o).read().to_f32());
                i += THREADS;
            }
            gpu::sync_threads();
            rows4!(|s, r| {
                if r < rows {
                    s.attend_block(sq.add((r * d) as usize), sk, sv, a.bs, j * a.bs, ctx + q0 + udiv(r, g) + 1, lane);
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
                    let o = b.out.add(((token * a.nq + head) * d + lane) as usize);
                    for e in 0..DL {
                        o.add(32 * e).write(T::from_f32(s.acc[e] * inv));
                    }
                } else {
                    let po = b.partials.add((((split * a.num_tokens + token) * a.nq + head) * (d + 2)) as usize);
                    if lane == 0 {
                        po.write(s.m);
                        po.add(1).write(s.l);
                    }
                    for e in 0..DL {
                        po.add(2 + lane as usize + 32 * e).write(s.acc[e]);
                    }
                }
            }
        });
    }
}

/// 16-byte vectors of one KV block a thread holds: a block of up to `MAX_BLOCK_SIZE` tokens
/// of a 128-wide head in 16-bit values is 512 vectors of K, 4 for each of 128 threads.
const VEC_SLOTS: usize = (MAX_BLOCK_SIZE * 128 / 8 / THREADS) as usize;

/// This thread's vectors of block `phys`'s K and V rows for `kv_head`: vector `i` (of
/// `nvec`, `d / 8` a token) holds values `8 (i % (d/8))..` of token `i / (d/8)`. The rows
/// are 16-byte aligned: head rows are multiples of 8 values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn load_block<T: Elem>(
    rk: &mut [[u32; 4]; VEC_SLOTS],
    rv: &mut [[u32; 4]; VEC_SLOTS],
    kc: Global<T>,
    vc: Global<T>,
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
                rk[s] = kc.add(o).ld_nc_v4();
                rv[s] = vc.add(o).ld_nc_v4();
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
    sk: Shared<f32>,
    sv: Shared<f32>,
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
                    sk.add((kt * (d + 1) + dv * 8) as usize + e).write(kh.to_f32());
                    sv.add((kt * d + dv * 8) as usize + e).write(vh.to_f32());
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
    unsafe fn attend_block(
        &mut self,
        qr: Shared<f32>,
        sk: Shared<f32>,
        sv: Shared<f32>,
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
                dot += unsafe { qr.add(e).read() * kr.add(e).read() };
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
            let pt = gpu::shfl_idx_f32(FULL, p, kt);
            let vr = unsafe { sv.add((kt * d + lane) as usize) };
            for e in 0..DL {
                self.acc[e] += pt * unsafe { vr.add(32 * e).read() };
            }
            kt += 1;
        }
        self.m = m_new;
    }
}

/// Merges the splits' `(m, l, acc)` rows of (token `bx`, head `by`); one warp, lane `x`
/// owning dims `x, x + 32, ...`.
#[inline(always)]
unsafe fn attention_reduce<T: Elem, const DL: usize>(
    out: Global<T>,
    partials: Global<f32>,
    num_tokens: u32,
    nq: u32,
    num_splits: u32,
) {
    let d = (DL * 32) as u32;
    let (token, head, lane) = (gpu::bx(), gpu::by(), gpu::tid());
    let row = |s: u32| unsafe { partials.add((((s * num_tokens + token) * nq + head) * (d + 2)) as usize) };
    let mut gm = f32::NEG_INFINITY;
    for s in 0..num_splits {
        gm = max(gm, unsafe { row(s).read() });
    }
    let mut l = 0.0;
    let mut acc = [0.0f32; DL];
    for s in 0..num_splits {
        let p = row(s);
        let ls = unsafe { p.add(1).read() };
        if ls == 0.0 {
            continue;
        }
        let w = exp(unsafe { p.read() } - gm);
        l += ls * w;
        for e in 0..DL {
            acc[e] += unsafe { p.add(2 + lane as usize + 32 * e).read() } * w;
        }
    }
    let inv = 1.0 / l;
    let o = unsafe { out.add(((token * nq + head) * d + lane) as usize) };
    for e in 0..DL {
        unsafe { o.add(32 * e).write(T::from_f32(acc[e] * inv)) };
    }
}

/// An attention entry point with the common parameter list (the staged, pipelined and
/// decode kernels share it): `attention_entry!(name, T, body_fn)`.
macro_rules! attention_entry {
    ($t:ty, $f:path, $name:ident) => {
        crate::kernel! {
            fn $name(
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
                $f(
                    $crate::kernels::attention::AttnBufs::new(
                        out,
                        partials,
                        q,
                        k_cache,
                        v_cache,
                        tiles,
                        query_start_loc,
                        context_lens,
                        block_tables,
                    ),
                    $crate::kernels::attention::AttnArgs {
                        num_tokens,
                        nq: num_q_heads,
                        nkv: num_kv_heads,
                        bs: block_size,
                        max_bps: max_blocks_per_seq,
                        bps: blocks_per_split,
                        num_splits,
                        scale,
                    },
                )
            }
        }
    };
}
pub(crate) use attention_entry;

macro_rules! attention_kernels {
    ($t:ty, $dl:literal, $attn:ident, $reduce:ident) => {
        attention_entry!($t, paged_attention::<$t, $dl, false>, $attn);
        crate::kernel! {
            fn $reduce(out: *mut $t, partials: *const f32, num_tokens: u32, num_q_heads: u32, num_splits: u32) {
                attention_reduce::<$t, $dl>(Global::new(out), Global::new(partials), num_tokens, num_q_heads, num_splits)
            }
        }
    };
}

attention_kernels!(f32, 2, paged_attention_f32_d64, attention_reduce_f32_d64);
attention_kernels!(f32, 4, paged_attention_f32_d128, attention_reduce_f32_d128);
attention_kernels!(F16, 2, paged_attention_f16_d64, attention_reduce_f16_d64);
attention_kernels!(F16, 4, paged_attention_f16_d128, attention_reduce_f16_d128);
attention_kernels!(Bf16, 2, paged_attention_bf16_d64, attention_reduce_bf16_d64);
attention_kernels!(Bf16, 4, paged_attention_bf16_d128, attention_reduce_bf16_d128);
attention_entry!(F16, paged_attention::<F16, 2, true>, paged_attention_pipelined_f16_d64);
attention_entry!(F16, paged_attention::<F16, 4, true>, paged_attention_pipelined_f16_d128);
attention_entry!(Bf16, paged_attention::<Bf16, 2, true>, paged_attention_pipelined_bf16_d64);
attention_entry!(Bf16, paged_attention::<Bf16, 4, true>, paged_attention_pipelined_bf16_d128);
