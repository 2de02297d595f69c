//! Block and warp reductions over the [`gpu`](crate::gpu) seam, shared by every kernel family
//! (the ported ones and, until their port, those in `device.rs`).

use crate::gpu::{self, Shared, FULL};

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
