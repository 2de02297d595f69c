//! Q4_0: blocks of 32, an f16 scale `d` and 16 bytes of nibbles (element `j` the low nibble
//! of byte `j`, element `j + 16` its high one); `x = (q - 8) d`. Packs as `U4` with
//! `m = -8 d`, exactly.

use super::{f16_at, four_bit, quantize_symmetric, Block};
use crate::model::gguf::GgmlType;
use crate::model::packed::QKind;

impl GgmlType {
    pub const Q4_0: GgmlType = GgmlType(2);
}

#[allow(non_camel_case_types)]
pub struct Q4_0;

impl Block for Q4_0 {
    fn ty(&self) -> GgmlType {
        GgmlType::Q4_0
    }
    fn name(&self) -> &'static str {
        "Q4_0"
    }
    fn shape(&self) -> (usize, usize) {
        (32, 18)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        for (o, q) in out.iter_mut().zip(four_bit(&b[2..18])) {
            *o = (q as i32 - 8) as f32 * d;
        }
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        quantize_symmetric(x, out, 8.0);
    }
    fn kind(&self) -> Option<QKind> {
        Some(QKind::U4)
    }
    fn unpack(&self, b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>) {
        let s = f16_at(b, 0);
        d.push(s);
        m.push(-8.0 * s);
        u.extend(four_bit(&b[2..18]));
    }
    #[cfg(test)]
    fn tame(&self, b: &mut [u8], d: f32, _m: f32) {
        b[0..2].copy_from_slice(&super::f16(d).1);
    }
}
