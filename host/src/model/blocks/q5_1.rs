//! Q5_1: blocks of 32, an f16 scale `d` and min `m`, then fifth bits and nibbles as Q5_0's;
//! `x = q d + m`. Packs as `U5` as it is.

use super::{f16_at, five_bit, quantize_min_max, Block};
use crate::model::gguf::GgmlType;
use crate::model::packed::QKind;

impl GgmlType {
    pub const Q5_1: GgmlType = GgmlType(7);
}

#[allow(non_camel_case_types)]
pub struct Q5_1;

impl Block for Q5_1 {
    fn ty(&self) -> GgmlType {
        GgmlType::Q5_1
    }
    fn name(&self) -> &'static str {
        "Q5_1"
    }
    fn shape(&self) -> (usize, usize) {
        (32, 24)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (o, q) in out.iter_mut().zip(five_bit(&b[4..8], &b[8..24])) {
            *o = q as f32 * d + m;
        }
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        quantize_min_max(x, out, 31.0);
    }
    fn kind(&self) -> Option<QKind> {
        Some(QKind::U5)
    }
    fn unpack(&self, b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>) {
        d.push(f16_at(b, 0));
        m.push(f16_at(b, 2));
        u.extend(five_bit(&b[4..8], &b[8..24]));
    }
    #[cfg(test)]
    fn tame(&self, b: &mut [u8], d: f32, m: f32) {
        b[0..2].copy_from_slice(&super::f16(d).1);
        b[2..4].copy_from_slice(&super::f16(m).1);
    }
}
