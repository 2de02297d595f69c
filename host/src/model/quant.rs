//! Dequantization of the ggml storage types weave reads, into f32.

use super::gguf::GgmlType;
use weave_kernels_gpu::elem::f16_bits_to_f32;

fn f16_at(b: &[u8], i: usize) -> f32 {
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
        GgmlType::Other(_) => return Err(ty.name()),
    }
    Ok(())
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
        assert_eq!(dequantize(GgmlType::Other(14), &[], &mut out), Err("Q6_K".into()));
    }
}
