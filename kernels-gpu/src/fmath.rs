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
    pub fn max(a: f32, b: f32) -> f32 {
        a.max(b)
    }
}

pub use imp::{exp, max, rsqrt};

/// `x / (1 + e^-x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}
