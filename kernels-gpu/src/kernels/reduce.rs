//! Block and warp reductions over the [`gpu`](crate::gpu) seam, shared by the kernel
//! families.

use crate::fmath::max;
use crate::gpu::{self, Shared, FULL};
use crate::ops::argmax_pick;

const WARPS: u32 = crate::BLOCK_THREADS / 32;

/// Sum over the warp by butterfly shuffles; every lane gets it.
#[inline(always)]
pub(crate) fn warp_sum(mut v: f32) -> f32 {
    let mut o = 16;
    while o > 0 {
        v += gpu::shfl_xor_f32(FULL, v, o);
        o >>= 1;
    }
    v
}

/// Sum over the thread block (`BLOCK_THREADS` threads); every thread gets the result. Uses the
/// first `WARPS` f32 words of the dynamic shared memory.
///
/// # Safety
/// Every thread of the block calls it (it has a barrier), and the launch has at least
/// `4 * WARPS` bytes of dynamic shared memory.
#[inline(always)]
pub(crate) unsafe fn block_sum(v: f32) -> f32 {
    let s = Shared::<f32>::base();
    let w = warp_sum(v);
    let t = gpu::tid();
    if t % 32 == 0 {
        unsafe { s.add((t / 32) as usize).write(w) };
    }
    gpu::sync_threads();
    let mut total = 0.0;
    for i in 0..WARPS as usize {
        total += unsafe { s.add(i).read() };
    }
    total
}

/// Maximum over the warp by butterfly shuffles; every lane gets it.
#[inline(always)]
pub(crate) fn warp_max(mut v: f32) -> f32 {
    let mut o = 16;
    while o > 0 {
        v = max(v, gpu::shfl_xor_f32(FULL, v, o));
        o >>= 1;
    }
    v
}

/// [`block_sum`] followed by a barrier, for reductions in a loop: no warp writes the next
/// partials before every warp has read these.
///
/// # Safety
/// As [`block_sum`].
#[inline(always)]
pub(crate) unsafe fn block_sum_sync(v: f32) -> f32 {
    let t = unsafe { block_sum(v) };
    gpu::sync_threads();
    t
}

/// Block-wide (value, index) maximum, ties to the lower index (`argmax_pick`); every thread
/// gets it. Ends on a barrier, so it may run again at once (as may [`block_sum_sync`]).
///
/// # Safety
/// Every thread of the block calls it, and the launch has at least `8 * WARPS` bytes of
/// dynamic shared memory (a value and an index a warp).
#[inline(always)]
pub(crate) unsafe fn block_argmax(mut best: (f32, u32)) -> (f32, u32) {
    let mut o = 16;
    while o > 0 {
        let v = gpu::shfl_xor_f32(FULL, best.0, o);
        let ix = gpu::shfl_xor_u32(FULL, best.1, o);
        best = argmax_pick(best, (v, ix));
        o >>= 1;
    }
    let s = Shared::<f32>::base();
    let si = s.cast::<u32>();
    let t = gpu::tid();
    if t % 32 == 0 {
        unsafe {
            s.add((t / 32) as usize).write(best.0);
            si.add((WARPS + t / 32) as usize).write(best.1);
        }
    }
    gpu::sync_threads();
    let mut b = unsafe { (s.read(), si.add(WARPS as usize).read()) };
    for w in 1..WARPS as usize {
        b = argmax_pick(b, unsafe { (s.add(w).read(), si.add(WARPS as usize + w).read()) });
    }
    gpu::sync_threads();
    b
}
