//! The unquantized types: F32, F16 and BF16, one element a block. None packs into a
//! [`super::QKind`]; the 16-bit ones load as [`crate::model::half::HMatrix`].

use super::{f16, Block};
use crate::model::gguf::GgmlType;
use weave_kernels_gpu::elem::f16_bits_to_f32;

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const BF16: GgmlType = GgmlType(30);
}

pub struct F32;
pub struct F16;
pub struct BF16;

impl Block for F32 {
    fn ty(&self) -> GgmlType {
        GgmlType::F32
    }
    fn name(&self) -> &'static str {
        "F32"
    }
    fn shape(&self) -> (usize, usize) {
        (1, 4)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        out.extend(x[0].to_le_bytes());
    }
}

impl Block for F16 {
    fn ty(&self) -> GgmlType {
        GgmlType::F16
    }
    fn name(&self) -> &'static str {
        "F16"
    }
    fn shape(&self) -> (usize, usize) {
        (1, 2)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        out[0] = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        out.extend(f16(x[0]).1);
    }
}

/// The top half of an f32: widening is a shift; narrowing truncates (as `tensor_f32` readers
/// of these files expect only the widening).
impl Block for BF16 {
    fn ty(&self) -> GgmlType {
        GgmlType::BF16
    }
    fn name(&self) -> &'static str {
        "BF16"
    }
    fn shape(&self) -> (usize, usize) {
        (1, 2)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        out[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        out.extend(((x[0].to_bits() >> 16) as u16).to_le_bytes());
    }
}
