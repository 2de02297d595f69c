//! Per-row math of the model's other kernels: RMSNorm (optionally fused with the residual
//! add), rotary embedding in both layouts, SiLU-and-multiply, argmax. The device kernels
//! spread a row over a thread block; these are the same formulas, one row at a time.

use crate::fmath::rsqrt;
#[cfg(not(target_arch = "nvptx64"))]
use crate::fmath::silu;

#[cfg(not(target_arch = "nvptx64"))]
/// `out = x / rms(x) * w`, with `rms(x) = sqrt(mean(x^2) + eps)`.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = rms_inv(x.iter().map(|v| v * v).sum::<f32>(), x.len(), eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

#[cfg(not(target_arch = "nvptx64"))]
/// [`rms_norm_row`] in place: `x = rms_norm(x) * w` (one head: qwen3's and gemma3's Q/K norms).
pub fn rms_norm_row_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let inv = rms_inv(x.iter().map(|v| v * v).sum::<f32>(), x.len(), eps);
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * inv * g;
    }
}

#[cfg(not(target_arch = "nvptx64"))]
/// `residual += x; x = rms_norm(residual) * w` (the pre-norm of the next sub-layer).
pub fn fused_add_rms_norm_row(x: &mut [f32], residual: &mut [f32], w: &[f32], eps: f32) {
    let mut ss = 0.0;
    for (r, &v) in residual.iter_mut().zip(x.iter()) {
        *r += v;
        ss += *r * *r;
    }
    let inv = rms_inv(ss, x.len(), eps);
    for ((o, &r), &g) in x.iter_mut().zip(residual.iter()).zip(w) {
        *o = r * inv * g;
    }
}

#[inline(always)]
pub fn rms_inv(sum_sq: f32, n: usize, eps: f32) -> f32 {
    rsqrt(sum_sq / n as f32 + eps)
}

/// Which elements of a head vector rotate together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i + 1)`: GGUF Llama weights (llama.cpp's "normal" rope).
    Interleaved = 0,
    /// Pairs `(i, i + rot/2)`: the half-split "neox" layout (HF checkpoints).
    Neox = 1,
}

impl RopeLayout {
    /// Indices of the `i`-th rotating pair among the first `rot_dim` elements.
    #[inline(always)]
    pub fn pair(self, i: usize, rot_dim: usize) -> (usize, usize) {
        match self {
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
            RopeLayout::Neox => (i, i + rot_dim / 2),
        }
    }
}

/// Rotates `(x0, x1)` by the angle whose cosine and sine are given.
#[inline(always)]
pub fn rope_pair(x0: f32, x1: f32, cos: f32, sin: f32) -> (f32, f32) {
    (x0 * cos - x1 * sin, x1 * cos + x0 * sin)
}

#[cfg(not(target_arch = "nvptx64"))]
/// Applies rotary embedding to one head vector. `cos_sin` is the position's row of the
/// cache: `rot_dim / 2` cosines then `rot_dim / 2` sines (see [`fill_cos_sin_row`]).
pub fn rope_head(x: &mut [f32], cos_sin: &[f32], rot_dim: usize, layout: RopeLayout) {
    let half = rot_dim / 2;
    for i in 0..half {
        let (a, b) = layout.pair(i, rot_dim);
        let (y0, y1) = rope_pair(x[a], x[b], cos_sin[i], cos_sin[half + i]);
        x[a] = y0;
        x[b] = y1;
    }
}

/// The cos/sin cache row of position `pos`: angle `pos * theta^(-2i / rot_dim)`, computed
/// in f64 on the host (device sine approximations are poor for large angles).
#[cfg(not(target_arch = "nvptx64"))]
pub fn fill_cos_sin_row(pos: usize, rot_dim: usize, theta: f64, row: &mut [f32]) {
    fill_cos_sin_row_scaled(pos, rot_dim, theta, &[], row)
}

/// [`fill_cos_sin_row`] with pair `i`'s frequency divided by `divisors[i]` (Llama 3's
/// `rope_freqs`: long wavelengths stretched); an empty `divisors` divides by one.
#[cfg(not(target_arch = "nvptx64"))]
pub fn fill_cos_sin_row_scaled(pos: usize, rot_dim: usize, theta: f64, divisors: &[f32], row: &mut [f32]) {
    let half = rot_dim / 2;
    for i in 0..half {
        let div = divisors.get(i).map_or(1.0, |&d| d as f64);
        let freq = theta.powf(-(2.0 * i as f64) / rot_dim as f64) / div;
        let a = pos as f64 * freq;
        row[i] = a.cos() as f32;
        row[half + i] = a.sin() as f32;
    }
}

#[cfg(not(target_arch = "nvptx64"))]
/// `out[i] = gelu(gate[i]) * up[i]` where the row is `[gate | up]`, with GELU's tanh form
/// `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (Gemma's `gelu_pytorch_tanh`).
pub fn gelu_and_mul_row(gate_up: &[f32], out: &mut [f32]) {
    let n = out.len();
    for (i, o) in out.iter_mut().enumerate() {
        *o = gelu_tanh(gate_up[i]) * gate_up[n + i];
    }
}

#[cfg(not(target_arch = "nvptx64"))]
/// GELU, tanh form.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

#[cfg(not(target_arch = "nvptx64"))]
/// `out[i] = silu(gate[i]) * up[i]` where the row is `[gate | up]`.
pub fn silu_and_mul_row(gate_up: &[f32], out: &mut [f32]) {
    let n = out.len();
    for (i, o) in out.iter_mut().enumerate() {
        *o = silu(gate_up[i]) * gate_up[n + i];
    }
}

#[cfg(not(target_arch = "nvptx64"))]
/// Index of the largest value; the lowest index wins ties; NaN never wins (0 when every value
/// is NaN). Two passes that vectorize: the largest value in 16 lanes, then its first index.
/// (One pass that carries the best index is a serial chain of loads and compares: over a
/// 49152-token vocabulary it was a fifth of a CPU decode step.)
pub fn argmax_row(x: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let mut best = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            // `max` keeps the non-NaN operand.
            *l = l.max(v);
        }
    }
    best = lanes.iter().fold(best, |a, &v| a.max(v));
    x.iter().position(|&v| v == best).unwrap_or(0) as u32
}

/// Merges two (value, index) candidates as the device's warp reduction does.
#[inline(always)]
pub fn argmax_pick(a: (f32, u32), b: (f32, u32)) -> (f32, u32) {
    if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) || (a.0.is_nan() && !b.0.is_nan()) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_and_fused_add() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 0.5, 2.0, 1.0];
        let mut out = [0.0; 4];
        rms_norm_row(&x, &w, 1e-6, &mut out);
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f32 + 1e-6).sqrt();
        for i in 0..4 {
            assert!((out[i] - x[i] / rms * w[i]).abs() < 1e-6);
        }
        let mut xs = [0.5f32, -1.0, 1.0, 0.25];
        let mut res = [0.5f32, -1.0, 2.0, 0.25];
        fused_add_rms_norm_row(&mut xs, &mut res, &w, 1e-6);
        assert_eq!(res, x);
        assert_eq!(xs, out);
    }

    /// Pair `i`'s angle is divided by `divisors[i]`; no divisors is the plain table.
    #[test]
    fn rope_freq_divisors_stretch_each_pair() {
        let (mut plain, mut scaled) = ([0.0f32; 4], [0.0f32; 4]);
        fill_cos_sin_row(5, 4, 10000.0, &mut plain);
        fill_cos_sin_row_scaled(5, 4, 10000.0, &[1.0, 8.0], &mut scaled);
        assert_eq!((plain[0], plain[2]), (scaled[0], scaled[2]), "pair 0 divided by one");
        let a1 = 5.0 * 10000f64.powf(-0.5) / 8.0;
        assert!((scaled[1] as f64 - a1.cos()).abs() < 1e-6 && (scaled[3] as f64 - a1.sin()).abs() < 1e-6);
        let mut none = [0.0f32; 4];
        fill_cos_sin_row_scaled(5, 4, 10000.0, &[], &mut none);
        assert_eq!(none, plain);
    }

    /// GELU's tanh form at points worked out by hand (PyTorch's `gelu(x, approximate='tanh')`
    /// gives the same), and the gated product.
    #[test]
    fn gelu_tanh_and_the_gated_product() {
        for (x, want) in [(0.0f32, 0.0f32), (1.0, 0.841_192), (-1.0, -0.158_808), (3.0, 2.996_363)] {
            assert!((gelu_tanh(x) - want).abs() < 2e-6, "gelu({x}) = {}", gelu_tanh(x));
        }
        let mut out = [0.0f32; 2];
        gelu_and_mul_row(&[1.0, -1.0, 2.0, 3.0], &mut out);
        assert!((out[0] - 2.0 * 0.841_192).abs() < 1e-5 && (out[1] + 3.0 * 0.158_808).abs() < 1e-5, "{out:?}");
    }

    #[test]
    fn rope_layouts_rotate_the_right_pairs() {
        let mut cs = [0.0f32; 4];
        fill_cos_sin_row(3, 4, 10000.0, &mut cs);
        let a0 = 3.0f64;
        let a1 = 3.0 * 10000f64.powf(-0.5);
        assert!((cs[0] as f64 - a0.cos()).abs() < 1e-6 && (cs[3] as f64 - a1.sin()).abs() < 1e-6);
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut y = x;
        rope_head(&mut y, &cs, 4, RopeLayout::Interleaved);
        assert!((y[0] - (1.0 * cs[0] - 2.0 * cs[2])).abs() < 1e-6);
        assert!((y[3] - (4.0 * cs[1] + 3.0 * cs[3])).abs() < 1e-6);
        let mut z = x;
        rope_head(&mut z, &cs, 4, RopeLayout::Neox);
        assert!((z[0] - (1.0 * cs[0] - 3.0 * cs[2])).abs() < 1e-6);
        assert!((z[3] - (4.0 * cs[1] + 2.0 * cs[3])).abs() < 1e-6);
        // Rotation keeps the norm.
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&y) - n(&x)).abs() < 1e-4 && (n(&z) - n(&x)).abs() < 1e-4);
    }

    #[test]
    fn silu_mul_and_argmax() {
        let mut out = [0.0f32; 2];
        silu_and_mul_row(&[1.0, -1.0, 2.0, 3.0], &mut out);
        assert!((out[0] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
        assert!((out[1] - (-3.0) / (1.0 + 1.0f32.exp())).abs() < 1e-6);
        assert_eq!(argmax_row(&[1.0, 5.0, f32::NAN, 5.0, -1.0]), 1);
        assert_eq!(argmax_row(&[f32::NAN, 0.0]), 1);
        assert_eq!(argmax_pick((5.0, 3), (5.0, 1)), (5.0, 1));
        assert_eq!(argmax_pick((f32::NAN, 0), (-1.0, 4)), (-1.0, 4));
    }
}
