//! Matrix products on 16-bit float weights (GGUF's F16 and BF16, [`HMatrix`]), kept in 16 bits: half the
//! memory and the bytes per step of widening them to f32 at load. Each weight is widened in
//! registers as it is used (F16C for f16, a shift for bf16) and multiplied with f32
//! activations, so the products are those of the f32 path up to the order of the sums.
//!
//! Work is split as in [`super::qmatmul`]: tasks of 16 weight rows, four rows sharing each
//! activation load and up to four activation rows sharing each widened weight vector.

use crate::model::half::{HKind, HMatrix};
use rayon::prelude::*;

/// Which kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HIsa {
    Scalar,
    /// AVX2, FMA and F16C: four weight rows x two activation rows a tile (16 registers).
    Avx2,
    /// AVX-512 F/BW besides: four weight rows x six activation rows on 512-bit registers (24
    /// accumulators of the 32).
    Avx512,
}

impl HIsa {
    pub fn detect() -> HIsa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if super::attention::has_simd() {
                return if has!("avx512f") && has!("avx512bw") { HIsa::Avx512 } else { HIsa::Avx2 };
            }
        }
        HIsa::Scalar
    }

    /// Every kernel set this CPU can run (for tests).
    pub fn all_here() -> Vec<HIsa> {
        match HIsa::detect() {
            HIsa::Scalar => vec![HIsa::Scalar],
            HIsa::Avx2 => vec![HIsa::Scalar, HIsa::Avx2],
            HIsa::Avx512 => vec![HIsa::Scalar, HIsa::Avx2, HIsa::Avx512],
        }
    }

    /// The kernel sets this CPU cannot run, for tests to name as skipped.
    pub fn missing_here() -> Vec<HIsa> {
        let here = HIsa::all_here();
        [HIsa::Scalar, HIsa::Avx2, HIsa::Avx512].into_iter().filter(|i| !here.contains(i)).collect()
    }
}

/// The definition: rows `r0..r0 + R` against activation rows `i0..i0 + N` of `x`.
fn scalar_tile<const R: usize, const N: usize>(w: &HMatrix, r0: usize, x: &[f32], i0: usize) -> [[f32; R]; N] {
    let c = w.cols;
    let mut out = [[0f32; R]; N];
    for (n, o) in out.iter_mut().enumerate() {
        let xr = &x[(i0 + n) * c..(i0 + n + 1) * c];
        for (r, o) in o.iter_mut().enumerate() {
            let wr = &w.bits[(r0 + r) * c..(r0 + r + 1) * c];
            *o = wr.iter().zip(xr).map(|(&b, &v)| w.kind.widen(b) * v).sum();
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{HKind, HMatrix};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Eight 16-bit weights at `p`, widened.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(kind: HKind, p: *const u16) -> __m256 {
        // SAFETY: the caller passes 8 readable u16.
        let h = unsafe { _mm_loadu_si128(p.cast()) };
        match kind {
            HKind::F16 => _mm256_cvtph_ps(h),
            HKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))),
        }
    }

    /// Sixteen 16-bit weights at `p`, widened.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw")]
    unsafe fn load16(kind: HKind, p: *const u16) -> __m512 {
        // SAFETY: the caller passes 16 readable u16.
        let h = unsafe { _mm256_loadu_si256(p.cast()) };
        match kind {
            HKind::F16 => _mm512_cvtph_ps(h),
            HKind::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    fn hsum512(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }

    /// Rows `r0..r0 + 4` against activation rows `i0..i0 + N`, the columns in steps of the
    /// register width (the tail columns, `cols % width`, are left to the caller). Each widened
    /// weight vector serves the `N` activation rows, each activation vector the four rows.
    macro_rules! tile {
        ($name:ident, $features:literal, $w:literal, $v:ty, $zero:ident, $load:ident, $loadx:ident, $fma:ident, $hsum:ident) => {
            /// # Safety
            /// The CPU must have the features this is compiled for. Ranges are checked.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const N: usize>(w: &HMatrix, r0: usize, x: &[f32], i0: usize) -> [[f32; 4]; N] {
                let c = w.cols;
                assert!(w.bits.len() >= (r0 + 4) * c && x.len() >= (i0 + N) * c);
                let mut acc = [[$zero(); 4]; N];
                let mut k = 0;
                // SAFETY: `k + width <= c`, inside the rows asserted above.
                unsafe {
                    while k + $w <= c {
                        let wv: [$v; 4] = std::array::from_fn(|r| $load(w.kind, w.bits.as_ptr().add((r0 + r) * c + k)));
                        for (n, acc_n) in acc.iter_mut().enumerate() {
                            let xv = $loadx(x.as_ptr().add((i0 + n) * c + k));
                            for (a, wr) in acc_n.iter_mut().zip(&wv) {
                                *a = $fma(*wr, xv, *a);
                            }
                        }
                        k += $w;
                    }
                }
                let mut out = [[0f32; 4]; N];
                for (o, a) in out.iter_mut().zip(acc) {
                    for (o, a) in o.iter_mut().zip(a) {
                        *o = $hsum(a);
                    }
                }
                out
            }
        };
    }

    tile!(tile_256, "avx2,fma,f16c", 8, __m256, _mm256_setzero_ps, load8, _mm256_loadu_ps, _mm256_fmadd_ps, hsum);
    tile!(
        tile_512,
        "avx2,fma,f16c,avx512f,avx512bw",
        16,
        __m512,
        _mm512_setzero_ps,
        load16,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        hsum512
    );
}

/// A raw output pointer shared by the tasks of [`hmatmul`], each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own rows' columns); the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[n][w.rows] (+)= x[n][w.cols] * w^T`.
pub fn hmatmul(isa: HIsa, w: &HMatrix, x: &[f32], n: usize, out: &mut [f32], accumulate: bool, threads: usize) {
    let (rows, c) = (w.rows, w.cols);
    assert_eq!(x.len(), n * c, "activation rows");
    assert_eq!(out.len(), n * rows);
    const TASK_ROWS: usize = 16;
    const CHUNK: usize = 64;
    let tasks = rows.div_ceil(TASK_ROWS);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let run = |t: usize| {
        // The whole `OutPtr` (Sync), not just its raw field, goes into the closure.
        let p = out_ptr;
        let put = |i: usize, r: usize, v: f32| {
            // SAFETY: inside `out` (asserted length); only the task owning row `r` writes it.
            unsafe {
                let o = p.0.add(i * rows + r);
                *o = if accumulate { *o + v } else { v };
            }
        };
        let (t0, t1) = (t * TASK_ROWS, ((t + 1) * TASK_ROWS).min(rows));
        for c0 in (0..n).step_by(CHUNK) {
            let c1 = (c0 + CHUNK).min(n);
            let mut r = t0;
            #[cfg(target_arch = "x86_64")]
            if isa != HIsa::Scalar {
                // The kernels take whole registers of columns; the tail columns are added here.
                let (width, max_n) = if isa == HIsa::Avx512 { (16, 6) } else { (8, 2) };
                let body = c / width * width;
                let tail = |i: usize, r: usize| -> f32 {
                    (body..c).map(|k| w.kind.widen(w.bits[r * c + k]) * x[i * c + k]).sum()
                };
                while r + 4 <= t1 {
                    let mut i = c0;
                    while i < c1 {
                        let m = (c1 - i).min(max_n);
                        macro_rules! tile {
                            ($k:ident, $n:literal) => {{
                                // SAFETY: `isa` was detected on this CPU; the kernel checks
                                // its ranges.
                                let v = unsafe { x86::$k::<$n>(w, r, x, i) };
                                for (k, v) in v.into_iter().enumerate() {
                                    for (j, v) in v.into_iter().enumerate() {
                                        put(i + k, r + j, v + tail(i + k, r + j));
                                    }
                                }
                            }};
                        }
                        match (isa, m) {
                            (HIsa::Avx512, 6) => tile!(tile_512, 6),
                            (HIsa::Avx512, 5) => tile!(tile_512, 5),
                            (HIsa::Avx512, 4) => tile!(tile_512, 4),
                            (HIsa::Avx512, 3) => tile!(tile_512, 3),
                            (HIsa::Avx512, 2) => tile!(tile_512, 2),
                            (HIsa::Avx512, _) => tile!(tile_512, 1),
                            (_, 2) => tile!(tile_256, 2),
                            _ => tile!(tile_256, 1),
                        }
                        i += m;
                    }
                    r += 4;
                }
            }
            let _ = isa;
            for r in r..t1 {
                for i in c0..c1 {
                    put(i, r, scalar_tile::<1, 1>(w, r, x, i)[0][0]);
                }
            }
        }
    };
    if threads > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(kind: HKind, rows: usize, cols: usize) -> (HMatrix, Vec<f32>) {
        let mut m = HMatrix::new(kind, cols);
        let mut exact = Vec::new();
        let mut s = 0x2545_f491u32;
        for _ in 0..rows * cols {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let v = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            let bits = match kind {
                HKind::F16 => weave_kernels_gpu::elem::f32_to_f16_bits(v),
                HKind::Bf16 => (v.to_bits() >> 16) as u16,
            };
            m.bits.push(bits);
            exact.push(kind.widen(bits));
        }
        m.rows = rows;
        (m, exact)
    }

    #[test]
    fn products_equal_the_f32_ones() {
        {
            use std::io::Write;
            for isa in HIsa::missing_here() {
                let _ =
                    writeln!(std::io::stderr(), "products_equal_the_f32_ones: skipped: {isa:?} (this CPU lacks it)");
            }
        }
        let isas = HIsa::all_here();
        for kind in [HKind::F16, HKind::Bf16] {
            // Rows past the four-row tiles, columns with a tail past the eights, activation rows
            // past a chunk.
            for (rows, cols, n) in [(1, 8, 1), (7, 61, 3), (37, 576, 5), (18, 104, 70)] {
                let (w, wf) = matrix(kind, rows, cols);
                let x: Vec<f32> = (0..n * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
                for &isa in &isas {
                    let mut got = vec![1f32; n * rows];
                    hmatmul(isa, &w, &x, n, &mut got, true, 2);
                    for i in 0..n {
                        for r in 0..rows {
                            let want: f32 = (0..cols).map(|k| wf[r * cols + k] * x[i * cols + k]).sum();
                            let mag: f32 = (0..cols).map(|k| (wf[r * cols + k] * x[i * cols + k]).abs()).sum();
                            let e = (got[i * rows + r] - 1.0 - want).abs();
                            assert!(
                                e <= 1e-5 * mag + 1e-6,
                                "{kind:?} {isa:?} [{i}][{r}]: {} vs {want}",
                                got[i * rows + r] - 1.0
                            );
                        }
                    }
                }
            }
        }
    }
}
