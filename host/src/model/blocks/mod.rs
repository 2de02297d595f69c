//! The ggml storage types weave reads, one file each. A type's file holds its block layout
//! (elements and bytes a block, its ggml number and name), its decoding into f32 (the
//! definition everything else is tested against, and checked against llama.cpp's gguf-py in
//! `tests/tests/ggml_blocks.rs`), a plain-rounding encoder (for the synthetic fixtures of
//! [`super::synth`]; llama.cpp's `llama-quantize` searches its scales, and any valid block
//! decodes the same way), and, for the quantized types, how its blocks unpack into the packed
//! matrices of [`super::packed`]: the [`QKind`] whose CPU kernels dot them with 8-bit
//! activations.
//!
//! Adding a type is one file here and one line in [`ALL`]; if its values fit a [`QKind`]
//! (unsigned values with a scale and an offset per 32, or per 16), the CPU kernels take it
//! with no change.

mod float;
mod q4_0;
mod q4_1;
mod q4_k;
mod q5_0;
mod q5_1;
mod q5_k;
mod q6_k;
mod q8_0;

use super::gguf::GgmlType;
use super::packed::QKind;
use weave_kernels_gpu::elem::{f16_bits_to_f32, f32_to_f16_bits};

/// One ggml storage type.
pub trait Block: Sync {
    fn ty(&self) -> GgmlType;
    /// ggml's spelling.
    fn name(&self) -> &'static str;
    /// (elements, bytes) of one block.
    fn shape(&self) -> (usize, usize);
    /// One block `b` into its `shape().0` values.
    fn dequantize(&self, b: &[u8], out: &mut [f32]);
    /// One block of values `x`, appended to `out` as this type's bytes.
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>);
    /// The packed kind that holds this type's values exactly, if any ([`QKind::holds`]).
    fn kind(&self) -> Option<QKind> {
        None
    }
    /// For a type with a [`Block::kind`]: block `b` as unsigned values `u` with `w = d u + m`,
    /// one scale `d` and offset `m` per 32 values (per 16 for `QKind::U6`), appended. The
    /// scales must be exact in f32, so that `u d + m` rounds once, as the decoder does.
    fn unpack(&self, _b: &[u8], _u: &mut Vec<u8>, _d: &mut Vec<f32>, _m: &mut Vec<f32>) {
        unreachable!("{} does not pack", self.name())
    }
    /// Tests: overwrites a random block's f16 scales and offsets with `d` and `m` (modest,
    /// finite), scaled to the type's multipliers.
    #[cfg(test)]
    fn tame(&self, _b: &mut [u8], _d: f32, _m: f32) {}
}

/// Every type weave reads.
pub const ALL: [&dyn Block; 11] = [
    &float::F32,
    &float::F16,
    &float::BF16,
    &q4_0::Q4_0,
    &q4_1::Q4_1,
    &q5_0::Q5_0,
    &q5_1::Q5_1,
    &q8_0::Q8_0,
    &q4_k::Q4_K,
    &q5_k::Q5_K,
    &q6_k::Q6_K,
];

/// The type `ty`, if weave reads it.
pub fn of(ty: GgmlType) -> Option<&'static dyn Block> {
    ALL.iter().copied().find(|b| b.ty() == ty)
}

/// The names of the types weave reads, for error messages.
pub fn supported() -> String {
    ALL.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
}

/// Decodes `data` (whole blocks of `ty`) into `out` (the tensor's element count); `Err` names
/// a type weave does not read.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), String> {
    let b = of(ty).ok_or_else(|| ty.name())?;
    let (be, bb) = b.shape();
    for (o, blk) in out.chunks_exact_mut(be).zip(data.chunks_exact(bb)) {
        b.dequantize(blk, o);
    }
    Ok(())
}

/// `x` (whole blocks of `ty`) as `ty`'s blocks. `Err` names a type this cannot write.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>, String> {
    let b = of(ty).ok_or_else(|| ty.name())?;
    let (be, bb) = b.shape();
    if !x.len().is_multiple_of(be) {
        return Err(format!("{} values are not whole {} blocks of {be}", x.len(), b.name()));
    }
    let mut out = Vec::with_capacity(x.len() / be * bb);
    for blk in x.chunks_exact(be) {
        let start = out.len();
        b.quantize(blk, &mut out);
        debug_assert_eq!(out.len() - start, bb, "{} block size", b.name());
    }
    Ok(out)
}

// Helpers the types share.

/// The little-endian f16 at byte `i` of `b`, widened.
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// `x` rounded to f16, and its bytes.
fn f16(x: f32) -> (f32, [u8; 2]) {
    let b = f32_to_f16_bits(x);
    (f16_bits_to_f32(b), b.to_le_bytes())
}

/// `1 / d`, or 0 for a zero scale (an all-zero block quantizes to zeros).
fn inv(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// The element of largest magnitude, with its sign (ggml's `max` for Q4_0/Q5_0/Q6_K).
fn signed_max(x: &[f32]) -> f32 {
    x.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m })
}

/// Q4_0/Q4_1/Q5_0/Q5_1's 32 values after their scales: for five bits the high bits first (a
/// little-endian u32, bit `j` for element `j`), then the nibbles (element `j` low in byte
/// `j`, element `j + 16` high).
fn push_low_bits(out: &mut Vec<u8>, q: &[u8], five: bool) {
    if five {
        let h = q.iter().enumerate().fold(0u32, |h, (j, &v)| h | (((v >> 4) & 1) as u32) << j);
        out.extend(h.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 0x0f) | (q[j + 16] & 0x0f) << 4));
}

/// Q4_0/Q4_1's 32 values of 4 bits from their 16 bytes: element `j` the low nibble of byte
/// `j`, element `j + 16` its high nibble.
fn four_bit(qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = qs[j] & 0x0f;
        q[j + 16] = qs[j] >> 4;
    }
    q
}

/// Q5_0/Q5_1's 32 values of 5 bits: element `j` takes its nibble as in [`four_bit`] and bit
/// `j` of `qh` (a little-endian u32).
fn five_bit(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = four_bit(qs);
    for (j, q) in q.iter_mut().enumerate() {
        *q |= (((h >> j) & 1) as u8) << 4;
    }
    q
}

/// Q4_0 and Q5_0 (`half` 8 or 16): `d` from the signed largest value so that it maps to
/// `-half`, values `q = round(x / d) + half`.
fn quantize_symmetric(x: &[f32], out: &mut Vec<u8>, half: f32) {
    let (d, db) = f16(signed_max(x) / -half);
    let q: Vec<u8> = x.iter().map(|&v| (v * inv(d) + half).round().clamp(0.0, 2.0 * half - 1.0) as u8).collect();
    out.extend(db);
    push_low_bits(out, &q, half == 16.0);
}

/// Q4_1 and Q5_1 (`top` 15 or 31): `m` the smallest value, `d` the range over `top`.
fn quantize_min_max(x: &[f32], out: &mut Vec<u8>, top: f32) {
    let (lo, hi) = x.iter().fold((f32::MAX, f32::MIN), |(a, z), &v| (a.min(v), z.max(v)));
    let ((d, db), (m, mb)) = (f16((hi - lo) / top), f16(lo));
    let q: Vec<u8> = x.iter().map(|&v| ((v - m) * inv(d)).round().clamp(0.0, top) as u8).collect();
    out.extend(db);
    out.extend(mb);
    push_low_bits(out, &q, top == 31.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16(x).1
    }

    #[test]
    fn quantized_blocks_decode_as_ggml_defines_them() {
        let mut q40 = f16b(0.5).to_vec();
        q40.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &q40, &mut out).unwrap();
        assert_eq!(out[0], -4.0);
        assert_eq!(out[15], 3.5);
        assert_eq!(out[16], 3.5);
        assert_eq!(out[31], -4.0);
        let mut q41 = f16b(0.25).to_vec();
        q41.extend(f16b(-1.0));
        q41.extend((0..16u8).map(|j| j | (j << 4)));
        dequantize(GgmlType::Q4_1, &q41, &mut out).unwrap();
        assert_eq!(out[3], 3.0 * 0.25 - 1.0);
        assert_eq!(out[19], 3.0 * 0.25 - 1.0);
        let mut q8 = f16b(0.125).to_vec();
        q8.extend((0..32).map(|j| (j as i8 - 16) as u8));
        dequantize(GgmlType::Q8_0, &q8, &mut out).unwrap();
        assert_eq!(out[0], -2.0);
        assert_eq!(out[31], 15.0 * 0.125);
        assert_eq!(dequantize(GgmlType(23), &[], &mut out), Err("IQ4_XS".into()));
    }

    /// The registry is consistent: numbers and names are unique, and every type that packs
    /// says so through a kind.
    #[test]
    fn every_type_is_registered_once() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(std::ptr::eq(
                of(a.ty()).unwrap() as *const dyn Block as *const u8,
                *a as *const dyn Block as *const u8
            ));
            for b in &ALL[i + 1..] {
                assert!(a.ty() != b.ty() && a.name() != b.name(), "{} twice", a.name());
            }
            assert_eq!(a.ty().name(), a.name());
        }
        assert_eq!(supported(), "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K");
    }

    /// Each type's round trip stays within its step: the error's RMS against the values'.
    #[test]
    fn round_trips_stay_within_each_types_step() {
        let mut seed = 0x1234_5678u32;
        let x: Vec<f32> = (0..1024)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                // Blocks of different ranges and centres, some all positive.
                let u = seed as f32 / u32::MAX as f32 - 0.5;
                u * (1.0 + (i / 64) as f32) + if i % 256 < 32 { 2.0 } else { 0.0 }
            })
            .collect();
        let rms = |v: &[f32]| (v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32).sqrt();
        for (ty, bound) in [
            (GgmlType::Q8_0, 0.01),
            (GgmlType::Q4_0, 0.12),
            (GgmlType::Q4_1, 0.12),
            (GgmlType::Q5_0, 0.06),
            (GgmlType::Q5_1, 0.06),
            (GgmlType::Q4_K, 0.12),
            (GgmlType::Q5_K, 0.06),
            (GgmlType::Q6_K, 0.04),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 1e-2),
            (GgmlType::F32, 1e-9),
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len(), x.len() / ty.block().unwrap().0 * ty.block().unwrap().1, "{}", ty.name());
            let mut back = vec![0f32; x.len()];
            dequantize(ty, &q, &mut back).unwrap();
            let err: Vec<f32> = x.iter().zip(&back).map(|(a, b)| a - b).collect();
            let rel = rms(&err) / rms(&x);
            assert!(rel < bound, "{}: relative RMS error {rel}", ty.name());
        }
        let zeros = quantize(GgmlType::Q4_K, &[0.0; 256]).unwrap();
        let mut back = vec![1f32; 256];
        dequantize(GgmlType::Q4_K, &zeros, &mut back).unwrap();
        assert!(back.iter().all(|&v| v == 0.0), "an all-zero block decodes to zeros");
        assert!(quantize(GgmlType::Q4_K, &[0.0; 100]).unwrap_err().contains("not whole Q4_K blocks"));
        assert_eq!(quantize(GgmlType(16), &[0.0; 256]).unwrap_err(), "IQ2_XXS");
    }
}
