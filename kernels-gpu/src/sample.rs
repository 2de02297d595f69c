//! Sampling on the device, defined once: the counter-based random numbers, the top-k and
//! top-p thresholds, and the exponential race that draws a token without sorting or prefix
//! sums. The `sample_f32` kernel runs this per row with block reductions; [`sample_row`] is
//! the same definition on the host, the reference the kernel is tested against.
//!
//! **Why not the CPU sampler's method.** The CPU draws one uniform number and walks the sorted
//! candidates (an inverse CDF). On a GPU a sort of a 128K vocabulary per row is the expensive
//! part. Here:
//! - *top-k*: the k-th largest logit is found by bisection over the bits of an order-preserving
//!   `u32` key ([`ord_key`]): 32 block-wide counts. Tokens tied with it are all kept (as vLLM's
//!   mask `logits < kth` does).
//! - *top-p*: the largest key whose tail mass (at the temperature, within top-k) still reaches
//!   `top_p` of the total, by the same bisection over sums: the smallest set of most likely
//!   tokens whose mass reaches `top_p`, as the CPU sampler's nucleus.
//! - *the draw*: each kept token gets `u_i`, a uniform number from `(seed, counter, token)`, and
//!   the token with the largest `logit_i / T - ln(-ln u_i)` wins (the Gumbel-max trick: that
//!   token is distributed as the softmax over the kept set). Each token's number depends on
//!   nothing else, so the result does not depend on the order of the reduction, and a
//!   request's seed and its output position fix its draw: the same on every run, alone or in
//!   any batch.
//!
//! Seeded streams are per device kind: the CPU sampler draws differently, so a seed gives
//! the same tokens run after run on one backend, not across backends. Greedy rows (and
//! `top_k == 1`) are the argmax on both, ties to the lower id.

use crate::fmath::{exp, ln};

/// Words of one row's parameters as the kernel reads them (see [`RowParams::to_words`]).
pub const PARAM_WORDS: usize = 6;

/// One row's sampling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowParams {
    /// `<= 0`: greedy.
    pub temperature: f32,
    /// 0: no cut.
    pub top_k: u32,
    /// `>= 1`: no cut.
    pub top_p: f32,
    pub seed: u64,
    /// The request's output position: each draw of a request gets fresh numbers.
    pub counter: u32,
}

impl RowParams {
    pub const GREEDY: RowParams = RowParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, counter: 0 };

    /// The kernel's layout: temperature bits, top_k, top_p bits, seed low, seed high, counter.
    pub fn to_words(&self) -> [u32; PARAM_WORDS] {
        [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.counter,
        ]
    }

    pub fn from_words(w: &[u32; PARAM_WORDS]) -> RowParams {
        RowParams {
            temperature: f32::from_bits(w[0]),
            top_k: w[1],
            top_p: f32::from_bits(w[2]),
            seed: w[3] as u64 | (w[4] as u64) << 32,
            counter: w[5],
        }
    }

    /// Whether the row is the argmax.
    #[inline(always)]
    pub fn greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0 || self.top_k == 1
    }
}

/// A `u32` that orders as the float does (`-inf` < ... < `-0` < `+0` < ... < `+inf`); NaN
/// is 0, below everything, so it is never kept.
#[inline(always)]
pub fn ord_key(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        0
    } else if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// SplitMix64's finalizer: a bijection of `u64` that mixes every bit.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits for element `index` of the stream `seed`. For a fixed seed, distinct
/// indices give distinct values (both steps are bijections).
#[inline(always)]
pub fn hash64(seed: u64, index: u64) -> u64 {
    mix64(mix64(seed.wrapping_add(0x9e37_79b9_7f4a_7c15)) ^ index)
}

/// Uniform in the open interval (0, 1), 24 bits, for token `token` of draw `counter`.
#[inline(always)]
pub fn uniform_open(seed: u64, counter: u32, token: u32) -> f32 {
    let h = hash64(seed, (counter as u64) << 32 | token as u64);
    ((h >> 40) as f32 + 0.5) * (1.0 / (1u32 << 24) as f32)
}

/// The race's score of a kept token: `(logit - max) / T` plus Gumbel noise `-ln(-ln u)`.
#[inline(always)]
pub fn race_score(logit: f32, max: f32, inv_t: f32, u: f32) -> f32 {
    (logit - max) * inv_t - ln(-ln(u))
}

/// The weight of a token at the temperature, relative to the row's max.
#[inline(always)]
pub fn weight(logit: f32, max: f32, inv_t: f32) -> f32 {
    exp((logit - max) * inv_t)
}

/// Value `index` of the dummy-weight stream `seed`: uniform in `[-scale, scale)`, 24 bits.
/// The CPU's dummy weights and the device's `fill_dummy_*` kernels both use it, so a seed
/// gives one model on both backends.
#[inline(always)]
pub fn dummy_value(seed: u64, index: u64, scale: f32) -> f32 {
    let u = (hash64(seed, index) >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
    (2.0 * u - 1.0) * scale
}

/// The bisection both thresholds use: the largest key `tau >= floor` with `ok(tau)`, for a
/// predicate that holds at `floor` and, once false, stays false for every larger key.
#[inline(always)]
pub fn bisect_key(floor: u32, mut ok: impl FnMut(u32) -> bool) -> u32 {
    let mut tau = 0u32;
    let mut bit = 1u32 << 31;
    while bit != 0 {
        let cand = tau | bit;
        if cand < floor || ok(cand) {
            tau = cand;
        }
        bit >>= 1;
    }
    tau.max(floor)
}

/// The top-p cut above the top-k one (`tau_k`): the largest key whose kept mass (`mass(c)`,
/// the softmax weight of the logits with key `>= c`) is at least `top_p` of the mass at
/// `tau_k`. `tau_k` itself when `top_p >= 1`. The host and the device share it; the device's
/// `mass` is a block reduction, so every thread must call this together.
#[inline(always)]
pub fn top_p_key(tau_k: u32, top_p: f32, mut mass: impl FnMut(u32) -> f32) -> u32 {
    if top_p < 1.0 {
        let target = top_p * mass(tau_k);
        bisect_key(tau_k, |c| mass(c) >= target)
    } else {
        tau_k
    }
}

/// A logits row's entry in a step's mask rows when the row has no token mask.
pub const NO_MASK: u32 = u32::MAX;

/// Whether a packed token mask allows token `i`, given the mask's word `i / 32` (structured
/// outputs: bit set, allowed; 32 tokens a word).
#[inline(always)]
pub fn mask_allows(word: u32, i: u32) -> bool {
    (word >> (i % 32)) & 1 == 1
}

/// The host definition of `mask_logits_f32`: `-inf` wherever `mask` does not allow a token
/// (ids past the mask's words too). Sampling then never picks one, and logprobs are of the
/// allowed tokens.
#[cfg(not(target_arch = "nvptx64"))]
pub fn mask_row(logits: &mut [f32], mask: &[u32]) {
    for (k, chunk) in logits.chunks_mut(32).enumerate() {
        let w = mask.get(k).copied().unwrap_or(0);
        if w == u32::MAX {
            continue;
        }
        for (b, x) in chunk.iter_mut().enumerate() {
            if !mask_allows(w, b as u32) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// The token (and its logprob under the raw logits) that the device draws for `logits` with
/// `p`: the reference definition the kernel is tested against. Sums are f32, as there.
#[cfg(not(target_arch = "nvptx64"))]
pub fn sample_row(logits: &[f32], p: &RowParams) -> (u32, f32) {
    use crate::ops::argmax_pick;
    let n = logits.len() as u32;
    let best =
        logits.iter().enumerate().fold((f32::NEG_INFINITY, u32::MAX), |b, (i, &x)| argmax_pick(b, (x, i as u32)));
    let m = best.0;
    let lse = m + ln(logits.iter().map(|&x| exp(x - m)).sum::<f32>());
    let tok = if p.greedy() {
        best.1
    } else {
        let keys: std::vec::Vec<u32> = logits.iter().map(|&x| ord_key(x)).collect();
        let tau_k = if p.top_k > 0 && p.top_k < n {
            bisect_key(0, |c| keys.iter().filter(|&&k| k >= c).count() as u32 >= p.top_k)
        } else {
            0
        };
        let inv_t = 1.0 / p.temperature;
        let mass = |c: u32| -> f32 {
            logits.iter().zip(&keys).filter(|(_, &k)| k >= c).map(|(&x, _)| weight(x, m, inv_t)).sum()
        };
        let tau = top_p_key(tau_k, p.top_p, mass);
        let mut win = (f32::NEG_INFINITY, u32::MAX);
        for (i, (&x, &k)) in logits.iter().zip(&keys).enumerate() {
            if k >= tau {
                let s = race_score(x, m, inv_t, uniform_open(p.seed, p.counter, i as u32));
                win = argmax_pick(win, (s, i as u32));
            }
        }
        win.1
    };
    // A row of NaNs has no winner: token 0.
    let tok = if tok >= n { 0 } else { tok };
    (tok, logits[tok as usize] - lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    fn row(n: usize, seed: u64, spread: f32) -> Vec<f32> {
        (0..n).map(|i| dummy_value(seed, i as u64, spread)).collect()
    }

    #[test]
    fn keys_order_as_the_floats() {
        let xs = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, f32::MAX, f32::INFINITY];
        for w in xs.windows(2) {
            assert!(ord_key(w[0]) <= ord_key(w[1]), "{} {}", w[0], w[1]);
            if w[0] < w[1] {
                assert!(ord_key(w[0]) < ord_key(w[1]));
            }
        }
        assert_eq!(ord_key(f32::NAN), 0);
        assert!(ord_key(f32::NEG_INFINITY) > 0);
    }

    #[test]
    fn bisection_finds_the_kth_largest_and_the_nucleus() {
        let logits = row(5000, 3, 4.0);
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let keys: Vec<u32> = logits.iter().map(|&x| ord_key(x)).collect();
        for k in [1u32, 2, 50, 4999] {
            let tau = bisect_key(0, |c| keys.iter().filter(|&&x| x >= c).count() as u32 >= k);
            assert_eq!(tau, ord_key(sorted[k as usize - 1]), "k = {k}");
        }
        // Nucleus: the smallest top set whose mass reaches p, from a sort.
        let m = sorted[0];
        let total: f32 = logits.iter().map(|&x| weight(x, m, 1.0)).sum();
        for top_p in [0.01f32, 0.3, 0.9] {
            let mut acc = 0.0;
            let j = sorted.iter().position(|&x| {
                acc += weight(x, m, 1.0);
                acc >= top_p * total
            });
            let want = ord_key(sorted[j.unwrap()]);
            let mass =
                |c: u32| -> f32 { logits.iter().filter(|&&x| ord_key(x) >= c).map(|&x| weight(x, m, 1.0)).sum() };
            let tau = bisect_key(0, |c| mass(c) >= top_p * total);
            // Sums in another order may put the boundary one token over.
            let kept = keys.iter().filter(|&&x| x >= tau).count() as i64;
            let want_kept = keys.iter().filter(|&&x| x >= want).count() as i64;
            assert!((kept - want_kept).abs() <= 1, "top_p {top_p}: kept {kept}, sort says {want_kept}");
        }
        // The floor holds.
        assert_eq!(bisect_key(ord_key(1.0), |_| false), ord_key(1.0));
    }

    #[test]
    fn greedy_is_the_argmax_and_logprob_the_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let (t, lp) = sample_row(&logits, &RowParams::GREEDY);
        assert_eq!(t, 1);
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((lp - (3.0 - z.ln())).abs() < 1e-6);
        let k1 = RowParams { temperature: 1.0, top_k: 1, ..RowParams::GREEDY };
        assert_eq!(sample_row(&logits, &k1).0, 1);
    }

    #[test]
    fn draws_follow_the_cut_softmax_and_repeat_by_seed() {
        let logits = [0.0f32, 2.0, 1.9, -1.0, 1.0];
        let p = |top_k, top_p, seed, counter| RowParams { temperature: 0.8, top_k, top_p, seed, counter };
        // Frequencies against the softmax at T = 0.8 over 20000 draws (counters 0..).
        let w: Vec<f64> = logits.iter().map(|&x| ((x as f64 - 2.0) / 0.8).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut seen = [0usize; 5];
        let n = 20000;
        for c in 0..n {
            seen[sample_row(&logits, &p(0, 1.0, 42, c)).0 as usize] += 1;
        }
        for i in 0..5 {
            let want = w[i] / z * n as f64;
            let sd = (want * (1.0 - w[i] / z)).sqrt();
            assert!((seen[i] as f64 - want).abs() < 5.0 * sd + 1.0, "token {i}: {} vs {want:.0}", seen[i]);
        }
        // top_k 2: tokens 1 and 2 only; top_p 0.3: the best alone.
        assert!((0..500).all(|c| matches!(sample_row(&logits, &p(2, 1.0, 1, c)).0, 1 | 2)));
        assert!((0..500).all(|c| sample_row(&logits, &p(0, 0.3, 1, c)).0 == 1));
        // top_k then top_p within it: 0.6 of {1, 2} needs both.
        let both: std::collections::BTreeSet<u32> = (0..500).map(|c| sample_row(&logits, &p(2, 0.6, 9, c)).0).collect();
        assert_eq!(both.into_iter().collect::<Vec<_>>(), [1, 2]);
        // One seed and counter: one token, whatever else ran; another seed: another stream.
        let a: Vec<u32> = (0..64).map(|c| sample_row(&logits, &p(0, 1.0, 7, c)).0).collect();
        let b: Vec<u32> = (0..64).map(|c| sample_row(&logits, &p(0, 1.0, 7, c)).0).collect();
        let other: Vec<u32> = (0..64).map(|c| sample_row(&logits, &p(0, 1.0, 8, c)).0).collect();
        assert_eq!(a, b);
        assert_ne!(a, other);
    }

    #[test]
    fn params_round_trip_through_words() {
        let p = RowParams { temperature: 0.7, top_k: 40, top_p: 0.95, seed: 0x1234_5678_9abc_def0, counter: 17 };
        assert_eq!(RowParams::from_words(&p.to_words()), p);
        assert!(RowParams::GREEDY.greedy());
        assert!(RowParams { temperature: f32::NAN, ..p }.greedy());
    }

    #[test]
    fn dummy_values_are_uniform_in_the_scale() {
        let v: Vec<f32> = (0..100_000).map(|i| dummy_value(5, i, 0.5)).collect();
        assert!(v.iter().all(|x| (-0.5..0.5).contains(x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01 && (var - 0.25 / 3.0).abs() < 0.003, "mean {mean} var {var}");
        assert_ne!(dummy_value(5, 0, 1.0), dummy_value(6, 0, 1.0));
    }
}
