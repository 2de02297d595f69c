//! Matrix products on weights kept in their GGUF quantization, the way llama.cpp does them:
//! activations are quantized to 8 bits per block of 32 (one scale a block), and each block's
//! dot product is an integer sum scaled once.
//!
//! Weights are repacked at load into two kinds, so that two kernels cover every type:
//! - `U4`: 4-bit values `q` in 0..15 with a scale `d` and an offset `m` per block,
//!   `w = d * q + m` (Q4_1 as it is; Q4_0's `d * (q - 8)` is `m = -8 d`, exactly);
//! - `I8`: signed bytes with a scale per block, `w = d * q` (Q8_0).
//!
//! Scales are widened to f32 at load, so no kernel converts f16. The activations keep each
//! block's sum too, which the `U4` offset term multiplies.
//!
//! Kernels: portable scalar code, and AVX2 (+FMA) picked at run time. The scalar kernel is
//! the definition; the SIMD one is tested against it.

use rayon::prelude::*;

/// Elements per quantization block.
pub const QK: usize = 32;

/// How a matrix's blocks are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    /// 16 bytes of nibbles a block (element `j` in the low nibble of byte `j`, `j + 16` in its
    /// high nibble); `w = d * q + m`.
    U4,
    /// 32 signed bytes a block; `w = d * q`.
    I8,
}

/// A row-major `[rows][cols]` matrix in blocks of 32 along each row.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    /// The packed values, `rows * cols / 32` blocks of 16 (`U4`) or 32 (`I8`) bytes.
    pub qs: Vec<u8>,
    /// A scale per block.
    pub d: Vec<f32>,
    /// An offset per block (`U4` only).
    pub m: Vec<f32>,
}

fn f16(b: &[u8], i: usize) -> f32 {
    weave_kernels_gpu::elem::f16_bits_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

impl QMatrix {
    /// Repacks GGUF blocks (`Q4_0`: 18 bytes, `Q4_1`: 20, `Q8_0`: 34 a block). `None` for other
    /// types, or a row length that is not a whole number of blocks.
    pub fn from_ggml(ty: crate::model::gguf::GgmlType, rows: usize, cols: usize, data: &[u8]) -> Option<QMatrix> {
        use crate::model::gguf::GgmlType;
        if !cols.is_multiple_of(QK) {
            return None;
        }
        let nb = rows * cols / QK;
        let (kind, bytes) = match ty {
            GgmlType::Q4_0 => (QKind::U4, 18),
            GgmlType::Q4_1 => (QKind::U4, 20),
            GgmlType::Q8_0 => (QKind::I8, 34),
            _ => return None,
        };
        if data.len() != nb * bytes {
            return None;
        }
        let per = if kind == QKind::U4 { 16 } else { 32 };
        let mut m = QMatrix {
            kind,
            rows,
            cols,
            qs: Vec::with_capacity(nb * per),
            d: Vec::with_capacity(nb),
            m: Vec::with_capacity(if kind == QKind::U4 { nb } else { 0 }),
        };
        for b in data.chunks_exact(bytes) {
            let d = f16(b, 0);
            m.d.push(d);
            match ty {
                GgmlType::Q4_0 => {
                    m.m.push(-8.0 * d);
                    m.qs.extend_from_slice(&b[2..18]);
                }
                GgmlType::Q4_1 => {
                    m.m.push(f16(b, 2));
                    m.qs.extend_from_slice(&b[4..20]);
                }
                _ => m.qs.extend_from_slice(&b[2..34]),
            }
        }
        Some(m)
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / QK
    }

    fn bytes_per_block(&self) -> usize {
        match self.kind {
            QKind::U4 => 16,
            QKind::I8 => 32,
        }
    }

    /// Bytes held (values and f32 scales).
    pub fn size_bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.m.len())
    }

    /// Row `r` in f32 (embedding lookups).
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.blocks_per_row();
        let bpb = self.bytes_per_block();
        for (j, o) in out.chunks_exact_mut(QK).enumerate() {
            let b = r * nb + j;
            let q = &self.qs[b * bpb..(b + 1) * bpb];
            let d = self.d[b];
            match self.kind {
                QKind::U4 => {
                    let m = self.m[b];
                    for k in 0..16 {
                        o[k] = (q[k] & 0x0f) as f32 * d + m;
                        o[k + 16] = (q[k] >> 4) as f32 * d + m;
                    }
                }
                QKind::I8 => {
                    for k in 0..32 {
                        o[k] = q[k] as i8 as f32 * d;
                    }
                }
            }
        }
    }
}

/// Activations quantized for [`qmatmul`]: per block of 32, signed bytes, a scale and the
/// block's sum (of the quantized values, scaled). Reused from step to step.
#[derive(Debug, Clone, Default)]
pub struct QActs {
    pub rows: usize,
    pub cols: usize,
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sum: Vec<f32>,
}

impl QActs {
    /// Quantizes `x` (`[rows][cols]`, `cols` a multiple of 32).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols);
        assert_eq!(cols % QK, 0, "row length {cols} is not a multiple of {QK}");
        let nb = rows * cols / QK;
        self.rows = rows;
        self.cols = cols;
        self.q.resize(rows * cols, 0);
        self.d.resize(nb, 0.0);
        self.sum.resize(nb, 0.0);
        type Block<'a> = (((&'a [f32], &'a mut [i8]), &'a mut f32), &'a mut f32);
        let work = |(((xs, q), d), s): Block<'_>| (*d, *s) = quantize_block(xs, q);
        if nb >= 1024 {
            x.par_chunks_exact(QK)
                .zip(self.q.par_chunks_exact_mut(QK))
                .zip(self.d.par_iter_mut())
                .zip(self.sum.par_iter_mut())
                .with_min_len(256)
                .for_each(work);
        } else {
            x.chunks_exact(QK)
                .zip(self.q.chunks_exact_mut(QK))
                .zip(self.d.iter_mut())
                .zip(self.sum.iter_mut())
                .for_each(work);
        }
    }
}

/// One block of 32 to signed bytes: returns its scale and its sum.
fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut qsum = 0i32;
    for (o, &v) in q.iter_mut().zip(xs) {
        *o = (v * inv).round() as i8;
        qsum += *o as i32;
    }
    // The sum of the quantized values, not of the exact ones: then a block's product is exactly
    // that of the dequantized weights with the quantized activations. With the exact sum the
    // offset term's error would not cancel against the `d * q` term's, and the error grows
    // about threefold (`q` is 0..15 while `w` is centred).
    (scale, scale * qsum as f32)
}

/// Which dot-product kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    /// AVX2 plus AVX-512 VNNI's `dpbusd` on 256-bit registers (the row kernels).
    Avx512Vnni,
}

impl Isa {
    /// The best this CPU has.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                if std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512vl") {
                    return Isa::Avx512Vnni;
                }
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// Dot product of the weight row at block `b0` with the activation row at block `a0`.
fn dot(isa: Isa, w: &QMatrix, b0: usize, a: &QActs, a0: usize, nb: usize) -> f32 {
    match (isa, w.kind) {
        // SAFETY (these four): `isa` was detected on this CPU (AVX2 and FMA, plus VNNI for
        // `Avx512Vnni`); the kernels check the ranges.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, QKind::U4) => unsafe { avx2::dot_u4_rows::<1>(w, b0, nb, a, a0)[0] },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, QKind::I8) => unsafe { avx2::dot_i8_rows::<1>(w, b0, nb, a, a0)[0] },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, QKind::U4) => unsafe { avx2::dot_u4_rows_vnni::<1>(w, b0, nb, a, a0)[0] },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, QKind::I8) => unsafe { avx2::dot_i8_rows_vnni::<1>(w, b0, nb, a, a0)[0] },
        (_, QKind::U4) => {
            scalar_dot_u4(&w.qs[b0 * 16..(b0 + nb) * 16], &w.d[b0..b0 + nb], &w.m[b0..b0 + nb], a, a0, nb)
        }
        (_, QKind::I8) => scalar_dot_i8(&w.qs[b0 * 32..(b0 + nb) * 32], &w.d[b0..b0 + nb], a, a0, nb),
    }
}

/// The definition: `Σ_blocks d_w d_a Σ q_w q_a + m_w d_a Σ q_a`.
fn scalar_dot_u4(qs: &[u8], d: &[f32], m: &[f32], a: &QActs, a0: usize, nb: usize) -> f32 {
    let mut acc = 0f32;
    for b in 0..nb {
        let q = &qs[b * 16..b * 16 + 16];
        let x = &a.q[(a0 + b) * QK..(a0 + b + 1) * QK];
        let mut isum = 0i32;
        for k in 0..16 {
            isum += (q[k] & 0x0f) as i32 * x[k] as i32 + (q[k] >> 4) as i32 * x[k + 16] as i32;
        }
        acc += d[b] * a.d[a0 + b] * isum as f32 + m[b] * a.sum[a0 + b];
    }
    acc
}

fn scalar_dot_i8(qs: &[u8], d: &[f32], a: &QActs, a0: usize, nb: usize) -> f32 {
    let mut acc = 0f32;
    for b in 0..nb {
        let q = &qs[b * 32..b * 32 + 32];
        let x = &a.q[(a0 + b) * QK..(a0 + b + 1) * QK];
        let isum: i32 = q.iter().zip(x).map(|(&w, &x)| w as i8 as i32 * x as i32).sum();
        acc += d[b] * a.d[a0 + b] * isum as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QActs, QK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 nibbles of a `U4` block as bytes, in element order (low nibbles, then high).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn unpack_u4(packed: __m128i) -> __m256i {
        let mask = _mm_set1_epi8(0x0f);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask))
    }

    /// Kernels for `R` consecutive weight rows (starting at block `b0`, `nb` blocks a row)
    /// against one activation row: each activation block is loaded once for all `R` rows
    /// (`R = 1` is the plain dot product of [`super::scalar_dot_u4`] / [`super::scalar_dot_i8`]).
    /// `$prod(w, x)` is the 8 lanes of i32 sums of byte products of unsigned `w` and signed
    /// `x`: `maddubs` + `madd` on AVX2, one `dpbusd` with AVX-512 VNNI. One FMA a block
    /// applies both scales. `U4` pairs stay within i16 in `maddubs` (2 * 15 * 127); `I8`
    /// weights go through the usual sign trick (`|w|` times `x * sign(w)`, since one operand
    /// must be unsigned), whose pairs also fit (2 * 128 * 127).
    macro_rules! row_kernels {
        ($u4:ident, $u4x2:ident, $i8:ident, $features:literal, $prod:ident) => {
            /// `R` weight rows of `U4` blocks.
            ///
            /// # Safety
            /// The CPU must have the features this is compiled for; `w` holds rows through
            /// `b0 / nb + R`, `a` blocks `a0..a0 + nb`.
            #[target_feature(enable = $features)]
            pub unsafe fn $u4<const R: usize>(
                w: &super::QMatrix,
                b0: usize,
                nb: usize,
                a: &QActs,
                a0: usize,
            ) -> [f32; R] {
                assert!(w.qs.len() >= (b0 + R * nb) * 16 && w.d.len() >= b0 + R * nb && w.m.len() >= b0 + R * nb);
                assert!(a.q.len() >= (a0 + nb) * QK && a.d.len() >= a0 + nb && a.sum.len() >= a0 + nb);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut offs = [0f32; R];
                for b in 0..nb {
                    // SAFETY: in bounds by the asserts above; unaligned loads.
                    let x = unsafe { _mm256_loadu_si256(a.q.as_ptr().add((a0 + b) * QK) as *const __m256i) };
                    let (da, sa) = (a.d[a0 + b], a.sum[a0 + b]);
                    for (r, (acc_r, off_r)) in acc.iter_mut().zip(offs.iter_mut()).enumerate() {
                        let wb = b0 + r * nb + b;
                        // SAFETY: as above.
                        let packed = unsafe { _mm_loadu_si128(w.qs.as_ptr().add(wb * 16) as *const __m128i) };
                        let p = $prod(unpack_u4(packed), x);
                        *acc_r = _mm256_fmadd_ps(_mm256_set1_ps(w.d[wb] * da), _mm256_cvtepi32_ps(p), *acc_r);
                        *off_r += w.m[wb] * sa;
                    }
                }
                let mut out = [0f32; R];
                for ((o, v), off) in out.iter_mut().zip(acc).zip(offs) {
                    *o = hsum(v) + off;
                }
                out
            }

            /// `R` weight rows against two activation rows (blocks from `a0` and `a1`): each
            /// weight block is unpacked once for both.
            ///
            /// # Safety
            /// As the kernel above, for both activation rows.
            #[target_feature(enable = $features)]
            pub unsafe fn $u4x2<const R: usize>(
                w: &super::QMatrix,
                b0: usize,
                nb: usize,
                a: &QActs,
                a0: usize,
                a1: usize,
            ) -> [[f32; R]; 2] {
                assert!(w.qs.len() >= (b0 + R * nb) * 16 && w.d.len() >= b0 + R * nb && w.m.len() >= b0 + R * nb);
                let need = (a0.max(a1) + nb);
                assert!(a.q.len() >= need * QK && a.d.len() >= need && a.sum.len() >= need);
                let mut acc = [[_mm256_setzero_ps(); R]; 2];
                let mut offs = [[0f32; R]; 2];
                for b in 0..nb {
                    // SAFETY: in bounds by the asserts above; unaligned loads.
                    let (x0, x1) = unsafe {
                        (
                            _mm256_loadu_si256(a.q.as_ptr().add((a0 + b) * QK) as *const __m256i),
                            _mm256_loadu_si256(a.q.as_ptr().add((a1 + b) * QK) as *const __m256i),
                        )
                    };
                    let (d0, d1, s0, s1) = (a.d[a0 + b], a.d[a1 + b], a.sum[a0 + b], a.sum[a1 + b]);
                    for r in 0..R {
                        let wb = b0 + r * nb + b;
                        // SAFETY: as above.
                        let packed = unsafe { _mm_loadu_si128(w.qs.as_ptr().add(wb * 16) as *const __m128i) };
                        let wv = unpack_u4(packed);
                        let (wd, wm) = (w.d[wb], w.m[wb]);
                        let p0 = _mm256_cvtepi32_ps($prod(wv, x0));
                        let p1 = _mm256_cvtepi32_ps($prod(wv, x1));
                        acc[0][r] = _mm256_fmadd_ps(_mm256_set1_ps(wd * d0), p0, acc[0][r]);
                        acc[1][r] = _mm256_fmadd_ps(_mm256_set1_ps(wd * d1), p1, acc[1][r]);
                        offs[0][r] += wm * s0;
                        offs[1][r] += wm * s1;
                    }
                }
                let mut out = [[0f32; R]; 2];
                for i in 0..2 {
                    for r in 0..R {
                        out[i][r] = hsum(acc[i][r]) + offs[i][r];
                    }
                }
                out
            }

            /// `R` weight rows of `I8` blocks.
            ///
            /// # Safety
            /// As the `u4` kernel beside it.
            #[target_feature(enable = $features)]
            pub unsafe fn $i8<const R: usize>(
                w: &super::QMatrix,
                b0: usize,
                nb: usize,
                a: &QActs,
                a0: usize,
            ) -> [f32; R] {
                assert!(w.qs.len() >= (b0 + R * nb) * 32 && w.d.len() >= b0 + R * nb);
                assert!(a.q.len() >= (a0 + nb) * QK && a.d.len() >= a0 + nb);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    // SAFETY: in bounds by the asserts above; unaligned loads.
                    let x = unsafe { _mm256_loadu_si256(a.q.as_ptr().add((a0 + b) * QK) as *const __m256i) };
                    let da = a.d[a0 + b];
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let wb = b0 + r * nb + b;
                        // SAFETY: as above.
                        let wv = unsafe { _mm256_loadu_si256(w.qs.as_ptr().add(wb * 32) as *const __m256i) };
                        let p = $prod(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv));
                        *acc_r = _mm256_fmadd_ps(_mm256_set1_ps(w.d[wb] * da), _mm256_cvtepi32_ps(p), *acc_r);
                    }
                }
                acc.map(|v| hsum(v))
            }
        };
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn prod_avx2(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    fn prod_vnni(w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    }

    row_kernels!(dot_u4_rows, dot_u4_rows_x2, dot_i8_rows, "avx2,fma", prod_avx2);
    row_kernels!(dot_u4_rows_vnni, dot_u4_rows_x2_vnni, dot_i8_rows_vnni, "avx2,fma,avx512vnni,avx512vl", prod_vnni);
}

/// A raw output pointer shared by the threads of [`qmatmul`], each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the threads write disjoint elements (their own weight rows' columns), and the
// buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[n][w.rows] (+)= a[n][w.cols] * w^T`, with `a` quantized by [`QActs::quantize`].
/// Threads split the weight rows, so each weight row is read once for the whole batch.
pub fn qmatmul(isa: Isa, w: &QMatrix, a: &QActs, out: &mut [f32], accumulate: bool, threads: usize) {
    let n = a.rows;
    assert_eq!(a.cols, w.cols, "activation row length");
    assert_eq!(out.len(), n * w.rows);
    let nb = w.blocks_per_row();
    // Small tiles of weight rows stay in L1 while every activation row passes over them.
    let tile = 8usize;
    let tiles = w.rows.div_ceil(tile);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let rows = w.rows;
    let run = |t: usize| {
        let p = out_ptr;
        let (r0, r1) = (t * tile, ((t + 1) * tile).min(rows));
        let put = |i: usize, r: usize, v: f32| {
            // SAFETY: `i * rows + r` is inside `out` (asserted length), and only the task
            // owning tile `t` writes columns `r0..r1`.
            unsafe {
                let o = p.0.add(i * rows + r);
                *o = if accumulate { *o + v } else { v };
            }
        };
        // U4 weights against activation rows in pairs: each weight block unpacked once for two.
        let mut i0 = 0;
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar && w.kind == QKind::U4 {
            while i0 + 2 <= n {
                let mut r = r0;
                while r + 4 <= r1 {
                    let (a0, a1) = (i0 * nb, (i0 + 1) * nb);
                    // SAFETY: `isa` was detected on this CPU; rows `r..r + 4` and activation rows
                    // `i0`, `i0 + 1` exist.
                    let v = unsafe {
                        if isa == Isa::Avx512Vnni {
                            avx2::dot_u4_rows_x2_vnni::<4>(w, r * nb, nb, a, a0, a1)
                        } else {
                            avx2::dot_u4_rows_x2::<4>(w, r * nb, nb, a, a0, a1)
                        }
                    };
                    for (k, (v0, v1)) in v[0].into_iter().zip(v[1]).enumerate() {
                        put(i0, r + k, v0);
                        put(i0 + 1, r + k, v1);
                    }
                    r += 4;
                }
                for r in r..r1 {
                    put(i0, r, dot(isa, w, r * nb, a, i0 * nb, nb));
                    put(i0 + 1, r, dot(isa, w, r * nb, a, (i0 + 1) * nb, nb));
                }
                i0 += 2;
            }
        }
        for i in i0..n {
            let mut r = r0;
            // Four rows at a time share each activation load.
            #[cfg(target_arch = "x86_64")]
            if isa != Isa::Scalar {
                while r + 4 <= r1 {
                    // SAFETY: `isa` was detected on this CPU (AVX2 and FMA, plus VNNI for
                    // `Avx512Vnni`); rows `r..r + 4` exist.
                    let v = unsafe {
                        match (isa, w.kind) {
                            (Isa::Avx512Vnni, QKind::U4) => avx2::dot_u4_rows_vnni::<4>(w, r * nb, nb, a, i * nb),
                            (Isa::Avx512Vnni, QKind::I8) => avx2::dot_i8_rows_vnni::<4>(w, r * nb, nb, a, i * nb),
                            (_, QKind::U4) => avx2::dot_u4_rows::<4>(w, r * nb, nb, a, i * nb),
                            (_, QKind::I8) => avx2::dot_i8_rows::<4>(w, r * nb, nb, a, i * nb),
                        }
                    };
                    for (k, v) in v.into_iter().enumerate() {
                        put(i, r + k, v);
                    }
                    r += 4;
                }
            }
            for r in r..r1 {
                put(i, r, dot(isa, w, r * nb, a, i * nb, nb));
            }
        }
    };
    if threads > 1 && tiles > 1 {
        (0..tiles).into_par_iter().with_min_len(4).for_each(run);
    } else {
        (0..tiles).for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgmlType;

    /// xorshift: deterministic pseudo-random bytes.
    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 11) as u8
            })
            .collect()
    }

    fn f16b(x: f32) -> [u8; 2] {
        weave_kernels_gpu::elem::f32_to_f16_bits(x).to_le_bytes()
    }

    /// A random GGUF tensor of `ty`, `rows x cols`.
    fn ggml(ty: GgmlType, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let nb = rows * cols / 32;
        let raw = bytes(nb * 32, seed);
        let mut out = Vec::new();
        for (b, q) in raw.chunks(32).enumerate() {
            let d = 0.001 + (b % 7) as f32 * 0.003;
            match ty {
                GgmlType::Q4_0 => {
                    out.extend(f16b(d));
                    out.extend(&q[..16]);
                }
                GgmlType::Q4_1 => {
                    out.extend(f16b(d));
                    out.extend(f16b(-0.02 * (b % 5) as f32));
                    out.extend(&q[..16]);
                }
                _ => {
                    out.extend(f16b(d));
                    out.extend(q);
                }
            }
        }
        out
    }

    fn acts(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        bytes(rows * cols, seed).iter().map(|&b| (b as f32 - 128.0) / 50.0).collect()
    }

    #[test]
    fn repacked_blocks_decode_like_the_dequantizer() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let (rows, cols) = (3, 96);
            let data = ggml(ty, rows, cols, 5);
            let m = QMatrix::from_ggml(ty, rows, cols, &data).unwrap();
            let mut want = vec![0f32; rows * cols];
            crate::model::quant::dequantize(ty, &data, &mut want).unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                m.dequant_row(r, &mut row);
                assert_eq!(row, want[r * cols..(r + 1) * cols], "{ty:?} row {r}");
            }
        }
        assert!(QMatrix::from_ggml(GgmlType::Q4_1, 2, 48, &[0; 60]).is_none(), "48 is not whole blocks");
        assert!(QMatrix::from_ggml(GgmlType::F32, 1, 32, &[0; 128]).is_none());
    }

    #[test]
    fn simd_kernels_equal_the_scalar_one() {
        let isa = Isa::detect();
        if isa == Isa::Scalar {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: no AVX2 on this CPU, only the scalar kernel exists here");
            return;
        }
        // Every kernel this CPU can run (AVX2 is there whenever VNNI is).
        let isas: Vec<Isa> = if isa == Isa::Avx512Vnni { vec![Isa::Avx2, Isa::Avx512Vnni] } else { vec![isa] };
        for isa in isas {
            simd_matches_scalar(isa);
        }
    }

    fn simd_matches_scalar(isa: Isa) {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            // Odd sizes: rows not a multiple of the tile, one to many blocks a row.
            for (rows, cols, n) in [(1, 32, 1), (13, 64, 3), (37, 576, 5), (9, 1536, 17)] {
                let w = QMatrix::from_ggml(ty, rows, cols, &ggml(ty, rows, cols, rows as u32 * 7 + 1)).unwrap();
                let mut a = QActs::default();
                a.quantize(&acts(n, cols, cols as u32 + 3), n, cols);
                let (mut s, mut v) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                qmatmul(Isa::Scalar, &w, &a, &mut s, false, 1);
                qmatmul(isa, &w, &a, &mut v, false, 2);
                for (k, (x, y)) in s.iter().zip(&v).enumerate() {
                    assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{ty:?} {rows}x{cols} n={n} [{k}]: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn quantized_product_is_close_to_the_f32_one() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let (rows, cols, n) = (24, 256, 4);
            let data = ggml(ty, rows, cols, 11);
            let w = QMatrix::from_ggml(ty, rows, cols, &data).unwrap();
            let mut wf = vec![0f32; rows * cols];
            crate::model::quant::dequantize(ty, &data, &mut wf).unwrap();
            let x = acts(n, cols, 17);
            let mut a = QActs::default();
            a.quantize(&x, n, cols);
            let mut got = vec![1f32; n * rows];
            qmatmul(Isa::detect(), &w, &a, &mut got, true, 2);
            for i in 0..n {
                for r in 0..rows {
                    let exact: f32 = (0..cols).map(|k| x[i * cols + k] * wf[r * cols + k]).sum();
                    let mag: f32 = (0..cols).map(|k| (x[i * cols + k] * wf[r * cols + k]).abs()).sum();
                    // 8-bit activations: error within about 1% of the terms' magnitude; the 1 is
                    // the accumulated initial value.
                    let e = (got[i * rows + r] - 1.0 - exact).abs();
                    assert!(
                        e <= 0.01 * mag + 1e-5,
                        "{ty:?} [{i}][{r}]: {} vs {exact} (mag {mag})",
                        got[i * rows + r] - 1.0
                    );
                }
            }
        }
    }
}
