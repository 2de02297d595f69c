//! Q6_K: super-blocks of 256 = 16 sub-blocks of 16: 128 bytes of low nibbles, 64 of high bit
//! pairs, 16 signed 8-bit sub-block scales, then an f16 `d`. Two halves of 128: in half `h`,
//! element `e`'s low nibble is byte `64h + e % 64` (low nibble for `e < 64`, high for the
//! rest), its high pair bits `2(e / 32)..` of byte `128 + 32h + e % 32`;
//! `x = d sc (q - 32)`. Packs as `U6`, a scale `d sc` and offset `-32 d sc` per 16 (`d sc`
//! is exact in f32, 11 by 8 bits, so `u d + m` rounds once, as the decoder does).

use super::{f16, f16_at, inv, signed_max, Block};
use crate::model::gguf::GgmlType;
use crate::model::packed::QKind;

impl GgmlType {
    pub const Q6_K: GgmlType = GgmlType(14);
}

#[allow(non_camel_case_types)]
pub struct Q6_K;

/// Value `e` (of 256, 0..63 before its offset of 32) of block `b`.
#[inline]
fn six_bit(b: &[u8], e: usize) -> u8 {
    let (h, i) = (e / 128, e % 128);
    let lo = (b[64 * h + i % 64] >> (4 * (i / 64))) & 0x0f;
    let hi = (b[128 + 32 * h + i % 32] >> (2 * (i / 32))) & 3;
    lo | hi << 4
}

impl Block for Q6_K {
    fn ty(&self) -> GgmlType {
        GgmlType::Q6_K
    }
    fn name(&self) -> &'static str {
        "Q6_K"
    }
    fn shape(&self) -> (usize, usize) {
        (256, 210)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 208);
        for (e, o) in out.iter_mut().enumerate() {
            let q = six_bit(b, e) as i32 - 32;
            let sc = b[192 + e / 16] as i8;
            *o = d * sc as f32 * q as f32;
        }
    }
    /// Signed 8-bit scales against one f16 `d`, values `q - 32` in six bits.
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
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
    fn kind(&self) -> Option<QKind> {
        Some(QKind::U6)
    }
    fn unpack(&self, b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>) {
        let s = f16_at(b, 208);
        for &sc in &b[192..208] {
            let ds = s * sc as i8 as f32;
            d.push(ds);
            m.push(-32.0 * ds);
        }
        u.extend((0..256).map(|e| six_bit(b, e)));
    }
    #[cfg(test)]
    fn tame(&self, b: &mut [u8], d: f32, _m: f32) {
        b[208..210].copy_from_slice(&f16(d / 64.0).1);
    }
}
