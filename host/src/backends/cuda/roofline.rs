//! The device's two ceilings, measured in the run that quotes them (as METHOD.md asks): a
//! device-to-device copy's bandwidth (bytes read plus bytes written) and a large bf16 GEMM's
//! rate through cuBLAS, on random data.

use super::{CudaError, Kernels};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::DevicePtr;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Ceilings {
    /// GB/s, counting bytes read and bytes written.
    pub copy_gbs: f64,
    /// TFLOP/s of an 8192^3 bf16 GEMM with f32 accumulation.
    pub gemm_tflops: f64,
}

/// Median of `reps` timings of `f` after one warm-up, each bracketed by a stream sync.
fn median_time(k: &Kernels, reps: usize, mut f: impl FnMut() -> Result<(), CudaError>) -> Result<f64, CudaError> {
    f()?;
    k.sync()?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = std::time::Instant::now();
        f()?;
        k.sync()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[reps / 2])
}

/// Measures both ceilings (about a second of device time).
pub fn measure(k: &Kernels, b: &CudaBlas) -> Result<Ceilings, CudaError> {
    // Random bytes: zeros can run faster than real data.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand_u16 = |n: usize| -> Vec<u16> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // A bf16 in about [-1, 1]: sign, exponent 126 or 127, random mantissa.
                ((s >> 48) as u16 & 0x807f) | 0x3f00
            })
            .collect()
    };
    let n_copy = 1usize << 29; // 1 GiB of u16
    let src = k.upload(&rand_u16(n_copy))?;
    let mut dst = k.zeros::<u16>(n_copy)?;
    let t = median_time(k, 9, || Ok(k.stream.memcpy_dtod(&src, &mut dst)?))?;
    let copy_gbs = 2.0 * 2.0 * n_copy as f64 / t / 1e9;
    drop((src, dst));
    let n = 8192usize;
    let (a, bm) = (k.upload(&rand_u16(n * n))?, k.upload(&rand_u16(n * n))?);
    let c = k.zeros::<u16>(n * n)?;
    let st = k.stream.clone();
    let t = median_time(k, 9, || {
        let (ap, _ga) = a.device_ptr(&st);
        let (bp, _gb) = bm.device_ptr(&st);
        let (cp, _gc) = c.device_ptr(&st);
        let (alpha, beta) = (1f32, 0f32);
        use blas_sys::cudaDataType_t::CUDA_R_16BF;
        // SAFETY: three live n x n bf16 buffers; f32 scalars for the f32 compute type.
        unsafe {
            blas::gemm_ex(
                *b.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                n as i32,
                n as i32,
                (&alpha) as *const f32 as *const _,
                ap as *const _,
                CUDA_R_16BF,
                n as i32,
                bp as *const _,
                CUDA_R_16BF,
                n as i32,
                (&beta) as *const f32 as *const _,
                cp as *mut _,
                CUDA_R_16BF,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Blas(e.to_string()))
    })?;
    let gemm_tflops = 2.0 * (n as f64).powi(3) / t / 1e12;
    Ok(Ceilings { copy_gbs, gemm_tflops })
}
