//! Token sampling: greedy, temperature, top-k, top-p, with a per-request seeded generator so a
//! request's tokens do not depend on what else is in the batch.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// 1 = no nucleus cut.
    pub top_p: f32,
    pub seed: Option<u64>,
    /// Report each sampled token's logprob and this many top alternatives (None = no logprobs).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None, logprobs: None }
    }
}

/// The most alternatives a request may ask logprobs for (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(format!("logprobs must be at most {MAX_LOGPROBS}, got {n}"));
            }
        }
        Ok(())
    }
}

/// `token`'s log-probability in the softmax of `logits`, and the `top` most likely tokens with
/// theirs (highest first, ties by lower id). Computed in f64 so that it sums to one.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> crate::engine::TokenLogprobs {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    let lp = |i: u32| (logits[i as usize] as f64 - lse) as f32;
    let mut best: Vec<u32> = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let k = top.min(idx.len());
        idx.select_nth_unstable_by(k - 1, by_logit);
        idx.truncate(k);
        idx.sort_unstable_by(by_logit);
        best = idx;
    }
    crate::engine::TokenLogprobs { logprob: lp(token), top: best.into_iter().map(|i| (i, lp(i))).collect() }
}

/// SplitMix64: tiny, fast, and a fixed sequence for a fixed seed on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks a token from `logits` (modified in place).
pub fn sample(logits: &mut [f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature <= 0.0 || p.top_k == 1 {
        return weave_kernels_gpu::ops::argmax_row(logits);
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.select_nth_unstable_by(p.top_k - 1, by_logit);
        idx.truncate(p.top_k);
    }
    let inv_t = 1.0 / p.temperature as f64;
    let m = idx.iter().fold(f32::NEG_INFINITY, |a, &i| a.max(logits[i as usize])) as f64;
    let weight = |i: u32| ((logits[i as usize] as f64 - m) * inv_t).exp();
    let total: f64 = idx.iter().map(|&i| weight(i)).sum();
    // No nucleus: draw from the candidates in the order they are in; no sort needed.
    let keep = if p.top_p >= 1.0 {
        idx.len()
    } else {
        // The nucleus needs the candidates in order only until its mass is reached: sort a
        // prefix of the best 64, then 256, ... (a full sort of a 49152-token vocabulary was
        // 1.2 ms a row).
        let mut k = 64.min(idx.len());
        loop {
            if k < idx.len() {
                idx.select_nth_unstable_by(k - 1, by_logit);
            }
            idx[..k].sort_unstable_by(by_logit);
            let mut acc = 0.0;
            let found = idx[..k].iter().position(|&i| {
                acc += weight(i) / total;
                acc >= p.top_p as f64
            });
            match found {
                Some(j) => break j + 1,
                None if k == idx.len() => break k,
                None => k = (k * 4).min(idx.len()),
            }
        }
    };
    let kept = &idx[..keep];
    // Nothing cut: the kept mass is the total, summed in the same order.
    let mass: f64 = if keep == idx.len() { total } else { kept.iter().map(|&i| weight(i)).sum() };
    let mut u = rng.uniform() * mass;
    for &i in kept {
        let q = weight(i);
        if u < q {
            return i;
        }
        u -= q;
    }
    kept[keep - 1]
}

/// One request's sampling state: its parameters, its seed, the host's random stream, and how
/// many tokens it has drawn (the device's counter).
#[derive(Debug, Clone)]
struct RequestSampler {
    params: SamplingParams,
    seed: u64,
    rng: Rng,
    draws: u32,
}

/// Each request's sampling parameters and random stream, as a backend keeps them, and the
/// sampling of a step's rows on the host.
#[derive(Debug, Default)]
pub struct Samplers {
    by_request: std::collections::HashMap<u64, RequestSampler>,
    /// Seed for requests that bring none (mixed with the request's id).
    base_seed: u64,
}

impl Samplers {
    pub fn new(base_seed: u64) -> Samplers {
        Samplers { by_request: Default::default(), base_seed }
    }

    pub fn add(&mut self, id: u64, params: &SamplingParams) {
        let seed = params.seed.unwrap_or(self.base_seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.by_request.insert(id, RequestSampler { params: params.clone(), seed, rng: Rng::new(seed), draws: 0 });
    }

    pub fn remove(&mut self, id: u64) {
        self.by_request.remove(&id);
    }

    fn get(&mut self, id: u64) -> &mut RequestSampler {
        self.by_request.entry(id).or_insert_with(|| RequestSampler {
            params: SamplingParams::default(),
            seed: 0,
            rng: Rng::new(0),
            draws: 0,
        })
    }

    /// Whether every one of `ids` samples greedily and wants no logprobs (a device can then
    /// send back only the argmax).
    pub fn all_greedy(&self, ids: &[u64]) -> bool {
        ids.iter().all(|id| {
            self.by_request
                .get(id)
                .is_none_or(|r| (r.params.temperature <= 0.0 || r.params.top_k == 1) && r.params.logprobs.is_none())
        })
    }

    /// The logprobs `id` asked for: `Some(top)` alternatives, or `None`.
    pub fn logprobs_of(&self, id: u64) -> Option<usize> {
        self.by_request.get(&id).and_then(|r| r.params.logprobs)
    }

    /// Whether `id`'s rows are sampled on the host even by a device that samples: it wants top
    /// alternatives, which the device does not compute. A request's rows always take one path,
    /// so its draws do not depend on what else is in the batch.
    pub fn needs_host(&self, id: u64) -> bool {
        self.logprobs_of(id).is_some_and(|top| top > 0)
    }

    /// The device sampler's parameters for `id`'s next draw (`weave_kernels_gpu::sample`);
    /// advances its counter.
    pub fn device_row(&mut self, id: u64) -> weave_kernels_gpu::sample::RowParams {
        let r = self.get(id);
        let p = weave_kernels_gpu::sample::RowParams {
            temperature: r.params.temperature,
            top_k: r.params.top_k.min(u32::MAX as usize) as u32,
            top_p: r.params.top_p,
            seed: r.seed,
            counter: r.draws,
        };
        r.draws = r.draws.wrapping_add(1);
        p
    }

    /// One token for each row of `logits` (`[ids.len()][vocab]`, rows in `ids`' order), with
    /// each row's logprobs where its request asked (empty when none did). Rows may be changed.
    pub fn sample_rows(
        &mut self,
        logits: &mut [f32],
        vocab: usize,
        ids: &[u64],
    ) -> (Vec<u32>, Vec<Option<crate::engine::TokenLogprobs>>) {
        let mut sampled = Vec::with_capacity(ids.len());
        let mut lps = Vec::new();
        for (i, (row, &id)) in logits.chunks_mut(vocab).zip(ids).enumerate() {
            let r = self.get(id);
            // Logprobs are of the raw logits: taken before sampling may touch the row.
            let raw = r.params.logprobs.map(|top| (top, row.to_vec()));
            let tok = sample(row, &r.params, &mut r.rng);
            r.draws = r.draws.wrapping_add(1);
            if let Some((top, raw)) = raw {
                lps.resize(i, None);
                lps.push(Some(logprobs(&raw, tok, top)));
            }
            sampled.push(tok);
        }
        if !lps.is_empty() {
            lps.resize(sampled.len(), None);
        }
        (sampled, lps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nucleus from a full sort, as written from the definition.
    fn nucleus_by_full_sort(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let w = |i: u32| ((logits[i as usize] as f64 - m) / p.temperature as f64).exp();
        let total: f64 = idx.iter().map(|&i| w(i)).sum();
        idx.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b)));
        let mut acc = 0.0;
        let keep = idx.iter().position(|&i| {
            acc += w(i) / total;
            acc >= p.top_p as f64
        });
        let kept = &idx[..keep.map_or(idx.len(), |j| j + 1)];
        let mut u = rng.uniform() * kept.iter().map(|&i| w(i)).sum::<f64>();
        for &i in kept {
            if u < w(i) {
                return i;
            }
            u -= w(i);
        }
        *kept.last().unwrap()
    }

    #[test]
    fn nucleus_from_a_sorted_prefix_equals_a_full_sort() {
        // A vocabulary-sized row whose nucleus needs more than the first 64 candidates.
        let mut s = 12345u64;
        let logits: Vec<f32> = (0..49152)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0
            })
            .collect();
        for top_p in [0.05, 0.5, 0.9, 0.999] {
            let p = SamplingParams { temperature: 0.7, top_p, ..Default::default() };
            for seed in 0..20 {
                let (mut a, mut b) = (Rng::new(seed), Rng::new(seed));
                assert_eq!(
                    sample(&mut logits.clone(), &p, &mut a),
                    nucleus_by_full_sort(&logits, &p, &mut b),
                    "top_p {top_p} seed {seed}"
                );
            }
        }
    }

    #[test]
    fn greedy_topk_topp_and_seeds() {
        let logits = vec![0.0f32, 3.0, 2.9, -1.0, 1.0];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&mut logits.clone(), &SamplingParams::default(), &mut rng), 1);
        // top_k 2: only tokens 1 and 2 can appear.
        let p = SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() };
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[sample(&mut logits.clone(), &p, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3] + seen[4], 0);
        assert!(seen[1] > 800 && seen[2] > 700, "{seen:?}");
        // top_p 0.3: the nucleus is the top token alone.
        let p = SamplingParams { temperature: 1.0, top_p: 0.3, ..Default::default() };
        assert!((0..200).all(|_| sample(&mut logits.clone(), &p, &mut rng) == 1));
        // Same seed, same tokens.
        let p = SamplingParams { temperature: 1.5, ..Default::default() };
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..50).map(|_| sample(&mut logits.clone(), &p, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { logprobs: Some(21), ..Default::default() }.validate().is_err());
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let l = logprobs(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        assert!((l.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6, "{l:?}");
        // Highest first, the tie broken by the lower id.
        assert_eq!(l.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f64 =
            logits.iter().enumerate().map(|(i, _)| (logprobs(&logits, i as u32, 0).logprob as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
    }
}
