//! Q4_K: super-blocks of 256 = 8 sub-blocks of 32: an f16 `d` and `dmin`, 12 bytes of 6-bit
//! sub-block scales and mins ([`k_scale_min`]), 128 bytes of nibbles (bytes `32c..32c + 32`
//! hold sub-block `2c` in their low nibbles and `2c + 1` in their high ones);
//! `x = d sc q - dmin m`. Packs as `U4`, each sub-block a block with `d = d sc`,
//! `m = -dmin m` (exact in f32: 11 by 6 bits).
//!
//! Q5_K ([`super::q5_k`]) is this with a fifth bit, so the functions here take `five`.

use super::{f16, f16_at, inv, Block};
use crate::model::gguf::GgmlType;
use crate::model::packed::QKind;

impl GgmlType {
    pub const Q4_K: GgmlType = GgmlType(12);
}

#[allow(non_camel_case_types)]
pub struct Q4_K;

impl Block for Q4_K {
    fn ty(&self) -> GgmlType {
        GgmlType::Q4_K
    }
    fn name(&self) -> &'static str {
        "Q4_K"
    }
    fn shape(&self) -> (usize, usize) {
        (256, 144)
    }
    fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        dequantize(b, out, false);
    }
    fn quantize(&self, x: &[f32], out: &mut Vec<u8>) {
        quantize(x, out, false);
    }
    fn kind(&self) -> Option<QKind> {
        Some(QKind::U4)
    }
    fn unpack(&self, b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>) {
        unpack(b, u, d, m, false);
    }
    #[cfg(test)]
    fn tame(&self, b: &mut [u8], d: f32, m: f32) {
        tame(b, d, m);
    }
}

/// Sub-block `j`'s (of 8) scale and min, 6 bits each, from the 12 bytes `s`: for `j < 4`
/// the low six bits of bytes `j` and `j + 4`; for the others the nibbles of byte `j + 4`
/// below the top two bits of bytes `j - 4` (scale) and `j` (min).
pub(super) fn k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | (s[j - 4] >> 6) << 4, (s[j + 4] >> 4) | (s[j] >> 6) << 4)
    }
}

/// The values of sub-block `j`, from the 128 bytes of nibbles `qs` and, for Q5_K, the 32
/// bytes of fifth bits `qh` (element `l`'s bit `j` of byte `l`).
fn values(qs: &[u8], qh: Option<&[u8]>, j: usize) -> [u8; 32] {
    let mut q = [0u8; 32];
    for (l, q) in q.iter_mut().enumerate() {
        let high = qh.map_or(0, |h| ((h[l] >> j) & 1) << 4);
        *q = ((qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0f) | high;
    }
    q
}

/// The nibbles and fifth bits of a block of `five`-bit K values.
fn planes(b: &[u8], five: bool) -> (&[u8], Option<&[u8]>) {
    if five {
        (&b[48..176], Some(&b[16..48]))
    } else {
        (&b[16..144], None)
    }
}

pub(super) fn dequantize(b: &[u8], out: &mut [f32], five: bool) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (qs, qh) = planes(b, five);
    for (j, o) in out.chunks_exact_mut(32).enumerate() {
        let (sc, m) = k_scale_min(&b[4..16], j);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        for (o, q) in o.iter_mut().zip(values(qs, qh, j)) {
            *o = q as f32 * dl - ml;
        }
    }
}

pub(super) fn unpack(b: &[u8], u: &mut Vec<u8>, d: &mut Vec<f32>, m: &mut Vec<f32>, five: bool) {
    let (sd, smin) = (f16_at(b, 0), f16_at(b, 2));
    let (qs, qh) = planes(b, five);
    for j in 0..8 {
        let (sc, mn) = k_scale_min(&b[4..16], j);
        d.push(sd * sc as f32);
        m.push(-(smin * mn as f32));
        u.extend(values(qs, qh, j));
    }
}

/// Each sub-block of 32 gets a scale and a min (`x ≈ d sc q - dmin m`), both rounded to 6
/// bits against the super-block's `d`, `dmin`.
pub(super) fn quantize(x: &[f32], out: &mut Vec<u8>, five: bool) {
    let top = if five { 31.0 } else { 15.0 };
    // Per sub-block: the scale and the (non-negative) offset below zero.
    let subs: Vec<(f32, f32)> = x
        .chunks_exact(32)
        .map(|s| {
            let (lo, hi) = s.iter().fold((0.0f32, f32::MIN), |(a, z), &v| (a.min(v), z.max(v)));
            ((hi - lo).max(0.0) / top, -lo)
        })
        .collect();
    let (d, db) = f16(subs.iter().fold(0.0f32, |m, s| m.max(s.0)) / 63.0);
    let (dmin, mb) = f16(subs.iter().fold(0.0f32, |m, s| m.max(s.1)) / 63.0);
    let sc: Vec<u8> = subs.iter().map(|s| (s.0 * inv(d)).round().clamp(0.0, 63.0) as u8).collect();
    // The offset rounds up, so that the sub-block's lowest value stays representable.
    let mn: Vec<u8> = subs.iter().map(|s| (s.1 * inv(dmin)).ceil().clamp(0.0, 63.0) as u8).collect();
    out.extend(db);
    out.extend(mb);
    // The inverse of `k_scale_min`.
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        s[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
        s[j + 8] = (sc[j + 4] & 0x0f) | (mn[j + 4] & 0x0f) << 4;
    }
    out.extend(s);
    let mut qh = [0u8; 32];
    let mut qs = [0u8; 128];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let (dl, ml) = (d * sc[j] as f32, dmin * mn[j] as f32);
        for (l, &v) in sub.iter().enumerate() {
            let q = ((v + ml) * inv(dl)).round().clamp(0.0, top) as u8;
            qs[32 * (j / 2) + l] |= (q & 0x0f) << (4 * (j % 2));
            qh[l] |= ((q >> 4) & 1) << j;
        }
    }
    if five {
        out.extend(qh);
    }
    out.extend(qs);
}

/// Tests: `d / 16` and a positive `dmin` of `-m / 40`, so that the 6-bit multipliers keep
/// values modest.
#[cfg(test)]
pub(super) fn tame(b: &mut [u8], d: f32, m: f32) {
    b[0..2].copy_from_slice(&f16(d / 16.0).1);
    b[2..4].copy_from_slice(&f16(-m / 40.0).1);
}
