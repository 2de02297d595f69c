//! Q5_K: Q4_K ([`super::q4_k`]) with a fifth bit: 32 bytes of high bits between the scales
//! and the nibbles (sub-block `j`'s element `l`: bit `j` of byte `l`). Packs as `U5`.

use super::{q4_k, Block};
use crate::model::gguf::GgmlType;
use crate::model::packed::QKind;

impl GgmlType {
    pub const Q5_K: GgmlType = GgmlType(13);
}

#[allow(non_camel_case_types)]
pub struct Q5_K;

impl Block for Q5_K {
    fn ty(&self) -> GgmlType {
        GgmlType::Q5_K
    }
    fn name(&self) -> &'static str {
        "Q5_K"
    }
    fn shape(&self) -> (usize, usize) {
        (256, 176)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        q4_k::dequantize(b, out, true);
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        q4_k::quantize(x, out, true);
    }
    fn kind(&self) -> Option<QKind> {
        Some(QKind::U5)
    }
    fn unpack(&self, b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>) {
        q4_k::unpack(b, u, d, m, true);
    }
    #[cfg(test)]
    fn tame(&self, b: &mut [u8], d: f32, m: f32) {
        q4_k::tame(b, d, m);
    }
}
