//! Q4_1: blocks of 32, an f16 scale `d` and min `m`, then 16 bytes of nibbles as Q4_0's;
//! `x = q d + m`. Packs as `U4` as it is.

use super::{f16_at, four_bit, quantize_min_max, Block};
use crate::model::gguf::GgmlType;
use crate::model::packed::QKind;

impl GgmlType {
    pub const Q4_1: GgmlType = GgmlType(3);
}

#[allow(non_camel_case_types)]
pub struct Q4_1;

impl Block for Q4_1 {
    fn ty(&self) -> GgmlType {
        GgmlType::Q4_1
    }
    fn name(&self) -> &'static str {
        "Q4_1"
    }
    fn shape(&self) -> (usize, usize) {
        (32, 20)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (o, q) in out.iter_mut().zip(four_bit(&b[4..20])) {
            *o = q as f32 * d + m;
        }
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        quantize_min_max(x, out, 15.0);
    }
    fn kind(&self) -> Option<QKind> {
        Some(QKind::U4)
    }
    fn unpack(&self, b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>) {
        d.push(f16_at(b, 0));
        m.push(f16_at(b, 2));
        u.extend(four_bit(&b[4..20]));
    }
    #[cfg(test)]
    fn tame(&self, b: &mut [u8], d: f32, m: f32) {
        b[0..2].copy_from_slice(&super::f16(d).1);
        b[2..4].copy_from_slice(&super::f16(m).1);
    }
}
