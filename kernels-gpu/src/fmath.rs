//! The few float functions the kernels need, from NVVM intrinsics on the device and from
//! `std` on the host (the crate links `std` only when not building for nvptx).

#[cfg(target_arch = "nvptx64")]
mod imp {
    unsafe extern "C" {
        #[link_name = "llvm.nvvm.ex2.approx.ftz.f"]
        fn ex2(x: f32) -> f32;
        #[link_name = "llvm.nvvm.rsqrt.approx.f"]
        fn rsqrt_approx(x: f32) -> f32;
        #[link_name = "llvm.nvvm.fmax.f"]
        fn fmax(a: f32, b: f32) -> f32;
        #[link_name = "llvm.nvvm.lg2.approx.f"]
        fn lg2(x: f32) -> f32;
    }
    #[inline(always)]
    pub fn ln(x: f32) -> f32 {
        // ln x = log2(x) ln 2; lg2.approx has ~2^-22 relative error.
        unsafe { lg2(x) * core::f32::consts::LN_2 }
    }
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        // e^x = 2^(x * log2 e); ex2.approx has ~2 ulp error, and flushes -inf to 0.
        unsafe { ex2(x * core::f32::consts::LOG2_E) }
    }
    #[inline(always)]
    pub fn rsqrt(x: f32) -> f32 {
        unsafe { rsqrt_approx(x) }
    }
    #[inline(always)]
    pub fn max(a: f32, b: f32) -> f32 {
        unsafe { fmax(a, b) }
    }
}

#[cfg(not(target_arch = "nvptx64"))]
mod imp {
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        x.exp()
    }
    #[inline(always)]
    pub fn rsqrt(x: f32) -> f32 {
        1.0 / x.sqrt()
    }
    #[inline(always)]
    pub fn ln(x: f32) -> f32 {
        x.ln()
    }
    #[inline(always)]
    pub fn max(a: f32, b: f32) -> f32 {
        a.max(b)
    }
}

pub use imp::{exp, ln, max, rsqrt};

/// `e^x` for `x <= 0` (the softmax's `score - max`) by range reduction and a polynomial, in
/// branch-free code that a host compiler vectorizes over an array of scores; within 2e-7
/// relative of `exp` down to `x = -87`, where it stops (about 1.6e-38; the caller masks
/// `-inf` itself). The device uses `ex2.approx` instead.
#[cfg(not(target_arch = "nvptx64"))]
#[inline(always)]
pub fn exp_poly(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    // x = n ln2 + r, |r| <= ln2 / 2.
    let n = (x * core::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r: Taylor-like coefficients fitted on [-ln2/2, ln2/2] (Cephes' expf).
    let r2 = r * r;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = p * r2 + r + 1.0;
    // 2^n through the exponent bits: n >= -126 here, so the result is normal.
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x / (1 + e^-x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}
