//! Quantized weight matrices as the CPU kernels read them (`backends::cpu::qmatmul`): GGUF
//! blocks repacked once at load. This module owns the layout; the kernels only read it.
//!
//! Every weight type becomes unsigned values `u` with a scale `d` and an offset `m` per block,
//! `w = d * u + m`:
//! - `U4`, 4-bit `u` in 0..15: Q4_1 as it is; Q4_0's `d * (q - 8)` is `m = -8 d`, exactly;
//!   Q4_K's eight sub-blocks of 32 are eight blocks with `d = d sc`, `m = -dmin min`;
//! - `U5`, 5-bit `u` in 0..31: Q5_0 with `m = -16 d`, Q5_1, Q5_K's sub-blocks (and the 4-bit
//!   types, in a matrix stacked with 5-bit parts): `U4`'s nibbles and a plane of fifth bits;
//! - `S8`, Q8_0 as it is: signed 8-bit `q`, `w = d q`, no offsets stored (they would be
//!   `-128 d`: 4 bytes a block read for nothing, the difference between 9 and 10 bits a
//!   weight);
//! - `U8`, 8-bit `u` in 0..255, for a matrix that stacks Q8_0 parts (`u = q + 128`,
//!   `m = -128 d`) with 4- or 5-bit ones;
//! - `U6`, values up to 63 a byte each, with a scale and an offset per *half* block of 16:
//!   Q6_K, whose sub-blocks are 16 values with a scale each (`d = d sc`, `m = -32 d sc`). A
//!   matrix with Q6_K parts and 4- or 5-bit ones (a Q4_K_M file's Q/K/V with a Q6_K V) is
//!   `U6` throughout, the others' scales repeated for both halves.
//!
//! Scales are widened to f32 at load, so no kernel converts f16.
//!
//! # Layout
//! Rows are stored in groups of four ([`GROUP`]), block by block, so a kernel walking a group
//! reads one sequential stream (four separate rows were four streams, and decode stalled on
//! them). A block of four rows is two "halves" of 64 bytes, half `h` holding elements
//! `16h..16h + 16` of each row, in 16 lanes of 4 bytes: lane `4q + r` holds elements
//! `16h + 4q .. 16h + 4q + 4` of row `r`. So one byte-dot-product instruction (`vpdpbusd`,
//! which sums four byte products into each 32-bit lane) leaves lane `l` with a partial sum of
//! row `l % 4`, and the four rows' scales, broadcast as one 128-bit vector, line up with the
//! lanes. `U4` packs half 0 in the low nibbles and half 1 in the high nibbles of 64 bytes;
//! `U5` follows them with 16 bytes of fifth bits: four little-endian u32 `j`, bit `i` of
//! `j` the fifth bit of byte `32 (j % 2) + i` of half `j / 2`, so each 32-byte register of
//! nibbles (as the AVX2 kernel unpacks them) has its bits in one u32, and each half its bits in
//! one u64 (a 64-bit mask for AVX-512). `U8` and `U6` store the two halves one after the
//! other. Scales are `[group][block][4]`
//! (`[group][block][half][4]` for `U6`).

/// Elements per quantization block.
pub const QK: usize = 32;
/// Rows interleaved in one group.
pub const GROUP: usize = 4;

/// How a matrix's values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    /// 4-bit values, 64 bytes a group-block.
    U4,
    /// Signed 8-bit values with a scale and no offset (`m` is empty), 128 bytes a
    /// group-block: Q8_0.
    S8,
    /// 8-bit values, 128 bytes a group-block.
    U8,
    /// 5-bit values, 80 bytes a group-block.
    U5,
    /// Values up to 63, 128 bytes a group-block, two scales and offsets a block (one a half).
    U6,
}

impl QKind {
    /// The kind a GGUF type packs into, if any.
    pub fn of(ty: crate::model::gguf::GgmlType) -> Option<QKind> {
        crate::model::blocks::of(ty)?.kind()
    }

    /// Whether a matrix of this kind holds tensors of type `ty` exactly.
    pub fn holds(self, ty: crate::model::gguf::GgmlType) -> bool {
        match self {
            QKind::U4 => QKind::of(ty) == Some(QKind::U4),
            QKind::U5 => matches!(QKind::of(ty), Some(QKind::U4 | QKind::U5)),
            QKind::S8 => QKind::of(ty) == Some(QKind::S8),
            QKind::U8 => matches!(QKind::of(ty), Some(QKind::U4 | QKind::U5 | QKind::S8 | QKind::U8)),
            // Values below 64.
            QKind::U6 => matches!(QKind::of(ty), Some(QKind::U4 | QKind::U5 | QKind::U6)),
        }
    }

    /// The kind of a matrix stacked from tensors of `types`: the narrowest that holds them
    /// all, or `None` (Q6_K beside Q8_0, or a type that does not pack).
    pub fn for_types(types: &[crate::model::gguf::GgmlType]) -> Option<QKind> {
        [QKind::U4, QKind::U5, QKind::S8, QKind::U8, QKind::U6].into_iter().find(|k| types.iter().all(|&t| k.holds(t)))
    }

    /// Bytes of values per group-block.
    pub fn group_block_bytes(self) -> usize {
        match self {
            QKind::U4 => 2 * QK,
            QKind::U5 => 2 * QK + 16,
            QKind::S8 | QKind::U8 | QKind::U6 => 4 * QK,
        }
    }

    /// Scales (and offsets) a row has per block of 32.
    pub fn scales_per_block(self) -> usize {
        match self {
            QKind::U6 => 2,
            QKind::U4 | QKind::U5 | QKind::S8 | QKind::U8 => 1,
        }
    }
}

/// Byte of a half-register that holds element `e` (0..16 within the half) of row `r`.
#[inline(always)]
pub(crate) fn lane_byte(r: usize, e: usize) -> usize {
    (4 * (e / 4) + r) * 4 + e % 4
}

/// Where a `U5` group-block keeps the fifth bit of byte `k` (0..64) of half `h`: its byte and
/// bit ([`QKind::U5`]).
#[inline(always)]
fn fifth_bit(h: usize, k: usize) -> (usize, usize) {
    let (j, i) = (2 * h + k / 32, k % 32);
    (64 + 4 * j + i / 8, i % 8)
}

/// The fifth bit (0 or 1) of byte `k` of half `h` in a `U5` group-block.
#[inline(always)]
pub(crate) fn fifth(gb: &[u8], h: usize, k: usize) -> u8 {
    let (byte, bit) = fifth_bit(h, k);
    (gb[byte] >> bit) & 1
}

/// A row-major `[rows][cols]` matrix in blocks of 32 along each row, rows grouped by four
/// (see the module doc). The last group is padded with zero rows.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    /// Values: `[group][block]` of 64 (`U4`), 80 (`U5`) or 128 (`S8`, `U8`, `U6`) bytes.
    pub qs: Vec<u8>,
    /// Scales: `[group][block][4]`.
    pub d: Vec<f32>,
    /// Offsets: `[group][block][4]`; empty for `S8`.
    pub m: Vec<f32>,
}

/// Builds a [`QMatrix`] from GGUF tensors stacked along rows (Q, K and V into one matrix).
#[derive(Debug)]
pub struct QMatrixBuilder {
    out: QMatrix,
    /// Rows waiting for their group: values (one byte each), scales and offsets.
    pending: Vec<(Vec<u8>, Vec<f32>, Vec<f32>)>,
}

impl QMatrixBuilder {
    pub fn new(kind: QKind, cols: usize) -> QMatrixBuilder {
        QMatrixBuilder {
            out: QMatrix { kind, rows: 0, cols, qs: Vec::new(), d: Vec::new(), m: Vec::new() },
            pending: Vec::with_capacity(GROUP),
        }
    }

    /// Appends the `rows` rows of a GGUF tensor of a type [`QKind::of`] packs. Narrower types
    /// also go into a wider matrix, exactly ([`QKind::holds`]: a fused Q/K/V whose V is Q5_0
    /// or Q6_K, say). `None` when the type does not fit this matrix's kind, or the data's size
    /// is wrong.
    pub fn push_ggml(&mut self, ty: crate::model::gguf::GgmlType, rows: usize, data: &[u8]) -> Option<()> {
        let cols = self.out.cols;
        let (be, bytes) = ty.block()?;
        if !self.out.kind.holds(ty) || cols == 0 || !cols.is_multiple_of(be) {
            return None;
        }
        let block = crate::model::blocks::of(ty)?;
        // A type with one scale per 32 in a matrix with one per 16: each scale twice.
        let twice = block.kind()?.scales_per_block() < self.out.kind.scales_per_block();
        let nb = cols / be;
        if data.len() != rows * nb * bytes {
            return None;
        }
        self.out.qs.reserve(rows * (cols / QK) * self.out.kind.group_block_bytes() / GROUP);
        for row in data.chunks_exact(nb * bytes) {
            let (mut u, mut d, mut m) =
                (Vec::with_capacity(cols), Vec::with_capacity(cols / QK), Vec::with_capacity(cols / QK));
            for b in row.chunks_exact(bytes) {
                block.unpack(b, &mut u, &mut d, &mut m);
            }
            if twice {
                d = d.iter().flat_map(|&x| [x, x]).collect();
                m = m.iter().flat_map(|&x| [x, x]).collect();
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
        let (cols, nb, spb) = (self.out.cols, self.out.cols / QK, self.out.kind.scales_per_block());
        while self.pending.len() < GROUP {
            self.pending.push((vec![0; cols], vec![0.0; nb * spb], vec![0.0; nb * spb]));
        }
        let o = &mut self.out;
        for b in 0..nb {
            let start = o.qs.len();
            o.qs.resize(start + o.kind.group_block_bytes(), 0);
            let gb = &mut o.qs[start..];
            for (r, (u, _, _)) in self.pending.iter().enumerate() {
                let blk = &u[b * QK..(b + 1) * QK];
                for e in 0..16 {
                    let k = lane_byte(r, e);
                    match o.kind {
                        QKind::U4 => gb[k] = blk[e] | (blk[16 + e] << 4),
                        QKind::U5 => {
                            gb[k] = (blk[e] & 0x0f) | ((blk[16 + e] & 0x0f) << 4);
                            for h in 0..2 {
                                let (byte, bit) = fifth_bit(h, k);
                                gb[byte] |= ((blk[16 * h + e] >> 4) & 1) << bit;
                            }
                        }
                        QKind::U8 | QKind::U6 => {
                            gb[k] = blk[e];
                            gb[64 + k] = blk[16 + e];
                        }
                        // `u - 128`, the signed value.
                        QKind::S8 => {
                            gb[k] = blk[e] ^ 0x80;
                            gb[64 + k] = blk[16 + e] ^ 0x80;
                        }
                    }
                }
            }
            // `[half][row]` within the block: one 128-bit load gives a half's four rows.
            for h in 0..spb {
                for (_, d, m) in &self.pending {
                    let (d, m) = (d[b * spb + h], m[b * spb + h]);
                    o.d.push(d);
                    if o.kind == QKind::S8 {
                        debug_assert_eq!(m, -128.0 * d, "an S8 block's offset is -128 d");
                    } else {
                        o.m.push(m);
                    }
                }
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

    pub fn blocks_per_row(&self) -> usize {
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
        let (gbb, spb) = (self.kind.group_block_bytes(), self.kind.scales_per_block());
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let gb = &self.qs[(g * nb + b) * gbb..][..gbb];
            let s = |h: usize| ((g * nb + b) * spb + h % spb) * GROUP + rr;
            if self.kind == QKind::S8 {
                // As the GGUF dequantizer: `q d`.
                let d = self.d[s(0)];
                for e in 0..16 {
                    let k = lane_byte(rr, e);
                    o[e] = gb[k] as i8 as f32 * d;
                    o[16 + e] = gb[64 + k] as i8 as f32 * d;
                }
                continue;
            }
            let ((d0, m0), (d1, m1)) = ((self.d[s(0)], self.m[s(0)]), (self.d[s(1)], self.m[s(1)]));
            for e in 0..16 {
                let k = lane_byte(rr, e);
                let (u0, u1) = match self.kind {
                    QKind::U4 => (gb[k] & 0x0f, gb[k] >> 4),
                    QKind::U5 => ((gb[k] & 0x0f) | fifth(gb, 0, k) << 4, (gb[k] >> 4) | fifth(gb, 1, k) << 4),
                    QKind::U8 | QKind::U6 => (gb[k], gb[64 + k]),
                    QKind::S8 => unreachable!("decoded above"),
                };
                // One rounding, as the GGUF dequantizer's `d * (q - 8)` or `d * q`.
                o[e] = (u0 as f32).mul_add(d0, m0);
                o[16 + e] = (u1 as f32).mul_add(d1, m1);
            }
        }
    }
}

/// Random GGUF tensors, for the tests here and the kernels'.
#[cfg(test)]
pub(crate) mod test_data {
    use crate::model::gguf::GgmlType;

    /// xorshift: deterministic pseudo-random bytes.
    pub fn bytes(n: usize, seed: u32) -> Vec<u8> {
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

    /// The types that pack, each kind.
    pub const PACKED: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
    ];

    /// A random GGUF tensor of `ty`, `rows x cols`: random bits but for the f16 scales and
    /// offsets, which are finite and modest (K-quants' scales meet 6-bit multipliers).
    pub fn ggml(ty: GgmlType, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let (be, size) = ty.block().unwrap();
        let nb = rows * cols / be;
        let mut out = bytes(nb * size, seed);
        for (b, blk) in out.chunks_mut(size).enumerate() {
            let d = 0.001 + (b % 7) as f32 * 0.003;
            crate::model::blocks::of(ty).unwrap().tame(blk, d, -0.02 * (b % 5) as f32);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::test_data::{ggml, PACKED};
    use super::*;
    use crate::model::gguf::GgmlType;

    #[test]
    fn repacked_blocks_decode_like_the_dequantizer() {
        // Each type alone, then stacked after a part of another type into one matrix (the
        // narrowest kind that holds both), as a fused Q/K/V of a Q4_K_M file.
        let pairs = PACKED.iter().map(|&t| (t, t)).chain([
            (GgmlType::Q4_K, GgmlType::Q5_0),
            (GgmlType::Q5_K, GgmlType::Q4_K),
            (GgmlType::Q4_0, GgmlType::Q8_0),
            (GgmlType::Q5_0, GgmlType::Q8_0),
            (GgmlType::Q4_K, GgmlType::Q6_K),
            (GgmlType::Q6_K, GgmlType::Q5_0),
            (GgmlType::Q5_1, GgmlType::Q6_K),
        ]);
        for (t1, t2) in pairs {
            // Two tensors stacked, 3 + 6 rows: groups straddle the seam, the last is padded.
            let (r1, r2, cols) = (3, 6, 512);
            let (d1, d2) = (ggml(t1, r1, cols, 5), ggml(t2, r2, cols, 9));
            let kind = QKind::for_types(&[t1, t2]).unwrap();
            let mut b = QMatrixBuilder::new(kind, cols);
            b.push_ggml(t1, r1, &d1).unwrap();
            b.push_ggml(t2, r2, &d2).unwrap();
            let m = b.finish();
            assert_eq!((m.rows, m.groups()), (9, 3));
            let mut want = vec![0f32; (r1 + r2) * cols];
            crate::model::blocks::dequantize(t1, &d1, &mut want[..r1 * cols]).unwrap();
            crate::model::blocks::dequantize(t2, &d2, &mut want[r1 * cols..]).unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..r1 + r2 {
                m.dequant_row(r, &mut row);
                for (k, (x, y)) in row.iter().zip(&want[r * cols..(r + 1) * cols]).enumerate() {
                    // One rounding either way, but the Q4_1/Q5_1 dequantizer rounds twice (`q d + m`).
                    assert!((x - y).abs() <= 1e-6 * y.abs(), "{t1:?}+{t2:?} row {r} [{k}]: {x} vs {y}");
                }
            }
        }
        assert_eq!(QKind::for_types(&[GgmlType::Q6_K, GgmlType::Q8_0]), None, "Q8_0's values pass 63");
        assert_eq!(QKind::for_types(&[GgmlType::Q4_K, GgmlType::Q4_0]), Some(QKind::U4));
        assert_eq!(QKind::for_types(&[GgmlType::Q8_0, GgmlType::Q8_0]), Some(QKind::S8));
        assert_eq!(QMatrix::from_ggml(GgmlType::Q8_0, 4, 64, &[0; 272]).unwrap().m.len(), 0, "S8 stores no offsets");
        assert_eq!(QKind::for_types(&[GgmlType::Q4_K, GgmlType::Q8_0]), Some(QKind::U8));
        assert_eq!(QKind::for_types(&[GgmlType::Q4_K, GgmlType::Q5_0]), Some(QKind::U5));
        assert_eq!(QKind::for_types(&[GgmlType::Q5_1, GgmlType::Q8_0]), Some(QKind::U8));
        assert_eq!(QKind::for_types(&[GgmlType::Q5_K, GgmlType::Q6_K]), Some(QKind::U6));
        assert_eq!(QKind::for_types(&[GgmlType::Q4_K, GgmlType::F16]), None);
        let mut b = QMatrixBuilder::new(QKind::U8, 256);
        assert!(b.push_ggml(GgmlType::Q6_K, 1, &[0; 210]).is_none(), "16-value scales need a U6 matrix");
        let mut b = QMatrixBuilder::new(QKind::U6, 32);
        assert!(b.push_ggml(GgmlType::Q8_0, 1, &[0; 34]).is_none(), "8-bit values do not fit a U6 matrix");
        assert!(QMatrix::from_ggml(GgmlType::Q4_K, 1, 288, &[0; 162]).is_none(), "288 is not whole super-blocks");
        let mut b = QMatrixBuilder::new(QKind::U4, 256);
        assert!(b.push_ggml(GgmlType::Q5_K, 1, &[0; 176]).is_none(), "5 bits do not fit a 4-bit matrix");
        assert!(QMatrix::from_ggml(GgmlType::Q4_1, 2, 48, &[0; 60]).is_none(), "48 is not whole blocks");
        assert!(QMatrix::from_ggml(GgmlType::F32, 1, 32, &[0; 128]).is_none());
        assert!(QMatrix::from_ggml(GgmlType::Q8_0, 2, 32, &[0; 60]).is_none(), "wrong size");
        let mut b = QMatrixBuilder::new(QKind::U4, 32);
        assert!(b.push_ggml(GgmlType::Q8_0, 1, &[0; 34]).is_none(), "kinds do not mix");
    }
}
