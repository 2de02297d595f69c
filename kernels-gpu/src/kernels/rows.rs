//! The row kernels: one thread block (128 threads) a token's row, strided across the block.
//! The KV-cache write, rotary embedding, SiLU-and-multiply, the embedding gather, and the
//! grid-stride dummy-weight fill.

use crate::elem::{Bf16, Elem, F16};
use crate::fmath::silu;
use crate::gpu::{self, Global};
use crate::ops::{rope_pair, RopeLayout};
use crate::sample::dummy_value;
use crate::{udiv, urem};

const THREADS: u32 = crate::BLOCK_THREADS;

/// Copies token `bx`'s K and V rows (`row` values: every KV head) to its slot of the caches;
/// slot `u32::MAX` is a padding token and writes nothing.
#[inline(always)]
unsafe fn reshape_and_cache<T: Elem>(
    k: Global<T>,
    v: Global<T>,
    kc: Global<T>,
    vc: Global<T>,
    slots: Global<u32>,
    row: u32,
) {
    let token = gpu::bx() as usize;
    let slot = unsafe { slots.add(token).read() };
    if slot == u32::MAX {
        return;
    }
    let (src, dst) = (token * row as usize, slot as usize * row as usize);
    let mut i = gpu::tid();
    while i < row {
        unsafe {
            // The value before the place, as `*dst = *src` evaluates (same PTX as before the
            // seam).
            let kv = k.add(src + i as usize).read();
            kc.add(dst + i as usize).write(kv);
            let vv = v.add(src + i as usize).read();
            vc.add(dst + i as usize).write(vv);
        }
        i += THREADS;
    }
}

/// Rotates every query and key head of token `bx` by its position's cos/sin row
/// (`rot_dim` values: cos then sin), pairs by `layout` (`RopeLayout as u32`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rotary_embedding<T: Elem>(
    q: Global<T>,
    k: Global<T>,
    positions: Global<u32>,
    cos_sin: Global<f32>,
    nq: u32,
    nk: u32,
    head_dim: u32,
    rot_dim: u32,
    layout: u32,
) {
    let token = gpu::bx();
    let layout = if layout == 0 { RopeLayout::Interleaved } else { RopeLayout::Neox };
    let half = rot_dim / 2;
    unsafe {
        let row = cos_sin.add((positions.add(token as usize).read() * rot_dim) as usize);
        let mut i = gpu::tid();
        while i < (nq + nk) * half {
            let (h, p) = (udiv(i, half), urem(i, half));
            let x = if h < nq {
                q.add(((token * nq + h) * head_dim) as usize)
            } else {
                k.add(((token * nk + h - nq) * head_dim) as usize)
            };
            let (ia, ib) = layout.pair(p as usize, rot_dim as usize);
            let (y0, y1) = rope_pair(
                x.add(ia).read().to_f32(),
                x.add(ib).read().to_f32(),
                row.add(p as usize).read(),
                row.add((half + p) as usize).read(),
            );
            x.add(ia).write(T::from_f32(y0));
            x.add(ib).write(T::from_f32(y1));
            i += THREADS;
        }
    }
}

/// `out = silu(gate) * up` for token `bx`, whose row of `x` is `[gate; up]` (`2 inter`).
#[inline(always)]
unsafe fn silu_and_mul<T: Elem>(out: Global<T>, x: Global<T>, inter: u32) {
    let (src, dst) = ((gpu::bx() * 2 * inter) as usize, (gpu::bx() * inter) as usize);
    let mut i = gpu::tid();
    while i < inter {
        unsafe {
            let gate = x.add(src + i as usize).read().to_f32();
            let up = x.add(src + (inter + i) as usize).read().to_f32();
            let y = T::from_f32(silu(gate) * up);
            out.add(dst + i as usize).write(y);
        }
        i += THREADS;
    }
}

/// Row `ids[bx]` of `table` into row `bx` of `out`.
#[inline(always)]
unsafe fn embedding<T: Elem>(out: Global<T>, table: Global<T>, ids: Global<u32>, hidden: u32) {
    unsafe {
        let src = (ids.add(gpu::bx() as usize).read() * hidden) as usize;
        let dst = (gpu::bx() * hidden) as usize;
        let mut i = gpu::tid();
        while i < hidden {
            let x = table.add(src + i as usize).read();
            out.add(dst + i as usize).write(x);
            i += THREADS;
        }
    }
}

/// `out[i] = dummy_value(seed, i, scale)` for `i < n`, grid-stride.
#[inline(always)]
unsafe fn fill_dummy<T: Elem>(out: Global<T>, n: u64, seed: u64, scale: f32) {
    let stride = gpu::grid_dim_x() as u64 * THREADS as u64;
    let mut i = gpu::bx() as u64 * THREADS as u64 + gpu::tid() as u64;
    while i < n {
        unsafe { out.add(i as usize).write(T::from_f32(dummy_value(seed, i, scale))) };
        i += stride;
    }
}

macro_rules! row_kernels {
    ($t:ty, $cache:ident, $rope:ident, $silu:ident, $emb:ident, $fill:ident) => {
        crate::kernel! {
            fn $cache(k: *const $t, v: *const $t, kc: *mut $t, vc: *mut $t, slots: *const u32, row: u32) {
                reshape_and_cache::<$t>(
                    Global::new(k),
                    Global::new(v),
                    Global::new(kc),
                    Global::new(vc),
                    Global::new(slots),
                    row,
                )
            }
        }
        crate::kernel! {
            fn $rope(
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
                rotary_embedding::<$t>(
                    Global::new(q),
                    Global::new(k),
                    Global::new(positions),
                    Global::new(cos_sin),
                    nq,
                    nk,
                    head_dim,
                    rot_dim,
                    layout,
                )
            }
        }
        crate::kernel! {
            fn $silu(out: *mut $t, x: *const $t, inter: u32) {
                silu_and_mul::<$t>(Global::new(out), Global::new(x), inter)
            }
        }
        crate::kernel! {
            fn $emb(out: *mut $t, table: *const $t, ids: *const u32, hidden: u32) {
                embedding::<$t>(Global::new(out), Global::new(table), Global::new(ids), hidden)
            }
        }
        crate::kernel! {
            fn $fill(out: *mut $t, n: u64, seed: u64, scale: f32) {
                fill_dummy::<$t>(Global::new(out), n, seed, scale)
            }
        }
    };
}

row_kernels!(f32, reshape_and_cache_f32, rotary_embedding_f32, silu_and_mul_f32, embedding_f32, fill_dummy_f32);
row_kernels!(F16, reshape_and_cache_f16, rotary_embedding_f16, silu_and_mul_f16, embedding_f16, fill_dummy_f16);
row_kernels!(Bf16, reshape_and_cache_bf16, rotary_embedding_bf16, silu_and_mul_bf16, embedding_bf16, fill_dummy_bf16);
