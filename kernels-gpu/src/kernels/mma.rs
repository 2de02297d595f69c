//! Paged attention on tensor cores for the rows of prefill chunks (FlashAttention-2's loop).
//! A thread block is [`MMA_TILE_TOKENS`] query tokens of one sequence and one query head; warp
//! `w` owns tokens `16w..16w+16` of the tile. The context is walked 16 keys at a time (a
//! whole sub-block of a paged block, so `block_size` is a multiple of 16): K and V are staged
//! in shared memory (K row-major with 8 values of padding, V transposed, both so the lanes'
//! 32-bit fragment loads hit 32 banks), S = QK^T and O += PV are MMAs, the softmax is online
//! in f32 registers, P goes from S's accumulators to the next MMA's A fragment without
//! leaving registers. Each lane of a warp holds rows `group` and `group + 8` (lane / 4) and
//! columns `2 (lane % 4)` and `+1` (and `+8`) of every fragment.

use super::attention::{AttnArgs, AttnBufs};
use crate::attention::MMA_TILE_TOKENS;
use crate::elem::{Bf16, Elem, F16};
use crate::fmath::{exp, max};
use crate::gpu::{self, mma_16816, Shared, FULL};
use crate::{udiv, urem};

const THREADS: u32 = crate::BLOCK_THREADS;

/// Two values as one 32-bit register of `T`s: `lo` in the low half (the lower column).
#[inline(always)]
fn pack2<T: Elem>(lo: f32, hi: f32) -> u32 {
    // SAFETY: T is a 16-bit storage type in the tensor-core kernel.
    let (l, h): (u16, u16) =
        unsafe { (core::mem::transmute_copy(&T::from_f32(lo)), core::mem::transmute_copy(&T::from_f32(hi))) };
    l as u32 | (h as u32) << 16
}

/// Maximum over the four lanes of a fragment row (lanes `4 group ..`).
#[inline(always)]
fn xor_max(v: f32) -> f32 {
    let v = max(v, gpu::shfl_xor_f32(FULL, v, 1));
    max(v, gpu::shfl_xor_f32(FULL, v, 2))
}

/// Sum over the four lanes of a fragment row.
#[inline(always)]
fn xor_sum(v: f32) -> f32 {
    let v = v + gpu::shfl_xor_f32(FULL, v, 1);
    v + gpu::shfl_xor_f32(FULL, v, 2)
}

#[inline(always)]
unsafe fn paged_attention_mma<T: Elem, const KS: usize, const NT: usize>(b: AttnBufs<T>, a: AttnArgs) {
    // KS = d / 16 k-steps of QK^T, NT = d / 8 n-tiles of PV. Every loop over them is unrolled
    // (build-ptx raises LLVM's unroll threshold), so the accumulators stay in registers.
    let d = (KS * 16) as u32;
    let kstride = d + 8; // K staging row, in 16-bit values
    const VT_STRIDE: u32 = 24; // V^T staging row: 16 keys and 8 of padding
    let (t, warp, lane) = (gpu::tid(), gpu::tid() / 32, gpu::tid() % 32);
    let (group, tig) = (lane / 4, lane % 4);
    let (tile, head) = (gpu::bx(), gpu::by());
    unsafe {
        let seq = b.tiles.add(2 * tile as usize).read();
        let q0 = b.tiles.add(2 * tile as usize + 1).read();
        let qstart = b.qsl.add(seq as usize).read();
        let qlen = b.qsl.add(seq as usize + 1).read() - qstart;
        let ctx = b.ctx_lens.add(seq as usize).read();
        let ntok = if qlen - q0 < MMA_TILE_TOKENS { qlen - q0 } else { MMA_TILE_TOKENS };
        let kv_head = udiv(head, udiv(a.nq, a.nkv));
        let wt0 = q0 + warp * 16; // the warp's first token in the sequence's chunk
        let tok_end = q0 + ntok;

        // Q as the A fragments of every k-step, for the lane's two rows.
        let mut qf = [[0u32; 4]; KS];
        let q_at = |tok: u32, col: u32| -> u32 {
            if tok < tok_end {
                b.q.add((((qstart + tok) * a.nq + head) * d + col) as usize).cast::<u32>().read()
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

        let ks_s = Shared::<u16>::base();
        let vt_s = ks_s.add((16 * kstride) as usize);
        let table = b.block_tables.add((seq * a.max_bps) as usize);
        let nvec = 16 * d / 8; // 16-byte vectors of a 16-key sub-block, per tensor
        let mut sb = 0;
        while sb * 16 < kv_end {
            let key0 = sb * 16;
            let phys = table.add(udiv(key0, a.bs) as usize).read();
            let off = urem(key0, a.bs);
            gpu::sync_threads(); // the previous sub-block's readers are done
            let mut i = t;
            while i < nvec {
                let (kt, dv) = (i / (d / 8), i % (d / 8));
                let go = (((phys * a.bs + off + kt) * a.nkv + kv_head) * d + dv * 8) as usize;
                let kv = b.kc.add(go).ld_nc_v4();
                let kd = ks_s.add((kt * kstride + dv * 8) as usize).cast::<u32>();
                for w in 0..4 {
                    kd.add(w).write(kv[w]);
                }
                let vv = b.vc.add(go).ld_nc_v4();
                for e in 0..8u32 {
                    vt_s.add(((dv * 8 + e) * VT_STRIDE + kt) as usize)
                        .write((vv[(e / 2) as usize] >> (16 * (e % 2))) as u16);
                }
                i += THREADS;
            }
            gpu::sync_threads();
            if key0 < warp_keys {
                // S = Q K^T for keys key0..key0+16: two n-tiles of 8 keys.
                let mut sc = [[0f32; 4]; 2];
                for (nt, acc) in sc.iter_mut().enumerate() {
                    let kr = ks_s.add(((nt as u32 * 8 + group) * kstride + tig * 2) as usize);
                    for (ks, f) in qf.iter().enumerate() {
                        let kb = kr.add(ks * 16);
                        mma_16816::<T>(acc, *f, [kb.cast::<u32>().read(), kb.add(8).cast::<u32>().read()]);
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
                    mma_16816::<T>(acc, pa, [vr.cast::<u32>().read(), vr.add(8).cast::<u32>().read()]);
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
                b.out.add(base + nt * 8).cast::<u32>().write(pack2::<T>(acc[0] * inv0, acc[1] * inv0));
            }
        }
        let row1 = row0 + 8;
        if row1 < tok_end {
            let base = (((qstart + row1) * a.nq + head) * d + tig * 2) as usize;
            for (nt, acc) in o.iter().enumerate() {
                b.out.add(base + nt * 8).cast::<u32>().write(pack2::<T>(acc[2] * inv1, acc[3] * inv1));
            }
        }
    }
}

macro_rules! mma_kernels {
    ($t:ty, $ks:literal, $nt:literal, $name:ident) => {
        crate::kernel! {
            fn $name(
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
                paged_attention_mma::<$t, $ks, $nt>(
                    // No split: the tensor-core kernel writes no partials.
                    AttnBufs::new(
                        out,
                        core::ptr::null_mut(),
                        q,
                        k_cache,
                        v_cache,
                        tiles,
                        query_start_loc,
                        context_lens,
                        block_tables,
                    ),
                    AttnArgs {
                        num_tokens,
                        nq: num_q_heads,
                        nkv: num_kv_heads,
                        bs: block_size,
                        max_bps: max_blocks_per_seq,
                        bps: 0,
                        num_splits: 1,
                        scale,
                    },
                )
            }
        }
    };
}

mma_kernels!(F16, 4, 8, paged_attention_mma_f16_d64);
mma_kernels!(F16, 8, 16, paged_attention_mma_f16_d128);
mma_kernels!(Bf16, 4, 8, paged_attention_mma_bf16_d64);
mma_kernels!(Bf16, 8, 16, paged_attention_mma_bf16_d128);
