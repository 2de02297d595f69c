//! Matrix products on weights kept in their GGUF quantization, the way llama.cpp does them:
//! activations are quantized to 8 bits per block of 32 (one scale a block), and each block's
//! dot product is an integer sum scaled once.
//!
//! Every weight type becomes unsigned values `u` with a scale `d` and an offset `m` per block,
//! `w = d * u + m`:
//! - `U4`, 4-bit `u` in 0..15: Q4_1 as it is; Q4_0's `d * (q - 8)` is `m = -8 d`, exactly;
//!   Q4_K's eight sub-blocks of 32 are eight blocks with `d = d sc`, `m = -dmin min`;
//! - `U8`, 8-bit `u` in 0..255: Q8_0's signed `q` is `u = q + 128`, `m = -128 d`; the 5-bit
//!   types (Q5_0 with `m = -16 d`, Q5_1, Q5_K's sub-blocks) a byte a value.
//!
//! Q6_K's sub-blocks are 16 values (two scales a block of 32), which this layout cannot
//! hold: it is dequantized to f32 at load.
//!
//! A block's product with activations `x` (scale `e`) is then `d e Σ u x + m (e Σ x)`, and the
//! activations keep `e Σ x` per block for the second term. Scales are widened to f32 at load,
//! so no kernel converts f16.
//!
//! # Layout
//! Rows are stored in groups of four ([`GROUP`]), block by block, so a kernel walking a group
//! reads one sequential stream (four separate rows were four streams, and decode stalled on
//! them). A block of four rows is two "halves" of 64 bytes, half `h` holding elements
//! `16h..16h + 16` of each row, in 16 lanes of 4 bytes: lane `4q + r` holds elements
//! `16h + 4q .. 16h + 4q + 4` of row `r`. So one byte-dot-product instruction (`vpdpbusd`,
//! which sums four byte products into each 32-bit lane) leaves lane `l` with a partial sum of
//! row `l % 4`, and the four rows' scales, broadcast as one 128-bit vector, line up with the
//! lanes. The activations are stored expanded to match: each 4-byte quad of a block repeated
//! for the four rows (128 bytes a block). `U4` packs half 0 in the low nibbles and half 1 in
//! the high nibbles of 64 bytes; `U8` stores the two halves one after the other.
//!
//! Kernels: portable scalar code (the definition), AVX2 (+FMA), and AVX-512 VNNI, picked at
//! run time; the SIMD ones are tested against the scalar one.

use rayon::prelude::*;

/// Elements per quantization block.
pub const QK: usize = 32;
/// Rows interleaved in one group.
pub const GROUP: usize = 4;
/// Bytes of expanded activations per block.
const XB: usize = 4 * QK;

/// How a matrix's values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    /// 4-bit values, 64 bytes a group-block.
    U4,
    /// 8-bit values, 128 bytes a group-block.
    U8,
}

impl QKind {
    /// The kind a GGUF type packs into, if any.
    pub fn of(ty: crate::model::gguf::GgmlType) -> Option<QKind> {
        use crate::model::gguf::GgmlType;
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => Some(QKind::U4),
            // 5-bit values take a byte each here (1.5x Q5_K's bytes), for the 8-bit kernels.
            GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K | GgmlType::Q8_0 => Some(QKind::U8),
            _ => None,
        }
    }

    /// Bytes of values per group-block.
    fn group_block_bytes(self) -> usize {
        match self {
            QKind::U4 => 2 * QK,
            QKind::U8 => 4 * QK,
        }
    }
}

/// Byte of a half-register that holds element `e` (0..16 within the half) of row `r`.
#[inline(always)]
fn lane_byte(r: usize, e: usize) -> usize {
    (4 * (e / 4) + r) * 4 + e % 4
}

/// A row-major `[rows][cols]` matrix in blocks of 32 along each row, rows grouped by four
/// (see the module doc). The last group is padded with zero rows.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    /// Values: `[group][block]` of 64 (`U4`) or 128 (`U8`) bytes.
    pub qs: Vec<u8>,
    /// Scales: `[group][block][4]`.
    pub d: Vec<f32>,
    /// Offsets: `[group][block][4]`.
    pub m: Vec<f32>,
}

/// Builds a [`QMatrix`] from GGUF tensors stacked along rows (Q, K and V into one matrix).
#[derive(Debug)]
pub struct QMatrixBuilder {
    out: QMatrix,
    /// Rows waiting for their group: values (one byte each), scales and offsets.
    pending: Vec<(Vec<u8>, Vec<f32>, Vec<f32>)>,
}

/// One GGUF block as sub-blocks of 32 unsigned values `u` with `w = d u + m`: appends the
/// values to `u` and each sub-block's scale and offset to `d` and `m`. The K-quants' scales
/// (`d sc`, `dmin m` of a 16-bit float and a 6-bit integer) are exact in f32, as are Q4_0's
/// `-8 d`, Q5_0's `-16 d` and Q8_0's `-128 d`. For the types [`QKind::of`] packs.
fn unpack_block(ty: crate::model::gguf::GgmlType, b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>) {
    use crate::model::gguf::GgmlType;
    use crate::model::quant::{f16_at as f16, five_bit, k_nibble, k_scale_min};
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let s = f16(b, 0);
            d.push(s);
            m.push(if ty == GgmlType::Q4_0 { -8.0 * s } else { f16(b, 2) });
            let q = &b[b.len() - 16..];
            u.extend(q.iter().map(|x| x & 0x0f));
            u.extend(q.iter().map(|x| x >> 4));
        }
        GgmlType::Q5_0 => {
            let s = f16(b, 0);
            d.push(s);
            m.push(-16.0 * s);
            u.extend(five_bit(&b[2..6], &b[6..22]));
        }
        GgmlType::Q5_1 => {
            d.push(f16(b, 0));
            m.push(f16(b, 2));
            u.extend(five_bit(&b[4..8], &b[8..24]));
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (sd, smin) = (f16(b, 0), f16(b, 2));
            let qs = if ty == GgmlType::Q4_K { &b[16..144] } else { &b[48..176] };
            for j in 0..8 {
                let (sc, mn) = k_scale_min(&b[4..16], j);
                d.push(sd * sc as f32);
                m.push(-(smin * mn as f32));
                for l in 0..32 {
                    let high = if ty == GgmlType::Q5_K { ((b[16 + l] >> j) & 1) << 4 } else { 0 };
                    u.push(k_nibble(qs, j, l) | high);
                }
            }
        }
        _ => {
            let s = f16(b, 0);
            d.push(s);
            m.push(-128.0 * s);
            u.extend(b[2..34].iter().map(|&x| (x as i8 as i16 + 128) as u8));
        }
    }
}

impl QMatrixBuilder {
    pub fn new(kind: QKind, cols: usize) -> QMatrixBuilder {
        QMatrixBuilder {
            out: QMatrix { kind, rows: 0, cols, qs: Vec::new(), d: Vec::new(), m: Vec::new() },
            pending: Vec::with_capacity(GROUP),
        }
    }

    /// Appends the `rows` rows of a GGUF tensor of a type [`QKind::of`] packs. 4-bit types
    /// also go into an 8-bit matrix, exactly (a fused Q/K/V whose V is Q5_0, say). `None`
    /// when the type does not fit this matrix's kind, or the data's size is wrong.
    pub fn push_ggml(&mut self, ty: crate::model::gguf::GgmlType, rows: usize, data: &[u8]) -> Option<()> {
        let cols = self.out.cols;
        let kind = QKind::of(ty)?;
        let (be, bytes) = ty.block()?;
        if !(kind == self.out.kind || self.out.kind == QKind::U8) || cols == 0 || !cols.is_multiple_of(be) {
            return None;
        }
        let nb = cols / be;
        if data.len() != rows * nb * bytes {
            return None;
        }
        self.out.qs.reserve(rows * (cols / QK) * self.out.kind.group_block_bytes() / GROUP);
        for row in data.chunks_exact(nb * bytes) {
            let (mut u, mut d, mut m) =
                (Vec::with_capacity(cols), Vec::with_capacity(cols / QK), Vec::with_capacity(cols / QK));
            for b in row.chunks_exact(bytes) {
                unpack_block(ty, b, &mut u, &mut d, &mut m);
            }
            self.push_row(u, d, m);
        }
        Some(())
    }

    fn push_row(&mut self, u: Vec<u8>, d: Vec<f32>, m: Vec<f32>) {
        self.out.rows += 1;
        self.pending.push((u, d, m));
        if self.pending.len() == GROUP {
            self.flush();
        }
    }

    /// Packs the pending rows (padded with zero rows) into one group.
    fn flush(&mut self) {
        let (cols, nb) = (self.out.cols, self.out.cols / QK);
        while self.pending.len() < GROUP {
            self.pending.push((vec![0; cols], vec![0.0; nb], vec![0.0; nb]));
        }
        let o = &mut self.out;
        for b in 0..nb {
            let start = o.qs.len();
            o.qs.resize(start + o.kind.group_block_bytes(), 0);
            let gb = &mut o.qs[start..];
            for (r, (u, d, m)) in self.pending.iter().enumerate() {
                let blk = &u[b * QK..(b + 1) * QK];
                for e in 0..16 {
                    let k = lane_byte(r, e);
                    match o.kind {
                        QKind::U4 => gb[k] = blk[e] | (blk[16 + e] << 4),
                        QKind::U8 => {
                            gb[k] = blk[e];
                            gb[64 + k] = blk[16 + e];
                        }
                    }
                }
                o.d.push(d[b]);
                o.m.push(m[b]);
            }
        }
        self.pending.clear();
    }

    pub fn finish(mut self) -> QMatrix {
        if !self.pending.is_empty() {
            self.flush();
        }
        self.out
    }
}

impl QMatrix {
    /// Repacks one GGUF tensor. `None` for types that do not pack, or a row length that is not
    /// a whole number of blocks.
    pub fn from_ggml(ty: crate::model::gguf::GgmlType, rows: usize, cols: usize, data: &[u8]) -> Option<QMatrix> {
        let mut b = QMatrixBuilder::new(QKind::of(ty)?, cols);
        b.push_ggml(ty, rows, data)?;
        Some(b.finish())
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / QK
    }

    /// Row groups, the padded last one included.
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// Bytes held (values and f32 scales).
    pub fn size_bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.m.len())
    }

    /// Row `r` in f32 (embedding lookups).
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.blocks_per_row();
        let (g, rr) = (r / GROUP, r % GROUP);
        let gbb = self.kind.group_block_bytes();
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let gb = &self.qs[(g * nb + b) * gbb..][..gbb];
            let s = (g * nb + b) * GROUP + rr;
            let (d, m) = (self.d[s], self.m[s]);
            for e in 0..16 {
                let k = lane_byte(rr, e);
                let (u0, u1) = match self.kind {
                    QKind::U4 => (gb[k] & 0x0f, gb[k] >> 4),
                    QKind::U8 => (gb[k], gb[64 + k]),
                };
                // One rounding, as the GGUF dequantizer's `d * (q - 8)` or `d * q`.
                o[e] = (u0 as f32).mul_add(d, m);
                o[16 + e] = (u1 as f32).mul_add(d, m);
            }
        }
    }
}

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
        type Block<'a> = (((&'a [f32], &'a mut [i8]), &'a mut f32), &'a mut f32);
        let work = |(((xs, q), d), s): Block<'_>| (*d, *s) = quantize_block(isa, xs, q);
        if nb >= 1024 {
            x.par_chunks_exact(QK)
                .zip(self.q.par_chunks_exact_mut(XB))
                .zip(self.d.par_iter_mut())
                .zip(self.sum.par_iter_mut())
                .with_min_len(256)
                .for_each(work);
        } else {
            x.chunks_exact(QK)
                .zip(self.q.chunks_exact_mut(XB))
                .zip(self.d.iter_mut())
                .zip(self.sum.iter_mut())
                .for_each(work);
        }
    }
}

/// One block of 32 to signed bytes, written expanded into `q` (128 bytes): returns its scale
/// and its sum.
fn quantize_block(isa: Isa, xs: &[f32], q: &mut [i8]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni {
        // SAFETY: `isa` was detected on this CPU; `xs` holds 32 floats and `q` 128 bytes
        // (asserted inside).
        return unsafe { x86::quantize_block_512(xs, q) };
    }
    let _ = isa;
    let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut qsum = 0i32;
    for (o, &v) in qs.iter_mut().zip(xs) {
        // Ties to even, as the SIMD conversion rounds.
        *o = (v * inv).round_ties_even() as i8;
        qsum += *o as i32;
    }
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
/// `Σ_blocks d e Σ u x + m (e Σ x)` per row.
fn scalar_group<const N: usize>(w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
    let nb = w.blocks_per_row();
    let gbb = w.kind.group_block_bytes();
    let mut out = [[0f32; GROUP]; N];
    for b in 0..nb {
        let gb = &w.qs[(g * nb + b) * gbb..][..gbb];
        for (n, o) in out.iter_mut().enumerate() {
            let ab = (i0 + n) * nb + b;
            let x = &a.q[ab * XB..][..XB];
            let mut isum = [0i32; GROUP];
            for h in 0..2 {
                for k in 0..64 {
                    let u = match w.kind {
                        QKind::U4 => (gb[k] >> (4 * h)) & 0x0f,
                        QKind::U8 => gb[64 * h + k],
                    };
                    isum[(k / 4) % GROUP] += u as i32 * x[64 * h + k] as i32;
                }
            }
            for r in 0..GROUP {
                let s = (g * nb + b) * GROUP + r;
                o[r] += w.d[s] * a.d[ab] * isum[r] as f32 + w.m[s] * a.sum[ab];
            }
        }
    }
    out
}

/// Group `g` against activation rows `i0..i0 + N` with the kernels of `isa`.
#[inline(always)]
fn group<const N: usize>(isa: Isa, w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
    match (isa, w.kind) {
        // SAFETY (these four): `isa` was detected on this CPU; the kernels check the ranges.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, QKind::U4) => unsafe { x86::u4_512::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512Vnni, QKind::U8) => unsafe { x86::u8_512::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, QKind::U4) => unsafe { x86::u4_256::<N>(w, g, a, i0) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, QKind::U8) => unsafe { x86::u8_256::<N>(w, g, a, i0) },
        _ => scalar_group::<N>(w, g, a, i0),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QActs, QMatrix, GROUP, QK, XB};
    use std::arch::x86_64::*;

    /// Checks that group `g` and activation rows `i0..i0 + n` are in range.
    #[inline(always)]
    fn check(w: &QMatrix, g: usize, a: &QActs, i0: usize, n: usize) -> usize {
        let nb = w.cols / QK;
        let gbb = w.kind.group_block_bytes();
        assert!(
            w.qs.len() >= (g + 1) * nb * gbb && w.d.len() >= (g + 1) * nb * GROUP && w.m.len() >= (g + 1) * nb * GROUP
        );
        assert!(
            a.cols == w.cols
                && a.q.len() >= (i0 + n) * nb * XB
                && a.d.len() >= (i0 + n) * nb
                && a.sum.len() >= (i0 + n) * nb
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
    /// vector broadcast), one more the offsets.
    macro_rules! kernel_512 {
        ($name:ident, $weights:expr, $doc:literal) => {
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
                    let (d, m) = (w.d.as_ptr().add(g * nb * GROUP), w.m.as_ptr().add(g * nb * GROUP));
                    let mut acc = [_mm512_setzero_ps(); N];
                    let mut off = [_mm_setzero_ps(); N];
                    for b in 0..nb {
                        let (wa, wb): (__m512i, __m512i) = $weights(qs.add(b * gbb));
                        let d4 = _mm512_broadcast_f32x4(_mm_loadu_ps(d.add(b * GROUP)));
                        let m4 = _mm_loadu_ps(m.add(b * GROUP));
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

    kernel_512!(u4_512, u4_halves_512, "A group of `U4` rows against `N` activation rows (AVX-512 VNNI).");
    kernel_512!(u8_512, u8_halves_512, "A group of `U8` rows against `N` activation rows (AVX-512 VNNI).");

    /// A group of `U4` rows against `N` activation rows (AVX2). `maddubs` makes i16 sums of
    /// byte pairs, at most 2 * 15 * 127; four of them still fit i16, so they are added
    /// before the one widening `madd`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA. Ranges are checked.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn u4_256<const N: usize>(w: &QMatrix, g: usize, a: &QActs, i0: usize) -> [[f32; GROUP]; N] {
        let nb = check(w, g, a, i0, N);
        // SAFETY: every pointer below stays inside the ranges `check` asserted.
        unsafe {
            let qs = w.qs.as_ptr().add(g * nb * 64);
            let (d, m) = (w.d.as_ptr().add(g * nb * GROUP), w.m.as_ptr().add(g * nb * GROUP));
            let (mask, ones) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi16(1));
            let mut acc = [_mm256_setzero_ps(); N];
            let mut off = [_mm_setzero_ps(); N];
            for b in 0..nb {
                let p0 = _mm256_loadu_si256(qs.add(b * 64).cast());
                let p1 = _mm256_loadu_si256(qs.add(b * 64 + 32).cast());
                let w = [
                    _mm256_and_si256(p0, mask),
                    _mm256_and_si256(p1, mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(p0), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(p1), mask),
                ];
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
            let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
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
                    let x = a.q.as_ptr().add(ab * XB);
                    let p = |k: usize| {
                        let xs = _mm256_sign_epi8(_mm256_loadu_si256(x.add(32 * k).cast()), ws[k]);
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[k], xs), ones)
                    };
                    let s = _mm256_add_epi32(_mm256_add_epi32(p(0), p(1)), _mm256_add_epi32(p(2), p(3)));
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

    /// [`super::quantize_block`] in AVX-512: the same bytes (conversion rounds ties to even,
    /// as the scalar code does), then the expansion as two permutes.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and AVX-512 F/BW/VL.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_block_512(xs: &[f32], q: &mut [i8]) -> (f32, f32) {
        assert!(xs.len() >= QK && q.len() >= XB);
        // SAFETY: in range by the assert.
        unsafe {
            let v0 = _mm512_loadu_ps(xs.as_ptr());
            let v1 = _mm512_loadu_ps(xs.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let scale = amax / 127.0;
            let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
            let i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            let qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
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

/// `out[n][w.rows] (+)= a[n][w.cols] * w^T`, with `a` quantized by [`QActs::quantize`].
/// Threads split the row groups, so each weight is read once for the whole batch (once per
/// chunk of 64 activation rows, from cache after the first).
pub fn qmatmul(isa: Isa, w: &QMatrix, a: &QActs, out: &mut [f32], accumulate: bool, threads: usize) {
    let n = a.rows;
    assert_eq!(a.cols, w.cols, "activation row length");
    assert_eq!(out.len(), n * w.rows);
    let (rows, groups) = (w.rows, w.groups());
    let tasks = groups.div_ceil(TASK_GROUPS);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let p = out_ptr;
        let put = |i: usize, g: usize, v: [f32; GROUP]| {
            for (r, v) in (g * GROUP..rows).zip(v) {
                // SAFETY: `i * rows + r` is inside `out` (asserted length), and only the task
                // owning group `g` writes these columns.
                unsafe {
                    let o = p.0.add(i * rows + r);
                    *o = if accumulate { *o + v } else { v };
                }
            }
        };
        let (g0, g1) = (t * TASK_GROUPS, ((t + 1) * TASK_GROUPS).min(groups));
        for c0 in (0..n).step_by(CHUNK) {
            let c1 = (c0 + CHUNK).min(n);
            for g in g0..g1 {
                let mut i = c0;
                while i + 4 <= c1 {
                    for (k, v) in group::<4>(isa, w, g, a, i).into_iter().enumerate() {
                        put(i + k, g, v);
                    }
                    i += 4;
                }
                let tail: &[[f32; GROUP]] = match c1 - i {
                    3 => &group::<3>(isa, w, g, a, i),
                    2 => &group::<2>(isa, w, g, a, i),
                    1 => &group::<1>(isa, w, g, a, i),
                    _ => &[],
                };
                for (k, &v) in tail.iter().enumerate() {
                    put(i + k, g, v);
                }
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

    /// The types that pack, each kind.
    const PACKED: [GgmlType; 7] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q5_K,
        GgmlType::Q8_0,
    ];

    /// A random GGUF tensor of `ty`, `rows x cols`: random bits but for the f16 scales and
    /// offsets, which are finite and modest (K-quants' scales meet 6-bit multipliers).
    fn ggml(ty: GgmlType, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let (be, size) = ty.block().unwrap();
        let nb = rows * cols / be;
        let mut out = bytes(nb * size, seed);
        for (b, blk) in out.chunks_mut(size).enumerate() {
            let d = 0.001 + (b % 7) as f32 * 0.003;
            let (at_d, at_m, d, m) = match ty {
                GgmlType::Q4_1 | GgmlType::Q5_1 => (0, Some(2), d, -0.02 * (b % 5) as f32),
                GgmlType::Q4_K | GgmlType::Q5_K => (0, Some(2), d / 16.0, 0.0005 * (b % 5) as f32),
                GgmlType::Q6_K => (208, None, d / 64.0, 0.0),
                _ => (0, None, d, 0.0),
            };
            blk[at_d..at_d + 2].copy_from_slice(&f16b(d));
            if let Some(i) = at_m {
                blk[i..i + 2].copy_from_slice(&f16b(m));
            }
        }
        out
    }

    fn acts(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        bytes(rows * cols, seed).iter().map(|&b| (b as f32 - 128.0) / 50.0).collect()
    }

    #[test]
    fn repacked_blocks_decode_like_the_dequantizer() {
        // Each type alone, then stacked after a part of another type into one matrix (8-bit
        // when either is), as a fused Q/K/V of a Q4_K_M file.
        let pairs = PACKED.iter().map(|&t| (t, t)).chain([
            (GgmlType::Q4_K, GgmlType::Q5_0),
            (GgmlType::Q5_K, GgmlType::Q4_K),
            (GgmlType::Q4_0, GgmlType::Q8_0),
        ]);
        for (t1, t2) in pairs {
            // Two tensors stacked, 3 + 6 rows: groups straddle the seam, the last is padded.
            let (r1, r2, cols) = (3, 6, 512);
            let (d1, d2) = (ggml(t1, r1, cols, 5), ggml(t2, r2, cols, 9));
            let kind = if QKind::of(t1) == Some(QKind::U8) { QKind::U8 } else { QKind::of(t2).unwrap() };
            let mut b = QMatrixBuilder::new(kind, cols);
            b.push_ggml(t1, r1, &d1).unwrap();
            b.push_ggml(t2, r2, &d2).unwrap();
            let m = b.finish();
            assert_eq!((m.rows, m.groups()), (9, 3));
            let mut want = vec![0f32; (r1 + r2) * cols];
            crate::model::quant::dequantize(t1, &d1, &mut want[..r1 * cols]).unwrap();
            crate::model::quant::dequantize(t2, &d2, &mut want[r1 * cols..]).unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..r1 + r2 {
                m.dequant_row(r, &mut row);
                for (k, (x, y)) in row.iter().zip(&want[r * cols..(r + 1) * cols]).enumerate() {
                    // One rounding either way, but the Q4_1/Q5_1 dequantizer rounds twice (`q d + m`).
                    assert!((x - y).abs() <= 1e-6 * y.abs(), "{t1:?}+{t2:?} row {r} [{k}]: {x} vs {y}");
                }
            }
        }
        assert!(
            QMatrix::from_ggml(GgmlType::Q6_K, 1, 256, &ggml(GgmlType::Q6_K, 1, 256, 3)).is_none(),
            "16-value scales"
        );
        assert!(QMatrix::from_ggml(GgmlType::Q4_K, 1, 288, &[0; 162]).is_none(), "288 is not whole super-blocks");
        let mut b = QMatrixBuilder::new(QKind::U4, 256);
        assert!(b.push_ggml(GgmlType::Q5_K, 1, &[0; 176]).is_none(), "5 bits do not fit a 4-bit matrix");
        assert!(QMatrix::from_ggml(GgmlType::Q4_1, 2, 48, &[0; 60]).is_none(), "48 is not whole blocks");
        assert!(QMatrix::from_ggml(GgmlType::F32, 1, 32, &[0; 128]).is_none());
        assert!(QMatrix::from_ggml(GgmlType::Q8_0, 2, 32, &[0; 60]).is_none(), "wrong size");
        let mut b = QMatrixBuilder::new(QKind::U4, 32);
        assert!(b.push_ggml(GgmlType::Q8_0, 1, &[0; 34]).is_none(), "kinds do not mix");
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
        for ty in PACKED {
            // Odd sizes: rows not a multiple of the group, one to many blocks a row, activation
            // rows past a chunk with every tail length (the K-quants take the whole 256s).
            let shapes = [(1, 32, 1), (13, 64, 3), (37, 576, 5), (9, 1536, 17), (6, 96, 71), (5, 256, 2), (6, 512, 71)];
            let be = ty.block().unwrap().0;
            for (rows, cols, n) in shapes.into_iter().filter(|s| s.1 % be == 0) {
                let w = QMatrix::from_ggml(ty, rows, cols, &ggml(ty, rows, cols, rows as u32 * 7 + 1)).unwrap();
                let x = acts(n, cols, cols as u32 + 3);
                let (mut a, mut sa) = (QActs::default(), QActs::default());
                a.quantize(isa, &x, n, cols);
                sa.quantize(Isa::Scalar, &x, n, cols);
                assert_eq!((&a.q, &a.d, &a.sum), (&sa.q, &sa.d, &sa.sum), "{isa:?} quantizes as the scalar code");
                let (mut s, mut v) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                qmatmul(Isa::Scalar, &w, &sa, &mut s, false, 1);
                qmatmul(isa, &w, &a, &mut v, false, 2);
                for (k, (x, y)) in s.iter().zip(&v).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                        "{isa:?} {ty:?} {rows}x{cols} n={n} [{k}]: {x} vs {y}"
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
            crate::model::quant::dequantize(ty, &data, &mut wf).unwrap();
            let x = acts(n, cols, 17);
            for isa in Isa::all_here() {
                let mut a = QActs::default();
                a.quantize(isa, &x, n, cols);
                let mut got = vec![1f32; n * rows];
                qmatmul(isa, &w, &a, &mut got, true, 2);
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
}
