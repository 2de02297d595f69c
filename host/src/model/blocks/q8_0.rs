//! Q8_0: blocks of 32, an f16 scale `d` and 32 signed bytes; `x = q d`. Packs as `S8`, as
//! it is; unpacked as `u = q + 128`, `m = -128 d` (exact), so that a `U8` matrix can stack it
//! with 4- and 5-bit parts.

use super::{f16, f16_at, inv, Block};
use crate::model::gguf::GgmlType;
use crate::model::packed::QKind;

impl GgmlType {
    pub const Q8_0: GgmlType = GgmlType(8);
}

#[allow(non_camel_case_types)]
pub struct Q8_0;

impl Block for Q8_0 {
    fn ty(&self) -> GgmlType {
        GgmlType::Q8_0
    }
    fn name(&self) -> &'static str {
        "Q8_0"
    }
    fn shape(&self) -> (usize, usize) {
        (32, 34)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        for (o, &q) in out.iter_mut().zip(&b[2..34]) {
            *o = q as i8 as f32 * d;
        }
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let (d, db) = f16(amax / 127.0);
        out.extend(db);
        out.extend(x.iter().map(|&v| (v * inv(d)).round().clamp(-127.0, 127.0) as i8 as u8));
    }
    fn kind(&self) -> Option<QKind> {
        Some(QKind::S8)
    }
    fn unpack(&self, b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>) {
        let s = f16_at(b, 0);
        d.push(s);
        m.push(-128.0 * s);
        u.extend(b[2..34].iter().map(|&x| (x as i8 as i16 + 128) as u8));
    }
    #[cfg(test)]
    fn tame(&self, b: &mut [u8], d: f32, _m: f32) {
        b[0..2].copy_from_slice(&f16(d).1);
    }
}
