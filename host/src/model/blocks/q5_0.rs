//! Q5_0: blocks of 32, an f16 scale `d`, 32 fifth bits (a little-endian u32, bit `j` for
//! element `j`) and nibbles as Q4_0's; `x = (q - 16) d`. Packs as `U5` with `m = -16 d`.

use super::{f16_at, five_bit, quantize_symmetric, Block};
use crate::model::gguf::GgmlType;
use crate::model::packed::QKind;

impl GgmlType {
    pub const Q5_0: GgmlType = GgmlType(6);
}

#[allow(non_camel_case_types)]
pub struct Q5_0;

impl Block for Q5_0 {
    fn ty(&self) -> GgmlType {
        GgmlType::Q5_0
    }
    fn name(&self) -> &'static str {
        "Q5_0"
    }
    fn shape(&self) -> (usize, usize) {
        (32, 22)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        for (o, q) in out.iter_mut().zip(five_bit(&b[2..6], &b[6..22])) {
            *o = (q as i32 - 16) as f32 * d;
        }
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        quantize_symmetric(x, out, 16.0);
    }
    fn kind(&self) -> Option<QKind> {
        Some(QKind::U5)
    }
    fn unpack(&self, b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>) {
        let s = f16_at(b, 0);
        d.push(s);
        m.push(-16.0 * s);
        u.extend(five_bit(&b[2..6], &b[6..22]));
    }
    #[cfg(test)]
    fn tame(&self, b: &mut [u8], d: f32, _m: f32) {
        b[0..2].copy_from_slice(&super::f16(d).1);
    }
}
