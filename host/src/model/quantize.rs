//! Quantization into the ggml block types weave reads: the inverse of [`super::quant`], by
//! plain rounding (llama.cpp's `llama-quantize` searches its K-quant scales; any valid block
//! decodes the same way, which is what a fixture needs). weave serves files others made; this
//! writes the quantized synthetic models its tests check against llama.cpp
//! ([`super::synth`]), so that no quantized file has to be committed.

use super::gguf::GgmlType;
use weave_kernels_gpu::elem::{f16_bits_to_f32, f32_to_f16_bits};

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

/// The element of largest magnitude, with its sign (ggml's `max` for Q4_0/Q5_0).
fn signed_max(x: &[f32]) -> f32 {
    x.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m })
}

/// `x` (whole blocks of `ty`) as `ty`'s blocks. `Err` names a type this cannot write.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>, String> {
    let (be, bb) = ty.block().ok_or_else(|| ty.name())?;
    if !x.len().is_multiple_of(be) {
        return Err(format!("{} values are not whole {} blocks of {be}", x.len(), ty.name()));
    }
    let mut out = Vec::with_capacity(x.len() / be * bb);
    for b in x.chunks_exact(be) {
        let start = out.len();
        match ty {
            GgmlType::F32 => out.extend(b.iter().flat_map(|v| v.to_le_bytes())),
            GgmlType::F16 => out.extend(b.iter().flat_map(|&v| f16(v).1)),
            GgmlType::Bf16 => out.extend(b.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())),
            GgmlType::Q8_0 => {
                let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let (d, db) = f16(amax / 127.0);
                out.extend(db);
                out.extend(b.iter().map(|&v| (v * inv(d)).round().clamp(-127.0, 127.0) as i8 as u8));
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let five = ty == GgmlType::Q5_0;
                let half = if five { 16.0 } else { 8.0 };
                let (d, db) = f16(signed_max(b) / -half);
                let q: Vec<u8> =
                    b.iter().map(|&v| (v * inv(d) + half).round().clamp(0.0, 2.0 * half - 1.0) as u8).collect();
                out.extend(db);
                push_low_bits(&mut out, &q, five);
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                let five = ty == GgmlType::Q5_1;
                let top = if five { 31.0 } else { 15.0 };
                let (lo, hi) = b.iter().fold((f32::MAX, f32::MIN), |(a, z), &v| (a.min(v), z.max(v)));
                let ((d, db), (m, mb)) = (f16((hi - lo) / top), f16(lo));
                let q: Vec<u8> = b.iter().map(|&v| ((v - m) * inv(d)).round().clamp(0.0, top) as u8).collect();
                out.extend(db);
                out.extend(mb);
                push_low_bits(&mut out, &q, five);
            }
            GgmlType::Q4_K | GgmlType::Q5_K => k_block(&mut out, b, ty == GgmlType::Q5_K),
            GgmlType::Q6_K => q6_k_block(&mut out, b),
            GgmlType::Other(_) => return Err(ty.name()),
        }
        debug_assert_eq!(out.len() - start, bb, "{} block size", ty.name());
    }
    Ok(out)
}

/// Q4_0/Q4_1/Q5_0/Q5_1's values after their scales: for five bits the high bits first (a
/// little-endian u32, bit `j` for element `j`), then the nibbles (element `j` low in byte
/// `j`, element `j + 16` high).
fn push_low_bits(out: &mut Vec<u8>, q: &[u8], five: bool) {
    if five {
        let h = q.iter().enumerate().fold(0u32, |h, (j, &v)| h | (((v >> 4) & 1) as u32) << j);
        out.extend(h.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 0x0f) | (q[j + 16] & 0x0f) << 4));
}

/// One Q4_K (or, `five`, Q5_K) super-block of 256: each sub-block of 32 gets a scale and a
/// min (`x ≈ d sc q - dmin m`), both rounded to 6 bits against the super-block's `d`, `dmin`.
fn k_block(out: &mut Vec<u8>, x: &[f32], five: bool) {
    let top = if five { 31.0 } else { 15.0 };
    // Per sub-block: the scale and the (non-negative) offset below zero.
    let subs: Vec<(f32, f32)> = x
        .chunks_exact(32)
        .map(|s| {
            let (lo, hi) = s.iter().fold((0.0f32, f32::MIN), |(a, z), &v| (a.min(v), z.max(v)));
            ((hi - lo).max(0.0) / top, -lo)
        })
        .collect();
    let (d, db) = f16(subs.iter().fold(0.0f32, |m, s| m.max(s.0)) / 63.0);
    let (dmin, mb) = f16(subs.iter().fold(0.0f32, |m, s| m.max(s.1)) / 63.0);
    let sc: Vec<u8> = subs.iter().map(|s| (s.0 * inv(d)).round().clamp(0.0, 63.0) as u8).collect();
    // The offset rounds up, so that the sub-block's lowest value stays representable.
    let mn: Vec<u8> = subs.iter().map(|s| (s.1 * inv(dmin)).ceil().clamp(0.0, 63.0) as u8).collect();
    out.extend(db);
    out.extend(mb);
    // The inverse of `quant::k_scale_min`.
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        s[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
        s[j + 8] = (sc[j + 4] & 0x0f) | (mn[j + 4] & 0x0f) << 4;
    }
    out.extend(s);
    let mut qh = [0u8; 32];
    let mut qs = [0u8; 128];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let (dl, ml) = (d * sc[j] as f32, dmin * mn[j] as f32);
        for (l, &v) in sub.iter().enumerate() {
            let q = ((v + ml) * inv(dl)).round().clamp(0.0, top) as u8;
            qs[32 * (j / 2) + l] |= (q & 0x0f) << (4 * (j % 2));
            qh[l] |= ((q >> 4) & 1) << j;
        }
    }
    if five {
        out.extend(qh);
    }
    out.extend(qs);
}

/// One Q6_K super-block of 256: 16 sub-blocks of 16 with signed 8-bit scales against one f16
/// `d`, values `q - 32` in six bits (`x ≈ d sc (q - 32)`).
fn q6_k_block(out: &mut Vec<u8>, x: &[f32]) {
    let scales: Vec<f32> = x.chunks_exact(16).map(|s| signed_max(s) / -32.0).collect();
    let amax = scales.iter().fold(0.0f32, |m, s| m.max(s.abs()));
    let (d, db) = f16(amax / 127.0);
    let sc: Vec<i8> = scales.iter().map(|&s| (s * inv(d)).round().clamp(-127.0, 127.0) as i8).collect();
    let mut b = [0u8; 210];
    for (e, &v) in x.iter().enumerate() {
        let dl = d * sc[e / 16] as f32;
        let q = ((v * inv(dl)).round().clamp(-32.0, 31.0) as i32 + 32) as u8;
        let (h, i) = (e / 128, e % 128);
        b[64 * h + i % 64] |= (q & 0x0f) << (4 * (i / 64));
        b[128 + 32 * h + i % 32] |= (q >> 4) << (2 * (i / 32));
    }
    for (j, &s) in sc.iter().enumerate() {
        b[192 + j] = s as u8;
    }
    b[208..210].copy_from_slice(&db);
    out.extend(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::dequantize;

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
    }
}
