//! Paged attention for decode rows (sequences that bring one token), bandwidth-first: a thread
//! block is one sequence, one query head and one split; its four warps take the split's KV
//! blocks in turn. Within a warp, `LPT = d / 8` lanes share a key row and each holds 8
//! contiguous values of it (one 16-byte load), so a warp step reads `32 / LPT` whole rows of K
//! and of V coalesced; the row's dot is summed over those lanes by shuffles, the softmax is
//! online over the warp, and each lane accumulates its 8 output values. The warps' states are
//! merged through shared memory at the end. 16-bit caches only (the loads are 8 values wide).

use super::attention::{attention_entry, AttnArgs, AttnBufs};
use crate::attention::split_blocks;
use crate::elem::{Bf16, Elem, F16};
use crate::fmath::{exp, max};
use crate::gpu::{self, Shared, FULL};
use crate::udiv;

const WARPS: u32 = crate::BLOCK_THREADS / 32;

/// The 8 16-bit values of a 16-byte vector, widened.
#[inline(always)]
fn unpack<T: Elem>(w: [u32; 4], out: &mut [f32; 8]) {
    for e in 0..8 {
        // SAFETY: T is a 16-bit storage type here.
        let h: T = unsafe { core::mem::transmute_copy(&((w[e / 2] >> (16 * (e % 2))) as u16)) };
        out[e] = h.to_f32();
    }
}

#[inline(always)]
unsafe fn paged_decode<T: Elem, const LPT: u32>(b: AttnBufs<T>, a: AttnArgs) {
    let d = LPT * 8;
    let tpw = 32 / LPT; // key rows a warp reads per step
    let (warp, lane) = (gpu::tid() / 32, gpu::tid() % 32);
    let (row_in_step, part) = (lane / LPT, lane % LPT); // which row of the step, which 8 values
    let (tile, head, split) = (gpu::bx(), gpu::by(), gpu::bz());
    unsafe {
        let seq = b.tiles.add(2 * tile as usize).read();
        let token = b.qsl.add(seq as usize).read();
        let ctx = b.ctx_lens.add(seq as usize).read();
        let visible = ctx + 1;
        let kv_head = udiv(head, udiv(a.nq, a.nkv));
        let (first, end) = split_blocks(split, a.bps, a.bs, visible);
        // This lane's 8 query values, pre-scaled.
        let mut qv = [0f32; 8];
        unpack::<T>(b.q.add(((token * a.nq + head) * d + part * 8) as usize).ld_nc_v4(), &mut qv);
        for x in qv.iter_mut() {
            *x *= a.scale;
        }
        let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
        let mut acc = [0f32; 8];
        let table = b.block_tables.add((seq * a.max_bps) as usize);
        let mut j = first + warp;
        while j < end {
            let phys = table.add(j as usize).read();
            let mut t0 = 0;
            while t0 < a.bs {
                let t = t0 + row_in_step;
                let key = j * a.bs + t;
                let valid = t < a.bs && key < visible;
                let (mut kf, mut vf) = ([0f32; 8], [0f32; 8]);
                if valid {
                    let o = (((phys * a.bs + t) * a.nkv + kv_head) * d + part * 8) as usize;
                    unpack::<T>(b.kc.add(o).ld_nc_v4(), &mut kf);
                    unpack::<T>(b.vc.add(o).ld_nc_v4(), &mut vf);
                }
                let mut dot = 0f32;
                for e in 0..8 {
                    dot += qv[e] * kf[e];
                }
                // The row's lanes are LPT consecutive lanes: xor over the low bits sums them.
                let mut o = LPT / 2;
                while o > 0 {
                    dot += gpu::shfl_xor_f32(FULL, dot, o);
                    o >>= 1;
                }
                let s = if valid { dot } else { f32::NEG_INFINITY };
                // The step's max over its rows (lanes LPT apart), then the online update.
                let mut smax = s;
                let mut o = 16;
                while o >= LPT {
                    smax = max(smax, gpu::shfl_xor_f32(FULL, smax, o));
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
                        psum += gpu::shfl_xor_f32(FULL, psum, o);
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
                acc[e] += gpu::shfl_xor_f32(FULL, acc[e], o);
            }
            o >>= 1;
        }
        // Merge the four warps: each leaves (m, l) and its d values in shared memory.
        let sm = Shared::<f32>::base();
        let stride = d + 2;
        let mine = sm.add((warp * stride) as usize);
        if lane == 0 {
            mine.write(m);
            mine.add(1).write(l);
        }
        if lane < LPT {
            for e in 0..8 {
                mine.add((2 + lane * 8) as usize + e).write(acc[e]);
            }
        }
        gpu::sync_threads();
        if warp == 0 {
            let mut gm = f32::NEG_INFINITY;
            for w in 0..WARPS {
                gm = max(gm, sm.add((w * stride) as usize).read());
            }
            let mut gl = 0f32;
            let mut ga = [0f32; 8];
            for w in 0..WARPS {
                let st = sm.add((w * stride) as usize);
                let wl = st.add(1).read();
                if wl == 0.0 {
                    continue;
                }
                let f = exp(st.read() - gm);
                gl += wl * f;
                if lane < LPT {
                    for e in 0..8 {
                        ga[e] += st.add((2 + lane * 8) as usize + e).read() * f;
                    }
                }
            }
            if lane < LPT {
                if a.num_splits == 1 {
                    let inv = if gl > 0.0 { 1.0 / gl } else { 0.0 };
                    let base = ((token * a.nq + head) * d + lane * 8) as usize;
                    for e in 0..8 {
                        b.out.add(base + e).write(T::from_f32(ga[e] * inv));
                    }
                } else {
                    let po = b.partials.add((((split * a.num_tokens + token) * a.nq + head) * stride) as usize);
                    if lane == 0 {
                        po.write(gm);
                        po.add(1).write(gl);
                    }
                    for e in 0..8 {
                        po.add((2 + lane * 8) as usize + e).write(ga[e]);
                    }
                }
            }
        }
    }
}

// The decode kernel takes the attention kernels' parameters (one query head a thread block;
// see the host's launcher).
attention_entry!(F16, paged_decode::<F16, 8>, paged_decode_f16_d64);
attention_entry!(F16, paged_decode::<F16, 16>, paged_decode_f16_d128);
attention_entry!(Bf16, paged_decode::<Bf16, 8>, paged_decode_bf16_d64);
attention_entry!(Bf16, paged_decode::<Bf16, 16>, paged_decode_bf16_d128);
