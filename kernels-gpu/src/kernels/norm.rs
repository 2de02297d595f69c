//! RMSNorm, plain and fused with the residual add: one thread block (128 threads) a token's
//! hidden row; the sum of squares by warp shuffles and one shared word per warp.

use super::reduce::block_sum;
use crate::elem::{Bf16, Elem, F16};
use crate::gpu::{self, Global};
use crate::ops::rms_inv;

const THREADS: u32 = crate::BLOCK_THREADS;

#[inline(always)]
unsafe fn rms_norm<T: Elem + Copy>(out: Global<T>, x: Global<T>, w: Global<f32>, n: u32, eps: f32) {
    let base = (gpu::bx() * n) as usize;
    let mut ss = 0.0;
    let mut i = gpu::tid();
    while i < n {
        let v = unsafe { x.add(base + i as usize).read() }.to_f32();
        ss += v * v;
        i += THREADS;
    }
    unsafe { write_normalized(out, x, w, base, n, rms_inv(block_sum(ss), n as usize, eps)) }
}

#[inline(always)]
unsafe fn fused_add_rms_norm<T: Elem + Copy>(x: Global<T>, residual: Global<T>, w: Global<f32>, n: u32, eps: f32) {
    let base = (gpu::bx() * n) as usize;
    let mut ss = 0.0;
    let mut i = gpu::tid();
    while i < n {
        unsafe {
            let (rp, xp) = (residual.add(base + i as usize), x.add(base + i as usize));
            let rt = T::from_f32(rp.read().to_f32() + xp.read().to_f32());
            rp.write(rt);
            let r = rt.to_f32(); // normalise what was stored, as the host does
            ss += r * r;
        }
        i += THREADS;
    }
    unsafe { write_normalized(x, residual, w, base, n, rms_inv(block_sum(ss), n as usize, eps)) }
}

/// `out[i] = src[i] * inv * w[i]` over one row, strided across the block.
#[inline(always)]
unsafe fn write_normalized<T: Elem + Copy>(
    out: Global<T>,
    src: Global<T>,
    w: Global<f32>,
    base: usize,
    n: u32,
    inv: f32,
) {
    let mut i = gpu::tid();
    while i < n {
        unsafe {
            let v = src.add(base + i as usize).read().to_f32();
            out.add(base + i as usize).write(T::from_f32(v * inv * w.add(i as usize).read()));
        }
        i += THREADS;
    }
}

macro_rules! norm_kernels {
    ($t:ty, $rms:ident, $frms:ident) => {
        crate::kernel! {
            fn $rms(out: *mut $t, x: *const $t, w: *const f32, n: u32, eps: f32) {
                rms_norm::<$t>(Global::new(out), Global::new(x), Global::new(w), n, eps)
            }
        }
        crate::kernel! {
            fn $frms(x: *mut $t, residual: *mut $t, w: *const f32, n: u32, eps: f32) {
                fused_add_rms_norm::<$t>(Global::new(x), Global::new(residual), Global::new(w), n, eps)
            }
        }
    };
}

norm_kernels!(f32, rms_norm_f32, fused_add_rms_norm_f32);
norm_kernels!(F16, rms_norm_f16, fused_add_rms_norm_f16);
norm_kernels!(Bf16, rms_norm_bf16, fused_add_rms_norm_bf16);
