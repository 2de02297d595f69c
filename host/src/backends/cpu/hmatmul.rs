//! Matrix products on 16-bit float weights (GGUF's F16 and BF16), kept in 16 bits: half the
//! memory and the bytes per step of widening them to f32 at load. Each weight is widened in
//! registers as it is used (F16C for f16, a shift for bf16) and multiplied with f32
//! activations, so the products are those of the f32 path up to the order of the sums.
//!
//! Work is split as in [`super::qmatmul`]: tasks of 16 weight rows, four rows sharing each
//! activation load and up to four activation rows sharing each widened weight vector.

use rayon::prelude::*;

/// Which 16-bit format the weights are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HKind {
    F16,
    Bf16,
}

impl HKind {
    /// The kind of a GGUF type, if it is a 16-bit float.
    pub fn of(ty: crate::model::gguf::GgmlType) -> Option<HKind> {
        use crate::model::gguf::GgmlType;
        match ty {
            GgmlType::F16 => Some(HKind::F16),
            GgmlType::Bf16 => Some(HKind::Bf16),
            _ => None,
        }
    }

    #[inline(always)]
    fn widen(self, bits: u16) -> f32 {
        match self {
            HKind::F16 => weave_kernels_gpu::elem::f16_bits_to_f32(bits),
            HKind::Bf16 => f32::from_bits((bits as u32) << 16),
        }
    }
}

/// A row-major `[rows][cols]` matrix of 16-bit floats.
#[derive(Debug, Clone)]
pub struct HMatrix {
    pub kind: HKind,
    pub rows: usize,
    pub cols: usize,
    pub bits: Vec<u16>,
}

impl HMatrix {
    /// An empty matrix of `cols` columns, to stack tensors into.
    pub fn new(kind: HKind, cols: usize) -> HMatrix {
        HMatrix { kind, rows: 0, cols, bits: Vec::new() }
    }

    /// Appends `rows` rows from a GGUF tensor's bytes; `None` if the type or size is wrong.
    pub fn push_ggml(&mut self, ty: crate::model::gguf::GgmlType, rows: usize, data: &[u8]) -> Option<()> {
        if HKind::of(ty) != Some(self.kind) || data.len() != rows * self.cols * 2 {
            return None;
        }
        self.bits.extend(data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
        self.rows += rows;
        Some(())
    }

    pub fn size_bytes(&self) -> usize {
        2 * self.bits.len()
    }

    /// Row `r` in f32.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(&self.bits[r * self.cols..(r + 1) * self.cols]) {
            *o = self.kind.widen(b);
        }
    }
}

/// Whether the SIMD kernels can run (AVX2, FMA and F16C).
pub fn has_simd() -> bool {
    super::attention::has_simd()
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

    /// Rows `r0..r0 + 4` against activation rows `i0..i0 + N`, the columns in steps of 8
    /// (the tail left to the caller: `cols % 8` columns from `cols / 8 * 8`).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C. Ranges are checked.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile4<const N: usize>(w: &HMatrix, r0: usize, x: &[f32], i0: usize) -> [[f32; 4]; N] {
        let c = w.cols;
        assert!(w.bits.len() >= (r0 + 4) * c && x.len() >= (i0 + N) * c);
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        let mut k = 0;
        // SAFETY: `k + 8 <= c`, inside rows asserted above.
        unsafe {
            while k + 8 <= c {
                let wv: [__m256; 4] = std::array::from_fn(|r| load8(w.kind, w.bits.as_ptr().add((r0 + r) * c + k)));
                for (n, acc_n) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add((i0 + n) * c + k));
                    for (a, wr) in acc_n.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(*wr, xv, *a);
                    }
                }
                k += 8;
            }
        }
        let mut out = [[0f32; 4]; N];
        for (o, a) in out.iter_mut().zip(acc) {
            for (o, a) in o.iter_mut().zip(a) {
                *o = hsum(a);
            }
        }
        out
    }
}

/// A raw output pointer shared by the tasks of [`hmatmul`], each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own rows' columns); the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[n][w.rows] (+)= x[n][w.cols] * w^T`.
pub fn hmatmul(simd: bool, w: &HMatrix, x: &[f32], n: usize, out: &mut [f32], accumulate: bool, threads: usize) {
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
            if simd {
                // The SIMD kernels take columns in eights; the tail columns are added here.
                let body = c / 8 * 8;
                let tail = |i: usize, r: usize| -> f32 {
                    (body..c).map(|k| w.kind.widen(w.bits[r * c + k]) * x[i * c + k]).sum()
                };
                while r + 4 <= t1 {
                    let mut i = c0;
                    while i < c1 {
                        let m = (c1 - i).min(4);
                        macro_rules! tile {
                            ($n:literal) => {{
                                // SAFETY: `simd` means AVX2, FMA and F16C were detected; the
                                // kernel checks its ranges.
                                let v = unsafe { x86::tile4::<$n>(w, r, x, i) };
                                for (k, v) in v.into_iter().enumerate() {
                                    for (j, v) in v.into_iter().enumerate() {
                                        put(i + k, r + j, v + tail(i + k, r + j));
                                    }
                                }
                            }};
                        }
                        match m {
                            4 => tile!(4),
                            3 => tile!(3),
                            2 => tile!(2),
                            _ => tile!(1),
                        }
                        i += m;
                    }
                    r += 4;
                }
            }
            let _ = simd;
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
        let simds: Vec<bool> = if has_simd() { vec![false, true] } else { vec![false] };
        for kind in [HKind::F16, HKind::Bf16] {
            // Rows past the four-row tiles, columns with a tail past the eights, activation rows
            // past a chunk.
            for (rows, cols, n) in [(1, 8, 1), (7, 61, 3), (37, 576, 5), (18, 96, 70)] {
                let (w, wf) = matrix(kind, rows, cols);
                let x: Vec<f32> = (0..n * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
                for &simd in &simds {
                    let mut got = vec![1f32; n * rows];
                    hmatmul(simd, &w, &x, n, &mut got, true, 2);
                    for i in 0..n {
                        for r in 0..rows {
                            let want: f32 = (0..cols).map(|k| wf[r * cols + k] * x[i * cols + k]).sum();
                            let mag: f32 = (0..cols).map(|k| (wf[r * cols + k] * x[i * cols + k]).abs()).sum();
                            let e = (got[i * rows + r] - 1.0 - want).abs();
                            assert!(
                                e <= 1e-5 * mag + 1e-6,
                                "{kind:?} simd {simd} [{i}][{r}]: {} vs {want}",
                                got[i * rows + r] - 1.0
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_read_back_widened() {
        let (w, wf) = matrix(HKind::Bf16, 3, 40);
        let mut row = vec![0f32; 40];
        w.row(2, &mut row);
        assert_eq!(row, wf[80..120]);
        let mut m = HMatrix::new(HKind::F16, 4);
        assert!(m.push_ggml(crate::model::gguf::GgmlType::F16, 1, &[0; 7]).is_none(), "wrong size");
        assert!(m.push_ggml(crate::model::gguf::GgmlType::Bf16, 1, &[0; 8]).is_none(), "wrong kind");
        assert!(m.push_ggml(crate::model::gguf::GgmlType::F16, 1, &[0; 8]).is_some());
    }
}
