//! Matrix products on quantized weights ([`crate::model::packed::QMatrix`]), the way
//! llama.cpp does them: activations are quantized to 8 bits per block of 32 (one scale a
//! block), and each block's dot product is an integer sum scaled once.
//!
//! A block's product with activations `x` (scale `e`) is `d e Σ u x + m (e Σ x)` for weights
//! `w = d u + m`, and the activations keep `e Σ x` per block for the second term, and per
//! half block for `U6` weights (whose scales are per 16). The activations are stored expanded
//! to match the weights' layout: each 4-byte quad of a block repeated for the four rows of a
//! group (128 bytes a block).
//!
//! Kernels: portable scalar code (the definition), AVX2 (+FMA), and AVX-512 VNNI, picked at
//! run time; the SIMD ones are tested against the scalar one.

use crate::model::packed::{fifth, lane_byte, QKind, QMatrix, GROUP, QK};

use rayon::prelude::*;

/// Bytes of expanded activations per block.
const XB: usize = 4 * QK;

/// Activations quantized for [`qmatmul`]: per block of 32, signed bytes (stored expanded, see
/// the module doc), a scale and the block's sum (of the quantized values, scaled). Reused from
/// step to step.
#[derive(Debug, Clone, Default)]
pub struct QActs {
    pub rows: usize,
    pub cols: usize,
    /// `[row][block]` of 128 bytes.
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sum: Vec<f32>,
    /// `[row][block][2]`: the sums of each half block (for `U6` weights).
    pub hsum: Vec<f32>,
}

impl QActs {
    /// Quantizes `x` (`[rows][cols]`, `cols` a multiple of 32), in SIMD when `isa` allows
    /// (the bytes are the same either way).
    pub fn quantize(&mut self, isa: Isa, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols);
        assert_eq!(cols % QK, 0, "row length {cols} is not a multiple of {QK}");
        let nb = rows * cols / QK;
        self.rows = rows;
        self.cols = cols;
        self.q.resize(nb * XB, 0);
        self.d.resize(nb, 0.0);
        self.sum.resize(nb, 0.0);
        self.hsum.resize(2 * nb, 0.0);
        type Block<'a> = ((((&'a [f32], &'a mut [i8]), &'a mut f32), &'a mut f32), &'a mut [f32]);
        let work = |((((xs, q), d), s), hs): Block<'_>| (*d, *s) = quantize_block(isa, xs, q, hs);
        if nb >= 1024 {
            x.par_chunks_exact(QK)
                .zip(self.q.par_chunks_exact_mut(XB))
                .zip(self.d.par_iter_mut())
                .zip(self.sum.par_iter_mut())
                .zip(self.hsum.par_chunks_exact_mut(2))
                .with_min_len(256)
                .for_each(work);
        } else {
            x.chunks_exact(QK)
                .zip(self.q.chunks_exact_mut(XB))
                .zip(self.d.iter_mut())
                .zip(self.sum.iter_mut())
                .zip(self.hsum.chunks_exact_mut(2))
                .for_each(work);
        }
    }
}

/// One block of 32 to signed bytes, written expanded into `q` (128 bytes): returns its scale
/// and its sum, and writes the sums of its two halves to `hsum`.
fn quantize_block(isa: Isa, xs: &[f32], q: &mut [i8], hsum: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni {
        // SAFETY: `isa` was detected on this CPU; `xs` holds 32 floats, `q` 128 bytes and
        // `hsum` two floats (asserted inside).
        return unsafe { x86::quantize_block_512(xs, q, hsum) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: as above, for AVX2.
        return unsafe { x86::quantize_block_256(xs, q, hsum) };
    }
    let _ = isa;
    let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut half = [0i32; 2];
    for (e, (o, &v)) in qs.iter_mut().zip(xs).enumerate() {
        // Ties to even, as the SIMD conversion rounds.
        *o = (v * inv).round_ties_even() as i8;
        half[e / 16] += *o as i32;
    }
    let qsum = half[0] + half[1];
    hsum[0] = scale * half[0] as f32;
    hsum[1] = scale * half[1] as f32;
    for h in 0..2 {
        for e in 0..16 {
            for r in 0..GROUP {
                q[h * 64 + lane_byte(r, e)] = qs[16 * h + e];
            }
        }
    }
    // The sum of the quantized values, not of the exact ones: then a block's product is exactly
    // that of the dequantized weights with the quantized activations. With the exact sum the
    // offset term's error would not cancel against the `d * u` term's, and the error grows
    // about threefold (`u` is 0..15 while `w` is centred).
    (scale, scale * qsum as f32)
}

/// Which kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 and FMA, 256-bit registers (`maddubs` for the byte products).
    Avx2,
    /// AVX-512 (F, BW, VL) with VNNI's `dpbusd`, 512-bit registers.
    Avx512Vnni,
}

impl Isa {
    /// The best this CPU has.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
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

    /// Every kernel set this CPU can run, best last (for tests).
    pub fn all_here() -> Vec<Isa> {
        match Isa::detect() {
            Isa::Scalar => vec![Isa::Scalar],
            Isa::Avx2 => vec![Isa::Scalar, Isa::Avx2],
            Isa::Avx512Vnni => vec![Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni],
        }
    }

    /// The kernel sets this CPU cannot run: a test names each as skipped, so an AVX2-only
    /// machine does not pass the AVX-512 kernels untested without a word.
    pub fn missing_here() -> Vec<Isa> {
        let here = Isa::all_here();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| !here.contains(i)).collect()
    }
}

/// The definition: group `g` (four rows) against activation rows `i0..i0 + N`,
/// `Σ_blocks d e Σ u x + m (e Σ x)` per row (`u` signed and `m` 0 for `S8`).
fn scalar_group<const N: usize>(w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
    let nb = w.blocks_per_row();
    let (gbb, spb) = (w.kind.group_block_bytes(), w.kind.scales_per_block());
    let mut out = [[0f32; GROUP]; N];
    for b in 0..nb {
        let gb = &w.qs[(g * nb + b) * gbb..][..gbb];
        for (n, o) in out.iter_mut().enumerate() {
            let ab = (i0 + n) * nb + b;
            let x = &a.q[ab * XB..][..XB];
            let mut isum = [[0i32; GROUP]; 2];
            for (h, isum) in isum.iter_mut().enumerate() {
                for k in 0..64 {
                    let u = match w.kind {
                        QKind::U4 => ((gb[k] >> (4 * h)) & 0x0f) as i32,
                        QKind::U5 => (((gb[k] >> (4 * h)) & 0x0f) | fifth(gb, h, k) << 4) as i32,
                        QKind::U8 | QKind::U6 => gb[64 * h + k] as i32,
                        QKind::S8 => gb[64 * h + k] as i8 as i32,
                    };
                    isum[(k / 4) % GROUP] += u * x[64 * h + k] as i32;
                }
            }
            for r in 0..GROUP {
                if spb == 1 {
                    let s = (g * nb + b) * GROUP + r;
                    let m = if w.kind == QKind::S8 { 0.0 } else { w.m[s] };
                    o[r] += w.d[s] * a.d[ab] * (isum[0][r] + isum[1][r]) as f32 + m * a.sum[ab];
                } else {
                    for (h, isum) in isum.iter().enumerate() {
                        let s = ((g * nb + b) * 2 + h) * GROUP + r;
                        o[r] += w.d[s] * a.d[ab] * isum[r] as f32 + w.m[s] * a.hsum[2 * ab + h];
                    }
                }
            }
        }
    }
    out
}

/// Group `g` against activation rows `i0..i0 + N` with the kernels of `isa`.
#[inline(always)]
fn group<const N: usize>(isa: Isa, w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
    match (isa, w.kind) {
        // SAFETY (these ten): `isa` was detected on this CPU; the kernels check the ranges.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, QKind::U4) => unsafe { x86::u4_512::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, QKind::U8) => unsafe { x86::u8_512::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, QKind::U5) => unsafe { x86::u5_512::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, QKind::U4) => unsafe { x86::u4_256::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, QKind::U8) => unsafe { x86::u8_256::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, QKind::U5) => unsafe { x86::u5_256::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, QKind::U6) => unsafe { x86::u6_512::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, QKind::U6) => unsafe { x86::u6_256::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, QKind::S8) => unsafe { x86::s8_512::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, QKind::S8) => unsafe { x86::s8_256::<N>(w, g, a, i0) },
        _ => scalar_group::<N>(w, g, a, i0),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QActs, QKind, QMatrix, GROUP, QK, XB};
    use std::arch::x86_64::*;

    /// Checks that group `g` and activation rows `i0..i0 + n` are in range.
    #[inline(always)]
    fn check(w: &QMatrix, g: usize, a: &QActs, i0: usize, n: usize) -> usize {
        let nb = w.cols / QK;
        let (gbb, scales) = (w.kind.group_block_bytes(), nb * GROUP * w.kind.scales_per_block());
        let offsets = w.kind == QKind::S8 || w.m.len() >= (g + 1) * scales;
        assert!(w.qs.len() >= (g + 1) * nb * gbb && w.d.len() >= (g + 1) * scales && offsets);
        assert!(
            a.cols == w.cols
                && a.q.len() >= (i0 + n) * nb * XB
                && a.d.len() >= (i0 + n) * nb
                && a.sum.len() >= (i0 + n) * nb
                && a.hsum.len() >= (i0 + n) * nb * 2
        );
        nb
    }

    /// Lane `l` of `v` belongs to row `l % 4`: the four rows' sums, plus `off`.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn reduce_512(v: __m512, off: __m128) -> [f32; GROUP] {
        let lo = _mm_add_ps(_mm512_castps512_ps128(v), _mm512_extractf32x4_ps::<1>(v));
        let hi = _mm_add_ps(_mm512_extractf32x4_ps::<2>(v), _mm512_extractf32x4_ps::<3>(v));
        let mut o = [0f32; GROUP];
        // SAFETY: `o` holds four floats.
        unsafe { _mm_storeu_ps(o.as_mut_ptr(), _mm_add_ps(_mm_add_ps(lo, hi), off)) };
        o
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn reduce_256(v: __m256, off: __m128) -> [f32; GROUP] {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let mut o = [0f32; GROUP];
        // SAFETY: `o` holds four floats.
        unsafe { _mm_storeu_ps(o.as_mut_ptr(), _mm_add_ps(s, off)) };
        o
    }

    /// The AVX-512 kernels: per block, the weights of four rows are two registers (`wa`, `wb`:
    /// the two halves), and each activation row's expanded block is two more. Two `dpbusd`
    /// give the block's integer sums, one FMA applies the four rows' scales (one 128-bit
    /// vector broadcast), one more the offsets (`$offsets`: the four rows' of a block, from its
    /// scales and offsets).
    macro_rules! kernel_512 {
        ($name:ident, $weights:expr, $offsets:expr, $doc:literal) => {
            #[doc = $doc]
            ///
            /// # Safety
            /// The CPU must have AVX2, FMA, AVX-512 F/BW/VL and VNNI. Ranges are checked.
            #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
            pub unsafe fn $name<const N: usize>(w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
                let nb = check(w, g, a, i0, N);
                let gbb = w.kind.group_block_bytes();
                // SAFETY: every pointer below stays inside the ranges `check` asserted.
                unsafe {
                    let qs = w.qs.as_ptr().add(g * nb * gbb);
                    // `m` may be empty (`S8`): its pointer is only formed, never read, then.
                    let (d, m) = (w.d.as_ptr().add(g * nb * GROUP), w.m.as_ptr().wrapping_add(g * nb * GROUP));
                    let mut acc = [_mm512_setzero_ps(); N];
                    let mut off = [_mm_setzero_ps(); N];
                    for b in 0..nb {
                        let (wa, wb): (__m512i, __m512i) = $weights(qs.add(b * gbb));
                        let d4 = _mm512_broadcast_f32x4(_mm_loadu_ps(d.add(b * GROUP)));
                        let m4: __m128 = $offsets(d.add(b * GROUP), m.wrapping_add(b * GROUP));
                        for n in 0..N {
                            let ab = (i0 + n) * nb + b;
                            let x = a.q.as_ptr().add(ab * XB);
                            let xa = _mm512_loadu_si512(x.cast());
                            let xb = _mm512_loadu_si512(x.add(64).cast());
                            let s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wa, xa), wb, xb);
                            let sc = _mm512_mul_ps(d4, _mm512_set1_ps(*a.d.get_unchecked(ab)));
                            acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[n]);
                            off[n] = _mm_fmadd_ps(m4, _mm_set1_ps(*a.sum.get_unchecked(ab)), off[n]);
                        }
                    }
                    let mut out = [[0f32; GROUP]; N];
                    for n in 0..N {
                        out[n] = reduce_512(acc[n], off[n]);
                    }
                    out
                }
            }
        };
    }

    /// 4-bit weights: one 64-byte load, half 0 in the low nibbles, half 1 in the high.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn u4_halves_512(p: *const u8) -> (__m512i, __m512i) {
        // SAFETY: the caller passes 64 readable bytes.
        let v = unsafe { _mm512_loadu_si512(p.cast()) };
        let mask = _mm512_set1_epi8(0x0f);
        (_mm512_and_si512(v, mask), _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask))
    }

    /// 8-bit weights: the two halves as they are.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn u8_halves_512(p: *const u8) -> (__m512i, __m512i) {
        // SAFETY: the caller passes 128 readable bytes.
        unsafe { (_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(64).cast())) }
    }

    /// A block's four offsets as stored.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn stored_offsets(_d: *const f32, m: *const f32) -> __m128 {
        // SAFETY: the caller passes four readable floats at `m`.
        unsafe { _mm_loadu_ps(m) }
    }

    /// `S8` weights read as `U8` (`q + 128`): their offsets are `-128 d`, from the scales.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn s8_offsets(d: *const f32, _m: *const f32) -> __m128 {
        // SAFETY: the caller passes four readable floats at `d`.
        unsafe { _mm_mul_ps(_mm_set1_ps(-128.0), _mm_loadu_ps(d)) }
    }

    /// `S8` weights: the two halves, each byte `q + 128` (`vpdpbusd` takes unsigned weights).
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn s8_halves_512(p: *const u8) -> (__m512i, __m512i) {
        // SAFETY: the caller passes 128 readable bytes.
        let (a, b) = unsafe { u8_halves_512(p) };
        let flip = _mm512_set1_epi8(-128);
        (_mm512_xor_si512(a, flip), _mm512_xor_si512(b, flip))
    }

    kernel_512!(
        u4_512,
        u4_halves_512,
        stored_offsets,
        "A group of `U4` rows against `N` activation rows (AVX-512 VNNI)."
    );
    kernel_512!(
        u8_512,
        u8_halves_512,
        stored_offsets,
        "A group of `U8` rows against `N` activation rows (AVX-512 VNNI)."
    );
    kernel_512!(
        u5_512,
        u5_halves_512,
        stored_offsets,
        "A group of `U5` rows against `N` activation rows (AVX-512 VNNI)."
    );
    kernel_512!(s8_512, s8_halves_512, s8_offsets, "A group of `S8` rows against `N` activation rows (AVX-512 VNNI).");

    /// 5-bit weights: [`u4_halves_512`]'s nibbles, and each half's u64 of fifth bits as a
    /// byte mask selecting 16s to OR in.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn u5_halves_512(p: *const u8) -> (__m512i, __m512i) {
        // SAFETY: the caller passes 80 readable bytes.
        let (wa, wb) = unsafe { u4_halves_512(p) };
        let (m0, m1) = unsafe { (p.add(64).cast::<u64>().read_unaligned(), p.add(72).cast::<u64>().read_unaligned()) };
        let five = _mm512_set1_epi8(0x10);
        (
            _mm512_or_si512(wa, _mm512_maskz_mov_epi8(u64::from_le(m0), five)),
            _mm512_or_si512(wb, _mm512_maskz_mov_epi8(u64::from_le(m1), five)),
        )
    }

    /// The AVX2 kernels of values below 32 (`U4`, `U5`): a block's four registers of weights
    /// come from `$weights`, and need no sign trick: `maddubs` makes i16 sums of byte pairs,
    /// at most 2 * 31 * 127, and four of them still fit i16 (8 * 31 * 127 = 31496), so they
    /// are added before the one widening `madd`.
    macro_rules! kernel_256 {
        ($name:ident, $weights:expr, $doc:literal) => {
            #[doc = $doc]
            ///
            /// # Safety
            /// The CPU must have AVX2 and FMA. Ranges are checked.
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $name<const N: usize>(w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
                let nb = check(w, g, a, i0, N);
                let gbb = w.kind.group_block_bytes();
                // SAFETY: every pointer below stays inside the ranges `check` asserted.
                unsafe {
                    let qs = w.qs.as_ptr().add(g * nb * gbb);
                    let (d, m) = (w.d.as_ptr().add(g * nb * GROUP), w.m.as_ptr().add(g * nb * GROUP));
                    let ones = _mm256_set1_epi16(1);
                    let mut acc = [_mm256_setzero_ps(); N];
                    let mut off = [_mm_setzero_ps(); N];
                    for b in 0..nb {
                        let w: [__m256i; 4] = $weights(qs.add(b * gbb));
                        let d4 = _mm256_broadcast_ps(&*(d.add(b * GROUP) as *const __m128));
                        let m4 = _mm_loadu_ps(m.add(b * GROUP));
                        for n in 0..N {
                            let ab = (i0 + n) * nb + b;
                            let x = a.q.as_ptr().add(ab * XB);
                            let p = |k: usize| _mm256_maddubs_epi16(w[k], _mm256_loadu_si256(x.add(32 * k).cast()));
                            let s16 = _mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
                            let s = _mm256_madd_epi16(s16, ones);
                            let sc = _mm256_mul_ps(d4, _mm256_set1_ps(*a.d.get_unchecked(ab)));
                            acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[n]);
                            off[n] = _mm_fmadd_ps(m4, _mm_set1_ps(*a.sum.get_unchecked(ab)), off[n]);
                        }
                    }
                    let mut out = [[0f32; GROUP]; N];
                    for n in 0..N {
                        out[n] = reduce_256(acc[n], off[n]);
                    }
                    out
                }
            }
        };
    }

    /// 4-bit weights: 64 bytes, half 0 in the low nibbles (two registers), half 1 in the high.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn u4_regs_256(p: *const u8) -> [__m256i; 4] {
        // SAFETY: the caller passes 64 readable bytes.
        let (p0, p1) = unsafe { (_mm256_loadu_si256(p.cast()), _mm256_loadu_si256(p.add(32).cast())) };
        let mask = _mm256_set1_epi8(0x0f);
        [
            _mm256_and_si256(p0, mask),
            _mm256_and_si256(p1, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(p0), mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(p1), mask),
        ]
    }

    /// 5-bit weights: [`u4_regs_256`]'s nibbles, each register OR'd with its u32 of fifth
    /// bits spread to bytes (byte `i` takes bit `i`: broadcast, shuffle byte `i / 8` into
    /// place, test bit `i % 8`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn u5_regs_256(p: *const u8) -> [__m256i; 4] {
        // SAFETY: the caller passes 80 readable bytes.
        let (mut w, hb) = unsafe { (u4_regs_256(p), p.add(64).cast::<[u8; 16]>().read_unaligned()) };
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let five = _mm256_set1_epi8(0x10);
        for (j, w) in w.iter_mut().enumerate() {
            let word = i32::from_le_bytes([hb[4 * j], hb[4 * j + 1], hb[4 * j + 2], hb[4 * j + 3]]);
            let v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(word), shuf), bit);
            *w = _mm256_or_si256(*w, _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), five));
        }
        w
    }

    kernel_256!(u4_256, u4_regs_256, "A group of `U4` rows against `N` activation rows (AVX2).");
    kernel_256!(u5_256, u5_regs_256, "A group of `U5` rows against `N` activation rows (AVX2).");
    kernel_256!(
        bytes_256,
        byte_regs_256,
        "A group of byte values below 32 (a spread `U5` group) against `N` activation rows (AVX2)."
    );

    /// Byte weights: 128 bytes as they are.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn byte_regs_256(p: *const u8) -> [__m256i; 4] {
        // SAFETY: the caller passes 128 readable bytes.
        std::array::from_fn(|k| unsafe { _mm256_loadu_si256(p.add(32 * k).cast()) })
    }

    /// One `U5` group-block (80 bytes at `src`) spread to a byte a value (128 bytes at `dst`,
    /// the `U8` layout).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `src` holds 80 readable bytes and `dst` 128 writable.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn spread_u5_256(src: *const u8, dst: *mut u8) {
        // SAFETY: as the caller promises.
        unsafe {
            for (k, r) in u5_regs_256(src).into_iter().enumerate() {
                _mm256_storeu_si256(dst.add(32 * k).cast(), r);
            }
        }
    }

    /// One block of signed 8-bit weights (`ws`, four registers, and their magnitudes `wabs`)
    /// against the activation block at `x`, by the sign trick: `|w|` times `x * sign(w)` in
    /// `maddubs` (pairs fit i16: 2 * 128 * 127), widened by `madd`. Eight i32 lanes of sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sign_dot_256(ws: &[__m256i; 4], wabs: &[__m256i; 4], x: *const i8) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let p = |k: usize| {
            // SAFETY: the caller passes a block of 128 readable bytes at `x`.
            let xs = _mm256_sign_epi8(unsafe { _mm256_loadu_si256(x.add(32 * k).cast()) }, ws[k]);
            _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[k], xs), ones)
        };
        _mm256_add_epi32(_mm256_add_epi32(p(0), p(1)), _mm256_add_epi32(p(2), p(3)))
    }

    /// A group of `U8` rows against `N` activation rows (AVX2). `maddubs` would overflow i16
    /// on `u` up to 255, so the weights go back to signed (`u - 128`) and through the usual
    /// sign trick (`|w|` times `x * sign(w)`; pairs fit, 2 * 128 * 127). That sums
    /// `(u - 128) x`, so the offset left to add is `m + 128 d`: exactly 0 for Q8_0
    /// (`m = -128 d`), not for the 5-bit types.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA. Ranges are checked.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn u8_256<const N: usize>(w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
        let nb = check(w, g, a, i0, N);
        // SAFETY: every pointer below stays inside the ranges `check` asserted.
        unsafe {
            let qs = w.qs.as_ptr().add(g * nb * 128);
            let (d, m) = (w.d.as_ptr().add(g * nb * GROUP), w.m.as_ptr().add(g * nb * GROUP));
            let flip = _mm256_set1_epi8(-128);
            let mut acc = [_mm256_setzero_ps(); N];
            let mut off = [_mm_setzero_ps(); N];
            for b in 0..nb {
                let ws: [__m256i; 4] = std::array::from_fn(|k| {
                    _mm256_xor_si256(_mm256_loadu_si256(qs.add(b * 128 + 32 * k).cast()), flip)
                });
                let wabs = ws.map(|v| _mm256_abs_epi8(v));
                let d4 = _mm256_broadcast_ps(&*(d.add(b * GROUP) as *const __m128));
                let m4 =
                    _mm_fmadd_ps(_mm_set1_ps(128.0), _mm_loadu_ps(d.add(b * GROUP)), _mm_loadu_ps(m.add(b * GROUP)));
                for (n, (acc_n, off_n)) in acc.iter_mut().zip(&mut off).enumerate() {
                    let ab = (i0 + n) * nb + b;
                    let s = sign_dot_256(&ws, &wabs, a.q.as_ptr().add(ab * XB));
                    let sc = _mm256_mul_ps(d4, _mm256_set1_ps(*a.d.get_unchecked(ab)));
                    *acc_n = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, *acc_n);
                    *off_n = _mm_fmadd_ps(m4, _mm_set1_ps(*a.sum.get_unchecked(ab)), *off_n);
                }
            }
            let mut out = [[0f32; GROUP]; N];
            for ((o, acc_n), off_n) in out.iter_mut().zip(acc).zip(off) {
                *o = reduce_256(acc_n, off_n);
            }
            out
        }
    }

    /// A group of `S8` rows against `N` activation rows (AVX2): the sign trick of
    /// [`u8_256`] on the signed values as stored, with no offsets at all.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA. Ranges are checked.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn s8_256<const N: usize>(w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
        let nb = check(w, g, a, i0, N);
        // SAFETY: every pointer below stays inside the ranges `check` asserted.
        unsafe {
            let qs = w.qs.as_ptr().add(g * nb * 128);
            let d = w.d.as_ptr().add(g * nb * GROUP);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let ws: [__m256i; 4] = std::array::from_fn(|k| _mm256_loadu_si256(qs.add(b * 128 + 32 * k).cast()));
                let wabs = ws.map(|v| _mm256_abs_epi8(v));
                let d4 = _mm256_broadcast_ps(&*(d.add(b * GROUP) as *const __m128));
                for (n, acc_n) in acc.iter_mut().enumerate() {
                    let ab = (i0 + n) * nb + b;
                    let s = sign_dot_256(&ws, &wabs, a.q.as_ptr().add(ab * XB));
                    let sc = _mm256_mul_ps(d4, _mm256_set1_ps(*a.d.get_unchecked(ab)));
                    *acc_n = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, *acc_n);
                }
            }
            let mut out = [[0f32; GROUP]; N];
            for (o, acc_n) in out.iter_mut().zip(acc) {
                *o = reduce_256(acc_n, _mm_setzero_ps());
            }
            out
        }
    }

    /// A group of `U6` rows against `N` activation rows (AVX2). Values below 64 need no sign
    /// trick: four byte products still fit i16 (4 * 63 * 127 = 32004), so each half's two
    /// `maddubs` are added before one widening `madd`, and the halves keep their own scales.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA. Ranges are checked.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn u6_256<const N: usize>(w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
        let nb = check(w, g, a, i0, N);
        // SAFETY: every pointer below stays inside the ranges `check` asserted.
        unsafe {
            let qs = w.qs.as_ptr().add(g * nb * 128);
            let (d, m) = (w.d.as_ptr().add(g * nb * 2 * GROUP), w.m.as_ptr().add(g * nb * 2 * GROUP));
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); N];
            let mut off = [_mm_setzero_ps(); N];
            for b in 0..nb {
                let ws: [__m256i; 4] = std::array::from_fn(|k| _mm256_loadu_si256(qs.add(b * 128 + 32 * k).cast()));
                let s = b * 2 * GROUP;
                let d0 = _mm256_broadcast_ps(&*(d.add(s) as *const __m128));
                let d1 = _mm256_broadcast_ps(&*(d.add(s + GROUP) as *const __m128));
                let (m0, m1) = (_mm_loadu_ps(m.add(s)), _mm_loadu_ps(m.add(s + GROUP)));
                for (n, (acc_n, off_n)) in acc.iter_mut().zip(&mut off).enumerate() {
                    let ab = (i0 + n) * nb + b;
                    let x = a.q.as_ptr().add(ab * XB);
                    let p = |k: usize| _mm256_maddubs_epi16(ws[k], _mm256_loadu_si256(x.add(32 * k).cast()));
                    let s0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(p(0), p(1)), ones));
                    let s1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(p(2), p(3)), ones));
                    let t = _mm256_fmadd_ps(s0, d0, _mm256_mul_ps(s1, d1));
                    *acc_n = _mm256_fmadd_ps(t, _mm256_set1_ps(*a.d.get_unchecked(ab)), *acc_n);
                    let hs = a.hsum.as_ptr().add(2 * ab);
                    *off_n = _mm_fmadd_ps(m0, _mm_set1_ps(*hs), _mm_fmadd_ps(m1, _mm_set1_ps(*hs.add(1)), *off_n));
                }
            }
            let mut out = [[0f32; GROUP]; N];
            for ((o, acc_n), off_n) in out.iter_mut().zip(acc).zip(off) {
                *o = reduce_256(acc_n, off_n);
            }
            out
        }
    }

    /// A group of `U6` rows against `N` activation rows (AVX-512 VNNI): one `dpbusd` a half,
    /// each half with its own scales.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, AVX-512 F/BW/VL and VNNI. Ranges are checked.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn u6_512<const N: usize>(w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
        let nb = check(w, g, a, i0, N);
        // SAFETY: every pointer below stays inside the ranges `check` asserted.
        unsafe {
            let qs = w.qs.as_ptr().add(g * nb * 128);
            let (d, m) = (w.d.as_ptr().add(g * nb * 2 * GROUP), w.m.as_ptr().add(g * nb * 2 * GROUP));
            let mut acc = [_mm512_setzero_ps(); N];
            let mut off = [_mm_setzero_ps(); N];
            for b in 0..nb {
                let (wa, wb) = u8_halves_512(qs.add(b * 128));
                let s = b * 2 * GROUP;
                let d0 = _mm512_broadcast_f32x4(_mm_loadu_ps(d.add(s)));
                let d1 = _mm512_broadcast_f32x4(_mm_loadu_ps(d.add(s + GROUP)));
                let (m0, m1) = (_mm_loadu_ps(m.add(s)), _mm_loadu_ps(m.add(s + GROUP)));
                for n in 0..N {
                    let ab = (i0 + n) * nb + b;
                    let x = a.q.as_ptr().add(ab * XB);
                    let zero = _mm512_setzero_si512();
                    let s0 = _mm512_dpbusd_epi32(zero, wa, _mm512_loadu_si512(x.cast()));
                    let s1 = _mm512_dpbusd_epi32(zero, wb, _mm512_loadu_si512(x.add(64).cast()));
                    let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), d0, _mm512_mul_ps(_mm512_cvtepi32_ps(s1), d1));
                    acc[n] = _mm512_fmadd_ps(t, _mm512_set1_ps(*a.d.get_unchecked(ab)), acc[n]);
                    let hs = a.hsum.as_ptr().add(2 * ab);
                    off[n] = _mm_fmadd_ps(m0, _mm_set1_ps(*hs), _mm_fmadd_ps(m1, _mm_set1_ps(*hs.add(1)), off[n]));
                }
            }
            let mut out = [[0f32; GROUP]; N];
            for n in 0..N {
                out[n] = reduce_512(acc[n], off[n]);
            }
            out
        }
    }

    /// [`super::quantize_block`] in AVX2: the same bytes (the conversion rounds ties to even,
    /// as the scalar code does). The two packs leave the block's 4-byte quads in the order
    /// 0 2 4 6 1 3 5 7 (they work within 128-bit lanes), so quad `2j` is dword `j` and quad
    /// `2j + 1` dword `4 + j`, and one permute a register writes each quad four times.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block_256(xs: &[f32], q: &mut [i8], hsum: &mut [f32]) -> (f32, f32) {
        assert!(xs.len() >= QK && q.len() >= XB && hsum.len() >= 2);
        // SAFETY: in range by the assert.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(xs.as_ptr().add(8 * k)));
            let sign = _mm256_set1_ps(-0.0);
            let m = v.map(|x| _mm256_andnot_ps(sign, x));
            let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let scale = amax / 127.0;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let i = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, inv)));
            let hsum_i32 = |a: __m256i, b: __m256i| {
                let s = _mm256_add_epi32(a, b);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
                _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
            };
            let (h0, h1) = (hsum_i32(i[0], i[1]), hsum_i32(i[2], i[3]));
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            for j in 0..4 {
                let (a, b) = (j as i32, 4 + j as i32);
                let idx = _mm256_setr_epi32(a, a, a, a, b, b, b, b);
                _mm256_storeu_si256(q.as_mut_ptr().add(32 * j).cast(), _mm256_permutevar8x32_epi32(bytes, idx));
            }
            hsum[0] = scale * h0 as f32;
            hsum[1] = scale * h1 as f32;
            (scale, scale * (h0 + h1) as f32)
        }
    }

    /// [`super::quantize_block`] in AVX-512: the same bytes (conversion rounds ties to even,
    /// as the scalar code does), then the expansion as two permutes.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and AVX-512 F/BW/VL.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_block_512(xs: &[f32], q: &mut [i8], hsum: &mut [f32]) -> (f32, f32) {
        assert!(xs.len() >= QK && q.len() >= XB && hsum.len() >= 2);
        // SAFETY: in range by the assert.
        unsafe {
            let v0 = _mm512_loadu_ps(xs.as_ptr());
            let v1 = _mm512_loadu_ps(xs.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let scale = amax / 127.0;
            let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
            let i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            let (h0, h1) = (_mm512_reduce_add_epi32(i0), _mm512_reduce_add_epi32(i1));
            let qsum = h0 + h1;
            hsum[0] = scale * h0 as f32;
            hsum[1] = scale * h1 as f32;
            let bytes =
                _mm512_inserti32x4::<1>(_mm512_castsi128_si512(_mm512_cvtepi32_epi8(i0)), _mm512_cvtepi32_epi8(i1));
            // Lane `l` of half `h` takes the block's 4-byte quad `4h + l / 4`.
            let ia = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            let ib = _mm512_add_epi32(ia, _mm512_set1_epi32(4));
            _mm512_storeu_si512(q.as_mut_ptr().cast(), _mm512_permutexvar_epi32(ia, bytes));
            _mm512_storeu_si512(q.as_mut_ptr().add(64).cast(), _mm512_permutexvar_epi32(ib, bytes));
            (scale, scale * qsum as f32)
        }
    }
}

/// One `U5` group with its fifth bits spread, a byte a value (the `U8` layout, values below
/// 32): for a chunk of more than four activation rows, the bits are spread once per chunk
/// rather than once per four rows (spreading them per four rows made 8- and 32-request
/// steps about 15% slower than a byte a value).
#[cfg(target_arch = "x86_64")]
struct Spread {
    m: QMatrix,
}

#[cfg(target_arch = "x86_64")]
impl Spread {
    fn new(cols: usize) -> Spread {
        let nb = cols / QK;
        Spread {
            m: QMatrix {
                kind: QKind::U8,
                rows: GROUP,
                cols,
                qs: vec![0; nb * 4 * QK],
                d: vec![0.0; nb * GROUP],
                m: vec![0.0; nb * GROUP],
            },
        }
    }

    /// Group `g` of `w` (a `U5` matrix), spread (AVX2 only: the caller checked).
    fn fill(&mut self, w: &QMatrix, g: usize) {
        let nb = w.blocks_per_row();
        let (gbb, s) = (w.kind.group_block_bytes(), nb * GROUP);
        assert!(w.kind == QKind::U5 && w.cols == self.m.cols && w.qs.len() >= (g + 1) * nb * gbb);
        for b in 0..nb {
            let src = &w.qs[(g * nb + b) * gbb..][..gbb];
            // SAFETY: AVX2 was detected (the caller's `isa`); `src` holds 80 bytes and the
            // destination 128 (`qs` is `nb` blocks of 128).
            unsafe { x86::spread_u5_256(src.as_ptr(), self.m.qs[b * 4 * QK..][..4 * QK].as_mut_ptr()) };
        }
        self.m.d.copy_from_slice(&w.d[g * s..(g + 1) * s]);
        self.m.m.copy_from_slice(&w.m[g * s..(g + 1) * s]);
    }
}

/// A [`Spread`] group (values below 32 in `U8` layout) against activation rows `i0..i0 + N`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn spread_group<const N: usize>(isa: Isa, w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
    debug_assert_eq!(isa, Isa::Avx2);
    // SAFETY: only called with `isa` AVX2, detected on this CPU; the kernel checks ranges.
    unsafe { x86::bytes_256::<N>(w, g, a, i0) }
}

/// A raw output pointer shared by the threads of [`qmatmul`], each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the threads write disjoint elements (their own row groups' columns), and the
// buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Row groups a task takes (16 rows).
const TASK_GROUPS: usize = 4;
/// Activation rows a task runs over its groups before moving on: their blocks (up to 64 x
/// 128 bytes a block) stay in L2 while the group passes over them, and each group's weights
/// stay in L1 across the chunk.
const CHUNK: usize = 64;

/// `out[n][rows] (+)= a[n][cols] * w^T` for `w` the `parts` stacked along rows (a fused
/// Q/K/V whose parts are of different kinds: each keeps its own), with `a` quantized by
/// [`QActs::quantize`]. Threads split the row groups of all parts in one parallel loop, so
/// each weight is read once for the whole batch (once per chunk of 64 activation rows, from
/// cache after the first).
pub fn qmatmul(isa: Isa, parts: &[QMatrix], a: &QActs, out: &mut [f32], accumulate: bool, threads: usize) {
    let n = a.rows;
    // Each part's first output column and first task.
    let mut firsts = Vec::with_capacity(parts.len());
    let (mut rows, mut tasks) = (0, 0);
    for w in parts {
        assert_eq!(a.cols, w.cols, "activation row length");
        firsts.push((rows, tasks));
        rows += w.rows;
        tasks += w.groups().div_ceil(TASK_GROUPS);
    }
    assert_eq!(out.len(), n * rows);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let p = out_ptr;
        let k = firsts.partition_point(|&(_, t0)| t0 <= t) - 1;
        let (w, (col0, t0)) = (&parts[k], firsts[k]);
        let (t, groups) = (t - t0, w.groups());
        let put = |i: usize, g: usize, v: [f32; GROUP]| {
            for (r, v) in (g * GROUP..w.rows).zip(v) {
                // SAFETY: `i * rows + col0 + r` is inside `out` (asserted length; `col0 + r` is
                // below `rows`), and only the task owning group `g` of this part writes it.
                unsafe {
                    let o = p.0.add(i * rows + col0 + r);
                    *o = if accumulate { *o + v } else { v };
                }
            }
        };
        let (g0, g1) = (t * TASK_GROUPS, ((t + 1) * TASK_GROUPS).min(groups));
        // Made at its first use: decode steps (a chunk of one row) never need it.
        #[cfg(target_arch = "x86_64")]
        let mut spread: Option<Spread> = None;
        for c0 in (0..n).step_by(CHUNK) {
            let c1 = (c0 + CHUNK).min(n);
            // The chunk's rows four at a time through `$kernel` on group `$kg` of `$w`, into
            // the columns of group `g`.
            macro_rules! rows {
                ($kernel:ident, $w:expr, $kg:expr, $g:expr) => {{
                    let mut i = c0;
                    while i + 4 <= c1 {
                        for (k, v) in $kernel::<4>(isa, $w, $kg, a, i).into_iter().enumerate() {
                            put(i + k, $g, v);
                        }
                        i += 4;
                    }
                    let tail: &[[f32; GROUP]] = match c1 - i {
                        3 => &$kernel::<3>(isa, $w, $kg, a, i),
                        2 => &$kernel::<2>(isa, $w, $kg, a, i),
                        1 => &$kernel::<1>(isa, $w, $kg, a, i),
                        _ => &[],
                    };
                    for (k, &v) in tail.iter().enumerate() {
                        put(i + k, $g, v);
                    }
                }};
            }
            for g in g0..g1 {
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx2 && w.kind == QKind::U5 && c1 - c0 > 4 {
                    let spread = spread.get_or_insert_with(|| Spread::new(w.cols));
                    spread.fill(w, g);
                    rows!(spread_group, &spread.m, 0, g);
                    continue;
                }
                rows!(group, w, g, g);
            }
        }
    };
    if threads > 1 && tasks > 1 {
        (0..tasks).into_par_iter().with_min_len(2).for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgmlType;
    use crate::model::packed::test_data::{bytes, ggml, PACKED};
    use crate::model::packed::QMatrixBuilder;

    fn acts(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        bytes(rows * cols, seed).iter().map(|&b| (b as f32 - 128.0) / 50.0).collect()
    }

    /// Names each kernel set this CPU lacks, past the test harness's capture.
    fn say_skipped(test: &str) {
        use std::io::Write;
        for isa in Isa::missing_here() {
            let _ = writeln!(std::io::stderr(), "{test}: skipped: {} (this CPU lacks it)", isa.name());
        }
    }

    #[test]
    fn simd_kernels_equal_the_scalar_one() {
        say_skipped("simd_kernels_equal_the_scalar_one");
        for isa in Isa::all_here().into_iter().skip(1) {
            simd_matches_scalar(isa);
        }
    }

    fn simd_matches_scalar(isa: Isa) {
        // Each type in each kind that holds it (Q8_0 as `S8` alone, as `U8` beside 4-bit
        // parts; Q4_K in `U4`, `U5`, `U8` and `U6`).
        let kinds = [QKind::U4, QKind::U5, QKind::S8, QKind::U8, QKind::U6];
        for (ty, kind) in
            PACKED.into_iter().flat_map(|t| kinds.into_iter().filter(move |k| k.holds(t)).map(move |k| (t, k)))
        {
            // Odd sizes: rows not a multiple of the group, one to many blocks a row, activation
            // rows past a chunk with every tail length (the K-quants take the whole 256s).
            let shapes = [(1, 32, 1), (13, 64, 3), (37, 576, 5), (9, 1536, 17), (6, 96, 71), (5, 256, 2), (6, 512, 71)];
            let be = ty.block().unwrap().0;
            for (rows, cols, n) in shapes.into_iter().filter(|s| s.1 % be == 0) {
                let mut b = QMatrixBuilder::new(kind, cols);
                b.push_ggml(ty, rows, &ggml(ty, rows, cols, rows as u32 * 7 + 1)).unwrap();
                let w = b.finish();
                let x = acts(n, cols, cols as u32 + 3);
                let (mut a, mut sa) = (QActs::default(), QActs::default());
                a.quantize(isa, &x, n, cols);
                sa.quantize(Isa::Scalar, &x, n, cols);
                assert_eq!(
                    (&a.q, &a.d, &a.sum, &a.hsum),
                    (&sa.q, &sa.d, &sa.sum, &sa.hsum),
                    "{isa:?} quantizes as the scalar code"
                );
                let (mut s, mut v) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                qmatmul(Isa::Scalar, std::slice::from_ref(&w), &sa, &mut s, false, 1);
                qmatmul(isa, std::slice::from_ref(&w), &a, &mut v, false, 2);
                for (k, (x, y)) in s.iter().zip(&v).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                        "{isa:?} {ty:?} as {kind:?} {rows}x{cols} n={n} [{k}]: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn quantized_product_is_close_to_the_f32_one() {
        say_skipped("quantized_product_is_close_to_the_f32_one");
        for ty in PACKED {
            let (rows, cols, n) = (24, 256, 4);
            let data = ggml(ty, rows, cols, 11);
            let w = QMatrix::from_ggml(ty, rows, cols, &data).unwrap();
            let mut wf = vec![0f32; rows * cols];
            crate::model::blocks::dequantize(ty, &data, &mut wf).unwrap();
            let x = acts(n, cols, 17);
            for isa in Isa::all_here() {
                let mut a = QActs::default();
                a.quantize(isa, &x, n, cols);
                let mut got = vec![1f32; n * rows];
                qmatmul(isa, std::slice::from_ref(&w), &a, &mut got, true, 2);
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

    #[test]
    fn stacked_parts_write_their_own_columns() {
        // Q (U4, 5 rows: a padded group), K (U6, 3 rows), V (U8, 9 rows): as a Q4_K_M
        // file's Q/K/V, each part its own kind; more tasks than one part has.
        let cols = 256;
        let types = [(GgmlType::Q4_K, 5), (GgmlType::Q6_K, 3), (GgmlType::Q8_0, 9), (GgmlType::Q4_0, 70)];
        let parts: Vec<QMatrix> = types
            .iter()
            .enumerate()
            .map(|(i, &(t, r))| QMatrix::from_ggml(t, r, cols, &ggml(t, r, cols, 31 + i as u32)).unwrap())
            .collect();
        let rows: usize = types.iter().map(|t| t.1).sum();
        for n in [1, 6] {
            let x = acts(n, cols, 5);
            for isa in Isa::all_here() {
                let mut a = QActs::default();
                a.quantize(isa, &x, n, cols);
                let mut got = vec![0.5f32; n * rows];
                qmatmul(isa, &parts, &a, &mut got, true, 2);
                let mut col0 = 0;
                for w in &parts {
                    let mut want = vec![0f32; n * w.rows];
                    qmatmul(isa, std::slice::from_ref(w), &a, &mut want, false, 1);
                    for i in 0..n {
                        for r in 0..w.rows {
                            let g = got[i * rows + col0 + r] - 0.5;
                            let e = want[i * w.rows + r];
                            assert!(
                                (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                                "{isa:?} n={n} [{i}][{}]: {g} vs {e}",
                                col0 + r
                            );
                        }
                    }
                    col0 += w.rows;
                }
            }
        }
    }
}
