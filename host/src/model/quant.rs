//! Dequantization of the ggml storage types weave reads, into f32: the definition each
//! packed layout and kernel is tested against (and, in `tests/tests/ggml_blocks.rs`, checked
//! against llama.cpp's own `gguf` Python package on random blocks).

use super::gguf::GgmlType;
use weave_kernels_gpu::elem::f16_bits_to_f32;

/// The little-endian f16 at byte `i` of `b`, widened.
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Fills `out` (the tensor's element count) from `data`; `Err` names an unsupported type.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), String> {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().expect("4"));
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::Bf16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        // Block of 32: scale d (f16), 16 bytes of nibbles; x = (q - 8) * d. Element j is the
        // low nibble of byte j, element j + 16 its high nibble.
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        // Block of 32: scale d, min m (f16 each), 16 bytes of nibbles; x = q * d + m.
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    o[j] = (b[4 + j] & 0x0f) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        // Block of 32: scale d (f16), 32 signed bytes; x = q * d.
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    o[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        // Block of 32: scale d (f16), 32 high bits (u32), 16 bytes of low nibbles; 5-bit
        // q = nibble | high bit << 4, element j's nibble as in Q4_0 and its high bit bit j;
        // x = (q - 16) * d.
        GgmlType::Q5_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(22)) {
                let d = f16_at(b, 0);
                for (j, q) in five_bit(&b[2..6], &b[6..22]).into_iter().enumerate() {
                    o[j] = (q as i32 - 16) as f32 * d;
                }
            }
        }
        // Block of 32: scale d, min m (f16 each), then as Q5_0; x = q * d + m.
        GgmlType::Q5_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(24)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, q) in five_bit(&b[4..8], &b[8..24]).into_iter().enumerate() {
                    o[j] = q as f32 * d + m;
                }
            }
        }
        // Super-block of 256 = 8 sub-blocks of 32: d, dmin (f16), 12 bytes of 6-bit sub-block
        // scales and mins ([`k_scale_min`]), 128 bytes of nibbles: bytes 32c..32c + 32 hold
        // sub-block 2c in their low nibbles and 2c + 1 in their high ones; x = d sc q - dmin m.
        // Q5_K adds a fifth bit: 32 bytes of high bits before the nibbles (sub-block j's
        // element l: bit j of byte l).
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let five = ty == GgmlType::Q5_K;
            let (size, qs) = if five { (176, 48) } else { (144, 16) };
            for (o, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(size)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                for (j, o) in o.chunks_exact_mut(32).enumerate() {
                    let (sc, m) = k_scale_min(&b[4..16], j);
                    let (dl, ml) = (d * sc as f32, dmin * m as f32);
                    for (l, o) in o.iter_mut().enumerate() {
                        let high = if five { ((b[16 + l] >> j) & 1) << 4 } else { 0 };
                        *o = (k_nibble(&b[qs..qs + 128], j, l) | high) as f32 * dl - ml;
                    }
                }
            }
        }
        // Super-block of 256 = 16 sub-blocks of 16: 128 bytes of low nibbles, 64 of high bit
        // pairs, 16 signed 8-bit sub-block scales, d (f16). Two halves of 128: in half h,
        // element e's low nibble is byte 64h + e % 64 (low nibble for e < 64, high for the
        // rest), its high pair bits 2(e / 32).. of byte 32h + e % 32; x = d sc (q - 32).
        GgmlType::Q6_K => {
            for (o, b) in out.chunks_exact_mut(256).zip(data.chunks_exact(210)) {
                let d = f16_at(b, 208);
                for (e, o) in o.iter_mut().enumerate() {
                    let q = six_bit(b, e) as i32 - 32;
                    let sc = b[192 + e / 16] as i8;
                    *o = d * sc as f32 * q as f32;
                }
            }
        }
        GgmlType::Other(_) => return Err(ty.name()),
    }
    Ok(())
}

/// Q6_K's value `e` (of 256, 0..63 before its offset of 32) in block `b`: the low four bits
/// from `ql` (bytes 0..128), the high two from `qh` (bytes 128..192). Its scale is the signed
/// byte `b[192 + e / 16]`.
#[inline]
pub fn six_bit(b: &[u8], e: usize) -> u8 {
    let (h, i) = (e / 128, e % 128);
    let lo = (b[64 * h + i % 64] >> (4 * (i / 64))) & 0x0f;
    let hi = (b[128 + 32 * h + i % 32] >> (2 * (i / 32))) & 3;
    lo | hi << 4
}

/// Q5_0/Q5_1's 32 values of 5 bits: element `j` (of 32) takes the low nibble of byte `j` of
/// `qs` (the high one for `j >= 16`, byte `j - 16`) and bit `j` of `qh` (a little-endian u32).
pub fn five_bit(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0f) | (((h >> j) & 1) as u8) << 4;
        q[j + 16] = (qs[j] >> 4) | (((h >> (j + 16)) & 1) as u8) << 4;
    }
    q
}

/// Q4_K/Q5_K's sub-block `j` (of 8) scale and min, 6 bits each, from the 12 bytes `s`: for
/// `j < 4` the low six bits of bytes `j` and `j + 4`; for the others the nibbles of byte
/// `j + 4` below the top two bits of bytes `j - 4` (scale) and `j` (min).
pub fn k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | (s[j - 4] >> 6) << 4, (s[j + 4] >> 4) | (s[j] >> 6) << 4)
    }
}

/// Q4_K/Q5_K's 4-bit value `l` of sub-block `j` from the 128 bytes of nibbles `qs`.
pub fn k_nibble(qs: &[u8], j: usize, l: usize) -> u8 {
    (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        weave_kernels_gpu::elem::f32_to_f16_bits(x).to_le_bytes()
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
        assert_eq!(dequantize(GgmlType::Other(23), &[], &mut out), Err("IQ4_XS".into()));
    }
}
