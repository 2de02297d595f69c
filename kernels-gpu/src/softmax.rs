//! Online (flash-style) softmax: a running max `m` and normaliser `l` beside an unnormalised
//! accumulator, updated one KV block at a time, and the merge of partial results computed
//! over disjoint key ranges (flash-decoding's reduce).

use crate::fmath::exp;
#[cfg(not(target_arch = "nvptx64"))]
use crate::fmath::max;

/// Running softmax statistics of one query row over the keys seen so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftmaxState {
    /// Largest score seen (`-inf` when none).
    pub m: f32,
    /// Sum of `exp(score - m)` over the keys seen.
    pub l: f32,
}

impl SoftmaxState {
    pub const EMPTY: SoftmaxState = SoftmaxState { m: f32::NEG_INFINITY, l: 0.0 };

    /// Moves the state to a new maximum `m_new >= self.m` and returns the factor by which
    /// the accumulator must be scaled. With nothing seen yet the factor is 0.
    #[inline(always)]
    pub fn rescale(&mut self, m_new: f32) -> f32 {
        let alpha = if self.m == f32::NEG_INFINITY { 0.0 } else { exp(self.m - m_new) };
        self.l *= alpha;
        self.m = m_new;
        alpha
    }

    #[cfg(not(target_arch = "nvptx64"))]
    /// Folds a block of scores (`-inf` = masked) into the state and accumulator:
    /// `acc = acc * alpha + sum_t p_t * v_t`, where `v(t)` is value row `t`.
    #[cfg(not(target_arch = "nvptx64"))]
    #[inline(always)]
    pub fn update_block<'a, T: crate::Elem>(&mut self, scores: &[f32], acc: &mut [f32], v: impl Fn(usize) -> &'a [T]) {
        self.update_block_with(scores, acc, |t, p, acc| {
            for (a, x) in acc.iter_mut().zip(v(t)) {
                *a += p * x.to_f32();
            }
        })
    }

    /// [`Self::update_block`] with the accumulation `acc += p * v_t` left to `add_v(t, p, acc)`,
    /// for a caller that reads value rows its own way (the CPU backend's f16 cache, in SIMD).
    #[cfg(not(target_arch = "nvptx64"))]
    #[inline(always)]
    pub fn update_block_with(
        &mut self,
        scores: &[f32],
        acc: &mut [f32],
        mut add_v: impl FnMut(usize, f32, &mut [f32]),
    ) {
        let bmax = scores.iter().fold(f32::NEG_INFINITY, |a, &s| max(a, s));
        if bmax == f32::NEG_INFINITY {
            return; // every key masked: nothing changes
        }
        let m_new = max(self.m, bmax);
        let alpha = self.rescale(m_new);
        if alpha != 1.0 {
            acc.iter_mut().for_each(|a| *a *= alpha);
        }
        for (t, &s) in scores.iter().enumerate() {
            if s == f32::NEG_INFINITY {
                continue;
            }
            let p = exp(s - m_new);
            self.l += p;
            add_v(t, p, acc);
        }
    }
}

#[cfg(not(target_arch = "nvptx64"))]
impl SoftmaxState {
    /// Folds a block of scores (`-inf` = masked) into the state and turns them, in place, into
    /// the block's weights `exp(s - m)` (0 where masked). Returns the factor by which the
    /// caller must scale its accumulator before adding `Σ_t p_t v_t`, or `None` when every key
    /// is masked (nothing changed). The same step as [`Self::update_block_with`], split so a
    /// caller can run the weights and the value rows in SIMD; the exponential is
    /// [`crate::fmath::exp_poly`], which vectorizes over the block.
    #[inline(always)]
    pub fn fold_scores(&mut self, scores: &mut [f32]) -> Option<f32> {
        let bmax = scores.iter().fold(f32::NEG_INFINITY, |a, &s| max(a, s));
        if bmax == f32::NEG_INFINITY {
            return None;
        }
        let m_new = max(self.m, bmax);
        let alpha = self.rescale(m_new);
        for s in scores.iter_mut() {
            let p = crate::fmath::exp_poly(*s - m_new);
            *s = if *s == f32::NEG_INFINITY { 0.0 } else { p };
        }
        // A tree of sums the compiler can keep in vector registers.
        let mut part = [0f32; 8];
        for c in scores.chunks(8) {
            for (a, &p) in part.iter_mut().zip(c) {
                *a += p;
            }
        }
        self.l += ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
        Some(alpha)
    }
}

#[cfg(not(target_arch = "nvptx64"))]
/// Merges partial results `(state, acc)` of disjoint key ranges into `out = acc / l`,
/// rescaling each to the global max. Empty partials (`l == 0`) contribute nothing.
pub fn merge_partials<'a>(parts: impl Iterator<Item = (SoftmaxState, &'a [f32])> + Clone, out: &mut [f32]) {
    let m = parts.clone().fold(f32::NEG_INFINITY, |a, (s, _)| max(a, s.m));
    for o in out.iter_mut() {
        *o = 0.0;
    }
    if m == f32::NEG_INFINITY {
        return;
    }
    let mut l = 0.0;
    for (s, acc) in parts {
        if s.l == 0.0 {
            continue;
        }
        let w = exp(s.m - m);
        l += s.l * w;
        for (o, &a) in out.iter_mut().zip(acc) {
            *o += a * w;
        }
    }
    let inv = 1.0 / l;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    fn softmax_weighted(scores: &[f32], vals: &[f32]) -> f32 {
        let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        w.iter().zip(vals).map(|(w, v)| w * v).sum::<f32>() / w.iter().sum::<f32>()
    }

    #[test]
    fn blockwise_update_and_merge_equal_plain_softmax() {
        let scores: Vec<f32> = (0..37).map(|i| ((i * 7919) % 23) as f32 * 0.37 - 3.0).collect();
        let vals: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).sin()).collect();
        let want = softmax_weighted(&scores, &vals);
        // One pass in blocks of 5, with a fully masked block in the middle.
        let mut st = SoftmaxState::EMPTY;
        let mut acc = [0.0f32];
        for (b, chunk) in scores.chunks(5).enumerate() {
            st.update_block(chunk, &mut acc, |t| &vals[b * 5 + t..b * 5 + t + 1]);
            st.update_block::<f32>(&[f32::NEG_INFINITY; 3], &mut acc, |_| &[1e9]);
        }
        assert!((acc[0] / st.l - want).abs() < 1e-5);
        // Two disjoint partials merged, plus an empty one.
        let (mut s1, mut a1, mut s2, mut a2) = (SoftmaxState::EMPTY, [0.0f32], SoftmaxState::EMPTY, [0.0f32]);
        s1.update_block(&scores[..20], &mut a1, |t| &vals[t..t + 1]);
        s2.update_block(&scores[20..], &mut a2, |t| &vals[20 + t..21 + t]);
        let empty = [0.0f32];
        let mut out = [0.0f32];
        let parts = [(s1, &a1[..]), (SoftmaxState::EMPTY, &empty[..]), (s2, &a2[..])];
        merge_partials(parts.iter().copied(), &mut out);
        assert!((out[0] - want).abs() < 1e-5, "{} vs {want}", out[0]);
    }

    #[test]
    fn fold_scores_equals_update_block() {
        let scores: Vec<f32> = (0..48).map(|i| ((i * 7919) % 29) as f32 * 0.41 - 6.0).collect();
        let vals: Vec<f32> = (0..48).map(|i| (i as f32 * 0.23).cos()).collect();
        let (mut a, mut b) = (SoftmaxState::EMPTY, SoftmaxState::EMPTY);
        let (mut acc_a, mut acc_b) = ([0.0f32], [0.0f32]);
        for (k, chunk) in scores.chunks(16).enumerate() {
            let mut block = [0f32; 16];
            block.copy_from_slice(chunk);
            block[15 - k] = f32::NEG_INFINITY; // a masked key in each block
            a.update_block(&block, &mut acc_a, |t| &vals[k * 16 + t..k * 16 + t + 1]);
            let alpha = b.fold_scores(&mut block).expect("keys left");
            acc_b[0] *= alpha;
            assert_eq!(block[15 - k], 0.0, "a masked key weighs nothing");
            for (t, p) in block.iter().enumerate() {
                acc_b[0] += p * vals[k * 16 + t];
            }
        }
        assert_eq!(a.m, b.m);
        assert!((a.l - b.l).abs() <= 1e-6 * a.l, "{} vs {}", a.l, b.l);
        assert!((acc_a[0] / a.l - acc_b[0] / b.l).abs() < 1e-6);
        assert_eq!(b.fold_scores(&mut [f32::NEG_INFINITY; 4]), None);
    }

    #[test]
    fn exp_poly_is_close_to_exp() {
        let mut worst = 0f32;
        for i in 0..87_000 {
            let x = -(i as f32) * 1e-3;
            let (got, want) = (crate::fmath::exp_poly(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "relative error {worst}");
        assert!(crate::fmath::exp_poly(f32::NEG_INFINITY) < 1e-37);
    }
}
