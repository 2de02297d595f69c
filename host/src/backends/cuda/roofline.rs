//! The device's two ceilings, measured in the run that quotes them (as METHOD.md asks): a
//! device-to-device copy's bandwidth (bytes read plus bytes written) and a large bf16 GEMM's
//! rate through the device's GEMM (cuBLAS), on random data.

use super::dev::Gemm;
use super::{CudaError, Kernels};

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
pub fn measure(k: &Kernels) -> Result<Ceilings, CudaError> {
    if k.arch == "emu" {
        return Err(CudaError::Unsupported("the emulator has no roofline: it does not model time"));
    }
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
    let dst = k.zeros::<u16>(n_copy)?;
    let t = median_time(k, 9, || k.dev.copy(&src, &dst))?;
    let copy_gbs = 2.0 * 2.0 * n_copy as f64 / t / 1e9;
    drop((src, dst));
    let n = 8192usize;
    let (a, bm) = (k.upload(&rand_u16(n * n))?, k.upload(&rand_u16(n * n))?);
    let c = k.zeros::<u16>(n * n)?;
    // The model's own GEMM (`x * w^T`, bf16 in, f32 accumulate), square.
    let g = Gemm {
        x: a.addr(),
        w: bm.addr(),
        c: c.addr(),
        n,
        out_dim: n,
        in_dim: n,
        accumulate: false,
        c_f32: false,
        dtype: weave_kernels_gpu::Dtype::Bf16,
    };
    let t = median_time(k, 9, || k.dev.gemm(&g))?;
    let gemm_tflops = 2.0 * (n as f64).powi(3) / t / 1e12;
    Ok(Ceilings { copy_gbs, gemm_tflops })
}
