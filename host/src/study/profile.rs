//! Step-time profiling of a real backend: designed batches are timed directly, the way Vidur
//! profiles operators, and the simulator gets a cost model that was *measured* rather than
//! regressed on whatever steps one workload happened to produce (see [`crate::study::sim::fit`]:
//! there, tokens and attention pairs rise together and the fit cannot tell them apart).
//!
//! The design varies one thing at a time:
//! - **base**: `n` one-token rows (context 0, one sampled row): the linear layers, norms, KV
//!   write and per-row work at `n` tokens, with next to no attention;
//! - **sampled**: the same with every row sampled: the LM head and sampling on top;
//! - **attention**: fixed row counts over growing cached contexts, so only the query-key pairs
//!   change; the slope is the cost of one pair.
//!
//! Every point is timed `repeats` times in round-robin order (a machine that slows down for a
//! while slows all points alike) and the median is kept. Cheap *base* points are timed
//! [`CHEAP_REPEATS`] times back to back within each round, and the round keeps their median:
//! one sample of a 100 ms step carries a noise that a median of five rounds does not remove,
//! and the decode-heavy workloads are priced from exactly those points. Points over cached
//! context are not: timed back to back, a step finds its KV blocks still in cache from the
//! step before, which no real step does (repeating them made decode attention look 10-15%
//! cheaper, and put two held-out workloads 17% and 27% under).

use crate::study::sim::{attention_pairs, CostModel};
use serde::{Deserialize, Serialize};
use weave_scheduler::{ScheduledBatch, SeqMeta};

/// One sequence of a synthetic batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthSeq {
    /// Query tokens this step.
    pub query: usize,
    /// Tokens already cached.
    pub context: usize,
    pub samples: bool,
}

/// A well-formed [`ScheduledBatch`] of `seqs`, each on its own blocks (numbered from 1, after
/// the null block); the input token at position `p` is `token + p % 1024`, so a sequence
/// built up over several batches reads the same text. Needs [`blocks_needed`] blocks plus the
/// null one.
pub fn synthetic_batch(seqs: &[SynthSeq], block_size: usize, token: u32) -> ScheduledBatch {
    let mut b = ScheduledBatch { block_size, ..Default::default() };
    let max_blocks = seqs.iter().map(|s| (s.context + s.query).div_ceil(block_size)).max().unwrap_or(0);
    b.max_blocks_per_seq = max_blocks;
    b.query_start_loc.push(0);
    let mut next_block = 1u32;
    for (i, s) in seqs.iter().enumerate() {
        let len = s.context + s.query;
        let nb = len.div_ceil(block_size);
        let row: Vec<u32> = (0..nb as u32).map(|j| next_block + j).collect();
        next_block += nb as u32;
        b.block_tables.extend(&row);
        b.block_tables.extend(std::iter::repeat_n(0, max_blocks - nb));
        for pos in s.context..len {
            b.input_ids.push(token + (pos % 1024) as u32);
            b.positions.push(pos as u32);
            b.slot_mapping.push(row[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
        }
        b.query_start_loc.push(b.input_ids.len() as u32);
        b.seq_lens.push(len as u32);
        b.context_lens.push(s.context as u32);
        if s.samples {
            b.logits_indices.push(b.input_ids.len() as u32 - 1);
        }
        // A one-token sampling row is a decode; anything else is (part of) a prefill.
        let is_prefill = s.query > 1 || !s.samples;
        if is_prefill {
            b.num_prefill_tokens += s.query;
            b.num_prefill_seqs += 1;
            b.num_partial_prefills += usize::from(!s.samples);
        } else {
            b.num_decode_tokens += s.query;
        }
        b.seqs.push(SeqMeta {
            request_id: i as u64,
            num_query_tokens: s.query as u32,
            context_len: s.context as u32,
            is_prefill,
            samples: s.samples,
        });
        b.max_query_len = b.max_query_len.max(s.query as u32);
        b.max_seq_len = b.max_seq_len.max(len as u32);
    }
    b
}

/// KV blocks (null block excluded) that [`synthetic_batch`] uses for `seqs`.
pub fn blocks_needed(seqs: &[SynthSeq], block_size: usize) -> usize {
    seqs.iter().map(|s| (s.context + s.query).div_ceil(block_size)).sum()
}

/// The step-time model a profile measures: `base(tokens) + sampled_extra(sampled) +
/// attention`, where a decode row's attention costs `decode_pair_s` per key and a prefill
/// chunk's is the sum over its rows of a row-cost curve of the keys each sees. Tables are
/// interpolated piecewise-linearly between measured points (extrapolated along the last
/// segment), so no shape (knee, roofline) is assumed for them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profiled {
    /// What was profiled (backend, model, threads), for the reader.
    pub backend: String,
    /// Token counts measured, ascending.
    pub tokens: Vec<f64>,
    /// Step time at `tokens[i]` rows with one sampled row and no attention (seconds).
    pub base_s: Vec<f64>,
    /// Sampled-row counts measured, ascending, starting at 1.
    pub sampled: Vec<f64>,
    /// Extra step time of sampling `sampled[i]` rows rather than one (seconds).
    pub sampled_extra_s: Vec<f64>,
    /// Prefill attention: `prefill_row_s[i]` is the time of one prefill query row attending
    /// to `prefill_keys[i]` keys (all layers and heads), through (0, 0). A chunk's rows share
    /// their sequence's keys and values, which stay in cache while the span is short: the
    /// per-key cost grows with the span, so this is a measured curve, not a constant.
    pub prefill_keys: Vec<f64>,
    pub prefill_row_s: Vec<f64>,
    /// Seconds per query-key pair of a decode row (one query row per sequence, so every
    /// row reads its own keys and values), with every thread busy.
    #[serde(default)]
    pub decode_pair_s: f64,
    /// The same for one decode row alone on one thread, the others idle (measured apart: a
    /// lone thread has the memory bandwidth to itself, and on a 2-core AVX2 machine ran a
    /// third faster per pair). 0 in profiles made before it was measured: then
    /// `decode_pair_s`.
    #[serde(default)]
    pub decode_pair_alone_s: f64,
    /// Threads the attention was spread over. The CPU backend gives each token row to one
    /// thread, so a step of fewer rows than threads runs its attention on fewer cores.
    #[serde(default = "one")]
    pub threads: usize,
}

fn one() -> usize {
    1
}

/// Piecewise-linear `y(x)` through the points `(xs, ys)` (ascending `xs`), clamped below the
/// first point and extended along the last segment past the end.
pub fn interpolate(xs: &[f64], ys: &[f64], x: f64) -> f64 {
    match xs.len() {
        0 => 0.0,
        1 => ys[0],
        n => {
            if x <= xs[0] {
                return ys[0];
            }
            let i = xs.partition_point(|&v| v < x).clamp(1, n - 1);
            let (x0, x1, y0, y1) = (xs[i - 1], xs[i], ys[i - 1], ys[i]);
            y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        }
    }
}

/// `∫ y(x) dx` over `[a, b]` for the piecewise-linear `y` of [`interpolate`] (0 unless
/// `b > a`).
pub fn integral(xs: &[f64], ys: &[f64], a: f64, b: f64) -> f64 {
    if b <= a {
        return 0.0;
    }
    // Trapezoids between the breakpoints inside (a, b): exact, y being linear between them.
    let trapezoid = |x0: f64, x1: f64| (x1 - x0) * (interpolate(xs, ys, x0) + interpolate(xs, ys, x1)) / 2.0;
    let mut total = 0.0;
    let mut x0 = a;
    for &x in xs.iter().filter(|&&x| x > a && x < b) {
        total += trapezoid(x0, x);
        x0 = x;
    }
    total + trapezoid(x0, b)
}

impl Profiled {
    /// Attention time of one sequence with `q` query rows over `c` cached tokens, all
    /// threads busy.
    pub fn attention(&self, q: f64, c: f64) -> f64 {
        self.attention_busy(q, c, self.threads as f64)
    }

    /// Seconds per decode pair with `busy` threads at work: from one row alone to all
    /// threads busy, linearly in between.
    pub fn decode_slope(&self, busy: f64) -> f64 {
        let alone = if self.decode_pair_alone_s > 0.0 { self.decode_pair_alone_s } else { self.decode_pair_s };
        let t = self.threads as f64;
        if t <= 1.0 {
            return self.decode_pair_s;
        }
        let f = ((busy - 1.0) / (t - 1.0)).clamp(0.0, 1.0);
        alone + (self.decode_pair_s - alone) * f
    }

    fn attention_busy(&self, q: f64, c: f64, busy: f64) -> f64 {
        if q <= 1.0 {
            return self.decode_slope(busy) * attention_pairs(q, c);
        }
        // Row r (1..=q) sees c + r keys: the sum of the row curve over them, as the integral
        // of the piecewise-linear curve over [c + 1/2, c + q + 1/2] (exact on each piece).
        integral(&self.prefill_keys, &self.prefill_row_s, c + 0.5, c + q + 0.5)
    }
}

impl CostModel for Profiled {
    fn time(&self, tokens: f64, sampled: f64, seqs: impl Iterator<Item = (f64, f64)>) -> f64 {
        let busy = (self.threads as f64).min(tokens.max(1.0));
        let spread = busy / self.threads as f64;
        let attn: f64 = seqs.map(|(q, c)| self.attention_busy(q, c, busy)).sum();
        let t = interpolate(&self.tokens, &self.base_s, tokens)
            + interpolate(&self.sampled, &self.sampled_extra_s, sampled.max(1.0))
            + attn / spread;
        t.max(0.0)
    }
}

/// A cost model read from `weave calibrate`'s JSON: profiled, or fitted to step logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MeasuredCost {
    Profiled(Profiled),
    Fitted(crate::study::sim::Fitted),
}

impl CostModel for MeasuredCost {
    fn time(&self, tokens: f64, sampled: f64, seqs: impl Iterator<Item = (f64, f64)>) -> f64 {
        match self {
            MeasuredCost::Profiled(p) => p.time(tokens, sampled, seqs),
            MeasuredCost::Fitted(f) => f.time(tokens, sampled, seqs),
        }
    }
}

/// A few lines on a profile for people: what it measured and how well the model fits it.
pub fn describe(m: &Profiled, r: &ProfileReport) -> String {
    let at = |n: f64| interpolate(&m.tokens, &m.base_s, n) * 1e3;
    let last = *m.tokens.last().unwrap_or(&1.0);
    let worst = r
        .points
        .iter()
        .max_by(|a, b| a.error().abs().total_cmp(&b.error().abs()))
        .map(|p| {
            format!(
                "{} rows in {} seqs, {} sampled, context {}: {:.1} ms measured, {:.1} predicted",
                p.rows,
                p.seqs,
                p.sampled,
                p.context,
                p.measured_s * 1e3,
                p.predicted_s * 1e3
            )
        })
        .unwrap_or_default();
    format!(
        "profiled {} ({} points, {} timed {CHEAP_REPEATS} times a round): step base {:.1} ms at 1 token, {:.1} ms at 32, {:.1} ms at {last}; \
         sampling {} rows adds {:.1} ms; decode attention {:.2} us per query-key pair \
         with every thread busy, {:.2} for one row alone; prefill attention per key and row {} us along spans {} keys; \
         model error on the points: median {:.1}%, max {:.1}% ({}){}",
        m.backend,
        r.points.len(),
        r.cheap_points,
        at(1.0),
        at(32.0),
        at(last),
        m.sampled.last().unwrap_or(&1.0),
        m.sampled_extra_s.last().unwrap_or(&0.0) * 1e3,
        m.decode_pair_s * 1e6,
        m.decode_slope(1.0) * 1e6,
        r.prefill_key_s.iter().map(|x| format!("{:.2}", x * 1e6)).collect::<Vec<_>>().join("/"),
        m.prefill_keys.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join("/"),
        r.median_abs_error * 100.0,
        r.max_abs_error * 100.0,
        worst,
        if r.round_speeds.len() > 1 {
            format!(
                "; rounds against the typical one: {} (kept: {:?})",
                r.round_speeds.iter().map(|s| format!("{:+.1}%", s * 100.0)).collect::<Vec<_>>().join(" "),
                r.kept_rounds
            )
        } else {
            String::new()
        }
    )
}

/// The closest non-decreasing sequence to `ys` in least squares (pool adjacent violators).
pub fn monotone(ys: &mut [f64]) {
    // Blocks of pooled values: (mean, count).
    let mut blocks: Vec<(f64, usize)> = Vec::with_capacity(ys.len());
    for &y in ys.iter() {
        blocks.push((y, 1));
        while blocks.len() > 1 && blocks[blocks.len() - 2].0 > blocks[blocks.len() - 1].0 {
            let (m2, n2) = blocks.pop().expect("two blocks");
            let (m1, n1) = blocks.pop().expect("two blocks");
            blocks.push(((m1 * n1 as f64 + m2 * n2 as f64) / (n1 + n2) as f64, n1 + n2));
        }
    }
    let mut i = 0;
    for (m, n) in blocks {
        ys[i..i + n].fill(m);
        i += n;
    }
}

/// What to profile.
#[derive(Debug, Clone, Copy)]
pub struct ProfileSpec {
    /// Largest step (tokens) to measure: the largest token budget to be simulated.
    pub max_tokens: usize,
    /// Largest number of sampled rows: the largest `max_num_seqs` to be simulated.
    pub max_seqs: usize,
    /// Longest cached context in the attention points.
    pub max_context: usize,
    pub block_size: usize,
    pub repeats: usize,
    pub threads: usize,
}

impl ProfileSpec {
    /// Token counts measured: dense where the cost bends (small steps), sparse above.
    pub fn token_grid(&self) -> Vec<usize> {
        grid(self.max_tokens)
    }
    pub fn sampled_grid(&self) -> Vec<usize> {
        grid(self.max_seqs)
    }
    /// Attention families, each a shape at growing cached contexts (the first at context 0)
    /// so that only the query-key pairs change: one decode row, a decode batch, a prefill
    /// chunk.
    fn attention_families(&self) -> [Vec<Vec<SynthSeq>>; 3] {
        let decode_rows = self.max_seqs.clamp(1, 16);
        let chunk = self.max_tokens.clamp(1, 128);
        let ctx = |k: usize| self.max_context * k / 8;
        // Prefill's per-key cost changes fastest at short spans: denser there.
        let prefill = [0, 1, 2, 4, 6, 8];
        [
            (0..=4).map(|k| vec![SynthSeq { query: 1, context: ctx(2 * k), samples: true }]).collect(),
            (0..=4).map(|k| vec![SynthSeq { query: 1, context: ctx(2 * k), samples: true }; decode_rows]).collect(),
            prefill.iter().map(|&k| vec![SynthSeq { query: chunk, context: ctx(k), samples: true }]).collect(),
        ]
    }
    /// Every batch a round times, in order: the base points, then pairs timed back to back
    /// whose difference is wanted (so that the machine's drift cancels in it): for each
    /// sampled count past one, its base shape then the all-sampled one; for each attention
    /// family and context past zero, the family's context-0 shape then that context's. The
    /// prefill pairs are timed [`PREFILL_PAIR_REPEATS`] times a round: their differences are
    /// a small part of large steps, and the whole prefill curve rests on them.
    pub fn designs(&self) -> Vec<Vec<SynthSeq>> {
        let mut d: Vec<Vec<SynthSeq>> = self.token_grid().into_iter().map(base_design).collect();
        for &n in &self.sampled_grid()[1..] {
            d.push(base_design(n));
            d.push(sampled_design(n));
        }
        let fams = self.attention_families();
        for (f, fam) in fams.iter().enumerate() {
            let k = if f == 2 { PREFILL_PAIR_REPEATS } else { 1 };
            for shape in &fam[1..] {
                for _ in 0..k {
                    d.push(fam[0].clone());
                    d.push(shape.clone());
                }
            }
        }
        // The prefill chunk's own (causal) attention: its rows at context 0 against as many
        // one-token rows.
        let chunk = &fams[2][0];
        for _ in 0..PREFILL_PAIR_REPEATS {
            d.push(base_design(chunk[0].query));
            d.push(chunk.clone());
        }
        d
    }

    /// KV blocks the profile needs (null block included).
    pub fn num_blocks(&self) -> usize {
        let mut designs = vec![base_design(self.max_tokens), sampled_design(self.max_seqs)];
        designs.extend(self.attention_families().into_iter().flatten());
        designs.iter().map(|d| blocks_needed(d, self.block_size)).max().unwrap_or(0) + 1
    }
}

/// Times each prefill pair is timed per round (see [`ProfileSpec::designs`]).
pub const PREFILL_PAIR_REPEATS: usize = 3;

/// Times a cheap base point is timed back to back within one round (the round keeps the
/// median).
pub const CHEAP_REPEATS: usize = 5;
/// A point is cheap when its warm-up took under this fraction of the slowest point's: repeating
/// every such point adds a few percent to a round, whose time goes on the largest steps.
pub const CHEAP_FRACTION: f64 = 1.0 / 16.0;

fn grid(max: usize) -> Vec<usize> {
    let mut g: Vec<usize> = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
        .into_iter()
        .filter(|&x| x < max)
        .collect();
    let mut x = 3072;
    while x < max {
        g.push(x);
        x *= 2;
    }
    g.push(max.max(1));
    g
}

/// `n` one-token rows with context 0, the last one sampled.
fn base_design(n: usize) -> Vec<SynthSeq> {
    (0..n).map(|i| SynthSeq { query: 1, context: 0, samples: i + 1 == n }).collect()
}

/// `n` one-token rows with context 0, all sampled.
fn sampled_design(n: usize) -> Vec<SynthSeq> {
    vec![SynthSeq { query: 1, context: 0, samples: true }; n]
}

/// A profile in progress: the designed batches, and their timings so far. Rounds time every
/// batch once; they can be spread out in time (e.g. between the real runs a profile is meant
/// to predict), so that the medians see the machine as those runs did.
#[derive(Debug)]
pub struct Profiler {
    spec: ProfileSpec,
    designs: Vec<Vec<SynthSeq>>,
    batches: Vec<ScheduledBatch>,
    samples: Vec<Vec<f64>>,
    /// Timings per round of each point: [`CHEAP_REPEATS`] for the cheap ones, set by the
    /// warm-up pass (empty before it).
    inner: Vec<usize>,
}

impl Profiler {
    pub fn new(spec: &ProfileSpec) -> anyhow::Result<Profiler> {
        anyhow::ensure!(spec.max_tokens >= 1 && spec.max_seqs >= 1, "profile needs at least one token and sequence");
        // The prefill curve's points sit at eighths of it: they must be distinct.
        anyhow::ensure!(spec.max_context >= 8, "profile: max context {} is under 8 tokens", spec.max_context);
        anyhow::ensure!(spec.block_size >= 1, "profile: block size must be at least 1");
        let designs = spec.designs();
        let batches = designs.iter().map(|d| synthetic_batch(d, spec.block_size, 1000)).collect::<Vec<_>>();
        let samples = vec![Vec::new(); batches.len()];
        Ok(Profiler { spec: *spec, designs, batches, samples, inner: Vec::new() })
    }

    /// Batches timed per round.
    pub fn num_points(&self) -> usize {
        self.designs.len()
    }

    /// Times every batch once, the cheap ones [`CHEAP_REPEATS`] times (keeping their median).
    /// The first call also runs an untimed warm-up pass, whose times decide which are cheap.
    pub fn round(
        &mut self,
        time: &mut dyn FnMut(&ScheduledBatch) -> anyhow::Result<f64>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<()> {
        let n = self.batches.len();
        if self.inner.is_empty() {
            let warm = self.batches.iter().map(&mut *time).collect::<anyhow::Result<Vec<f64>>>()?;
            // The base points come first in `designs`; only they may repeat.
            let base = self.spec.token_grid().len();
            self.inner = cheap_repeats(&warm, base);
        }
        for (i, (b, s)) in self.batches.iter().zip(&mut self.samples).enumerate() {
            let t = (0..self.inner[i]).map(|_| time(b)).collect::<anyhow::Result<Vec<f64>>>()?;
            s.push(crate::study::bench::median(&t));
            progress(i + 1, n);
        }
        Ok(())
    }

    /// Points timed [`CHEAP_REPEATS`] times a round (0 before the first round).
    pub fn num_cheap(&self) -> usize {
        self.inner.iter().filter(|&&k| k > 1).count()
    }

    /// Rounds timed so far.
    pub fn num_rounds(&self) -> usize {
        self.samples[0].len()
    }

    /// How round `b` compares with round `a`: the median over points of the ratio, less one
    /// (0 for the same round). The machine's drift between the two.
    pub fn drift_between(&self, a: usize, b: usize) -> f64 {
        if a == b || a.max(b) >= self.num_rounds() {
            return 0.0;
        }
        crate::study::bench::median(&self.samples.iter().map(|s| s[b] / s[a] - 1.0).collect::<Vec<_>>())
    }

    /// Each round's speed against the typical round: the median over points of its time over
    /// the point's median across rounds, less one (+0.10: that round ran 10% slower).
    pub fn round_speeds(&self) -> Vec<f64> {
        let med: Vec<f64> = self.samples.iter().map(|s| crate::study::bench::median(s)).collect();
        (0..self.num_rounds())
            .map(|r| {
                crate::study::bench::median(
                    &self.samples.iter().zip(&med).map(|(s, m)| s[r] / m - 1.0).collect::<Vec<_>>(),
                )
            })
            .collect()
    }

    /// How far the rounds spread: the largest [`Self::round_speeds`] less the smallest.
    pub fn spread(&self) -> f64 {
        self.spread_of(&(0..self.num_rounds()).collect::<Vec<_>>())
    }

    /// [`Self::spread`] over some rounds only.
    pub fn spread_of(&self, rounds: &[usize]) -> f64 {
        let s = self.round_speeds();
        let picked = rounds.iter().map(|&r| s[r]);
        picked.clone().fold(f64::MIN, f64::max) - picked.fold(f64::MAX, f64::min)
    }

    /// The `k` rounds whose speeds lie closest together (all rounds if fewer), in order.
    pub fn steadiest(&self, k: usize) -> Vec<usize> {
        let s = self.round_speeds();
        let mut by_speed: Vec<usize> = (0..s.len()).collect();
        by_speed.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
        let k = k.min(s.len());
        let best = (0..=s.len() - k).min_by(|&i, &j| {
            let w = |i: usize| s[by_speed[i + k - 1]] - s[by_speed[i]];
            w(i).total_cmp(&w(j))
        });
        let mut kept = by_speed[best.unwrap_or(0)..best.unwrap_or(0) + k].to_vec();
        kept.sort();
        kept
    }

    /// The model from the medians of the rounds so far.
    pub fn finish(&self, backend: String) -> anyhow::Result<(Profiled, ProfileReport)> {
        self.finish_rounds(&(0..self.num_rounds()).collect::<Vec<_>>(), backend)
    }

    /// The model from the medians of the given rounds.
    pub fn finish_rounds(&self, rounds: &[usize], backend: String) -> anyhow::Result<(Profiled, ProfileReport)> {
        anyhow::ensure!(!rounds.is_empty(), "profile needs at least one round");
        anyhow::ensure!(
            rounds.iter().all(|&r| r < self.num_rounds()),
            "profile: rounds {rounds:?} asked for, {} timed",
            self.num_rounds()
        );
        let samples: Vec<Vec<f64>> = self.samples.iter().map(|s| rounds.iter().map(|&r| s[r]).collect()).collect();
        let (model, mut report) = fit_profile(&self.spec, &self.designs, &samples, backend)?;
        report.cheap_points = self.num_cheap();
        Ok((model, report))
    }
}

/// Timings per round for points whose warm-up took `warm`: [`CHEAP_REPEATS`] for those of
/// the first `base` (the base points, with no cached context) under [`CHEAP_FRACTION`] of the
/// slowest point, one for the rest.
fn cheap_repeats(warm: &[f64], base: usize) -> Vec<usize> {
    let slowest = warm.iter().copied().fold(0.0, f64::max);
    warm.iter()
        .enumerate()
        .map(|(i, &t)| if i < base && t < CHEAP_FRACTION * slowest { CHEAP_REPEATS } else { 1 })
        .collect()
}

/// A noisy machine: rounds that disagree by more than a limit, even after repeats.
#[derive(Debug, Clone, PartialEq)]
pub struct TooNoisy {
    pub spread: f64,
    pub limit: f64,
    pub speeds: Vec<f64>,
}

impl std::fmt::Display for TooNoisy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the machine is too noisy to profile: its rounds ran {:.0}% apart (limit {:.0}%; each round against the \
             typical one: {}). Something else is using this machine's cores or memory bandwidth; profile when it is \
             quiet, or raise --max-spread",
            self.spread * 100.0,
            self.limit * 100.0,
            self.speeds.iter().map(|s| format!("{:+.0}%", s * 100.0)).collect::<Vec<_>>().join(", ")
        )
    }
}

impl std::error::Error for TooNoisy {}

/// Profiles a backend through `time`, which runs one batch and returns its seconds:
/// `spec.repeats` rounds back to back.
pub fn profile(
    spec: &ProfileSpec,
    backend: String,
    time: &mut dyn FnMut(&ScheduledBatch) -> anyhow::Result<f64>,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<(Profiled, ProfileReport)> {
    profile_steady(spec, f64::INFINITY, backend, time, progress)
}

/// [`profile`] on a machine whose speed may wander: while the rounds spread by more than
/// `max_spread` (see [`Profiler::spread`]), up to `spec.repeats` more rounds are timed and the
/// most agreeing `spec.repeats` of them kept; if they still spread too far, [`TooNoisy`].
pub fn profile_steady(
    spec: &ProfileSpec,
    max_spread: f64,
    backend: String,
    time: &mut dyn FnMut(&ScheduledBatch) -> anyhow::Result<f64>,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<(Profiled, ProfileReport)> {
    anyhow::ensure!(spec.repeats >= 1, "profile needs at least one repeat");
    let mut p = Profiler::new(spec)?;
    let n = p.num_points();
    let most = 2 * spec.repeats;
    loop {
        let r = p.num_rounds();
        let total = if r < spec.repeats { spec.repeats } else { r + 1 };
        p.round(time, &mut |i, _| progress(r * n + i, total * n))?;
        if p.num_rounds() < spec.repeats {
            continue;
        }
        let kept = p.steadiest(spec.repeats);
        let spread = p.spread_of(&kept);
        if spread <= max_spread {
            let (m, mut report) = p.finish_rounds(&kept, backend)?;
            report.round_speeds = p.round_speeds();
            report.kept_rounds = kept;
            return Ok((m, report));
        }
        if p.num_rounds() >= most {
            let speeds = p.round_speeds();
            return Err(TooNoisy { spread, limit: max_spread, speeds }.into());
        }
    }
}

/// The model from the timings (`samples[i]`: design `i`'s, one per round) of
/// [`ProfileSpec::designs`].
fn fit_profile(
    spec: &ProfileSpec,
    designs: &[Vec<SynthSeq>],
    samples: &[Vec<f64>],
    backend: String,
) -> anyhow::Result<(Profiled, ProfileReport)> {
    let tg = spec.token_grid();
    let sg = spec.sampled_grid();
    let families = spec.attention_families();
    let t: Vec<f64> = samples.iter().map(|s| crate::study::bench::median(s)).collect();
    // Median over rounds and `k` repeats of the pair at `i`, `i + 2`, ... of design `i + 1`'s
    // time less design `i`'s (pairs are timed back to back).
    let diffs = |i: usize, k: usize| {
        let d: Vec<f64> =
            (0..k).flat_map(|j| samples[i + 2 * j].iter().zip(&samples[i + 2 * j + 1]).map(|(a, b)| b - a)).collect();
        crate::study::bench::median(&d)
    };
    let diff = |i: usize| diffs(i, 1);
    let tokens: Vec<f64> = tg.iter().map(|&x| x as f64).collect();
    // The base points hold one pair per row; taken out once the pair cost is known.
    let base_raw = t[..tg.len()].to_vec();
    let mut at = tg.len();
    let sampled: Vec<f64> = sg.iter().map(|&x| x as f64).collect();
    let mut sampled_extra = vec![0.0];
    for _ in &sg[1..] {
        sampled_extra.push(diff(at));
        at += 2;
    }
    // More sampled rows never cost less, and never less than one.
    monotone(&mut sampled_extra);
    sampled_extra.iter_mut().for_each(|x| *x = x.max(0.0));
    // Decode attention: each context's time less the context-0 shape's (same rows, same
    // sampled rows) against the added pairs, counted as if spread over all threads; a
    // least-squares slope through the origin per family (one row alone, a batch of rows).
    let threads = spec.threads.max(1) as f64;
    let pairs =
        |shape: &[SynthSeq]| -> f64 { shape.iter().map(|s| attention_pairs(s.query as f64, s.context as f64)).sum() };
    let mut fam: [(f64, f64); 2] = [(0.0, 0.0); 2];
    for (f, shapes) in families[..2].iter().enumerate() {
        let rows: usize = shapes[0].iter().map(|s| s.query).sum();
        let spread = threads.min(rows as f64) / threads;
        for shape in &shapes[1..] {
            let (dx, dy) = ((pairs(shape) - pairs(&shapes[0])) / spread, diff(at));
            fam[f].0 += dx * dy;
            fam[f].1 += dx * dx;
            at += 2;
        }
    }
    let slope = |(xy, xx): (f64, f64)| if xx > 0.0 { xy / xx } else { 0.0 };
    // With one thread the two families measure the same thing: one slope through both.
    let (decode_pair_s, decode_pair_alone_s) = if spec.threads <= 1 {
        let s = slope((fam[0].0 + fam[1].0, fam[0].1 + fam[1].1)).max(0.0);
        (s, s)
    } else {
        (slope(fam[1]).max(0.0), slope(fam[0]).max(0.0))
    };
    // Prefill: a chunk of q rows over context c costs sum_r g(c + r), g the cost of one row
    // over its keys; with g near linear over a chunk's span, about q * g(c + q/2). The chunk
    // alone (context 0) gives g's short-span slope; each context then one point of g.
    let prefill = &families[2];
    let q = prefill[0][0].query as f64;
    let k = PREFILL_PAIR_REPEATS;
    let mut ctx_diffs = Vec::new();
    for _ in &prefill[1..] {
        ctx_diffs.push(diffs(at, k));
        at += 2 * k;
    }
    // The chunk against one-token rows: its own pairs less their one each (decode-like).
    let own = (diffs(at, k) + decode_pair_s * q).max(0.0);
    let short = own / attention_pairs(q, 0.0);
    let mut prefill_keys = vec![0.0, q / 2.0];
    let mut prefill_row_s = vec![0.0, short * q / 2.0];
    for (shape, d) in prefill[1..].iter().zip(&ctx_diffs) {
        prefill_keys.push(shape[0].context as f64 + q / 2.0);
        prefill_row_s.push(prefill_row_s[1] + d / q);
    }
    // More keys never cost less.
    monotone(&mut prefill_row_s);
    let prefill_slopes: Vec<f64> =
        prefill_keys.windows(2).zip(prefill_row_s.windows(2)).map(|(k, g)| (g[1] - g[0]) / (k[1] - k[0])).collect();
    // Base points less their own pairs (one-token rows: decode-like).
    let mut model = Profiled {
        backend,
        tokens,
        base_s: Vec::new(),
        sampled,
        sampled_extra_s: sampled_extra,
        prefill_keys,
        prefill_row_s,
        decode_pair_s,
        decode_pair_alone_s,
        threads: spec.threads.max(1),
    };
    model.base_s = base_raw
        .iter()
        .zip(&model.tokens)
        .map(|(&t, &n)| t - model.decode_slope(threads.min(n)) * n / (threads.min(n) / threads))
        .collect();
    // No smoothing of the base: these are direct medians, and the cost is really not
    // monotone (the GEMMs take other paths at one row, and at two than at four).
    // How well the fitted model reproduces every measured point.
    let mut points = Vec::new();
    for (d, &t) in designs.iter().zip(&t) {
        let b = synthetic_batch(d, spec.block_size, 0);
        let predicted_s = model.step_time(&b);
        points.push(ProfilePoint {
            rows: b.num_tokens(),
            seqs: d.len(),
            sampled: b.logits_indices.len(),
            context: d.iter().map(|s| s.context).max().unwrap_or(0),
            measured_s: t,
            predicted_s,
        });
    }
    let report = ProfileReport {
        decode_pair_s_by_shape: [slope(fam[0]), slope(fam[1])],
        prefill_key_s: prefill_slopes,
        max_abs_error: points.iter().fold(0.0, |m: f64, p| m.max(p.error().abs())),
        median_abs_error: crate::study::bench::median(&points.iter().map(|p| p.error().abs()).collect::<Vec<_>>()),
        points,
        round_speeds: Vec::new(),
        kept_rounds: Vec::new(),
        cheap_points: 0,
    };
    Ok((model, report))
}

/// How a profile went: its points, the decode pair cost each family gives on its own (they
/// should agree if the model's shape is right), prefill's per-key cost along the span, and
/// the model's error on the points.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileReport {
    pub points: Vec<ProfilePoint>,
    /// The decode pair cost from one decode row, and from a decode batch, apart.
    pub decode_pair_s_by_shape: [f64; 2],
    /// Prefill: the marginal cost of one more key per row, span by span along the curve.
    pub prefill_key_s: Vec<f64>,
    pub max_abs_error: f64,
    pub median_abs_error: f64,
    /// Each round's speed against the typical round ([`Profiler::round_speeds`]), and the
    /// rounds the model was made from (all, unless some were dropped as outliers).
    pub round_speeds: Vec<f64>,
    pub kept_rounds: Vec<usize>,
    /// Points timed [`CHEAP_REPEATS`] times a round ([`Profiler::num_cheap`]).
    pub cheap_points: usize,
}

/// One measured point: its shape, the median time, and the model's prediction.
#[derive(Debug, Clone, Serialize)]
pub struct ProfilePoint {
    pub rows: usize,
    pub seqs: usize,
    pub sampled: usize,
    /// Cached context of its sequences (the longest).
    pub context: usize,
    pub measured_s: f64,
    pub predicted_s: f64,
}

/// Times batches on a CPU backend sized for a profile: [`CpuTimer::time`] runs one step
/// (forward pass and sampling) and returns its seconds.
#[derive(Debug)]
pub struct CpuTimer {
    backend: crate::backends::cpu::CpuBackend,
    /// What is profiled, for [`Profiled::backend`].
    pub name: String,
}

impl CpuTimer {
    pub fn new(lm: &crate::generate::LoadedModel, spec: &ProfileSpec) -> CpuTimer {
        let c = &lm.model.cfg;
        let mut backend = crate::backends::cpu::CpuBackend::new(
            lm.model.clone(),
            spec.num_blocks(),
            spec.block_size,
            spec.threads,
            0,
        );
        backend.scribble_kv_cache();
        CpuTimer {
            backend,
            name: format!("cpu, {} threads, {} layers, hidden {}", spec.threads, c.num_layers, c.hidden),
        }
    }
    pub fn time(&mut self, b: &ScheduledBatch) -> anyhow::Result<f64> {
        use crate::engine::Backend;
        let t0 = std::time::Instant::now();
        self.backend.execute(b)?;
        Ok(t0.elapsed().as_secs_f64())
    }
}

impl ProfilePoint {
    /// Relative error of the prediction.
    pub fn error(&self) -> f64 {
        (self.predicted_s - self.measured_s) / self.measured_s
    }
}

/// The profile's synthetic batches carry one KV group: a sliding-window model (several) is
/// refused by name rather than run with tables it cannot read.
pub fn ensure_one_kv_group(lm: &crate::generate::LoadedModel) -> anyhow::Result<()> {
    let c = &lm.model.cfg;
    anyhow::ensure!(
        c.kv_layout().groups.len() == 1,
        "{} ({}) has sliding-window layers: profiling such a model is not supported yet (the profile's batches carry one KV layer group)",
        lm.path.display(),
        c.arch
    );
    Ok(())
}

/// Profiles the CPU backend with the real model, `spec.repeats` rounds back to back, more
/// while they spread by more than `max_spread` (see [`profile_steady`]).
pub fn profile_cpu(
    lm: &crate::generate::LoadedModel,
    spec: &ProfileSpec,
    max_spread: f64,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<(Profiled, ProfileReport)> {
    ensure_one_kv_group(lm)?;
    let mut timer = CpuTimer::new(lm, spec);
    let name = timer.name.clone();
    profile_steady(spec, max_spread, name, &mut |b| timer.time(b), progress)
}

/// Profiles the CUDA backend `backend` (built for at least `spec`'s batch, sequences and
/// context), `spec.repeats` rounds back to back. Each step's time is its wall time to the
/// sampled tokens on the host, as a simulated step's is; decode-only shapes replay CUDA
/// graphs unless the backend runs eagerly (the first round captures them: the median of the
/// repeats is kept, so use `repeats >= 3`).
pub fn profile_cuda(
    backend: &mut crate::backends::cuda::model::CudaBackend,
    spec: &ProfileSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<(Profiled, ProfileReport)> {
    use crate::engine::Backend;
    anyhow::ensure!(
        backend.num_blocks() >= spec.num_blocks(),
        "the profile needs {} KV blocks and the GPU holds {}: lower --max-context or --max-seqs",
        spec.num_blocks(),
        backend.num_blocks()
    );
    let c = backend.config();
    let name = format!("cuda, {}, {} layers, hidden {}", backend.device_name(), c.num_layers, c.hidden);
    profile(
        spec,
        name,
        &mut |b| {
            let t0 = std::time::Instant::now();
            backend.execute(b)?;
            Ok(t0.elapsed().as_secs_f64())
        },
        progress,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_batches_are_well_formed() {
        let seqs = [
            SynthSeq { query: 1, context: 40, samples: true },
            SynthSeq { query: 20, context: 0, samples: false },
            SynthSeq { query: 5, context: 16, samples: true },
        ];
        let b = synthetic_batch(&seqs, 16, 7);
        assert_eq!(b.query_start_loc, [0, 1, 21, 26]);
        assert_eq!(b.seq_lens, [41, 20, 21]);
        assert_eq!(b.logits_indices, [0, 25]);
        assert_eq!((b.num_decode_tokens, b.num_prefill_tokens, b.num_partial_prefills), (1, 25, 1));
        assert_eq!(b.max_blocks_per_seq, 3);
        // Blocks are disjoint and every token's slot lies in its own sequence's blocks.
        assert_eq!(blocks_needed(&seqs, 16), 3 + 2 + 2);
        assert_eq!(&b.block_tables[..3], &[1, 2, 3]);
        assert_eq!(&b.block_tables[3..6], &[4, 5, 0]);
        assert_eq!(b.slot_mapping[0], 3 * 16 + 8); // position 40: block 3, offset 8
        assert_eq!(b.slot_mapping[1], 4 * 16); // position 0 of sequence 1
        assert_eq!(b.positions[21..], [16, 17, 18, 19, 20]);
        assert_eq!(b.input_ids[0], 7 + 40);
        assert_eq!(b.input_ids[21..], [23, 24, 25, 26, 27]);
        assert_eq!(b.slot_mapping[21], 7 * 16); // sequence 2's second block (6, 7)
    }

    /// Rounds may be spread out; the profiler reports how much slower the last round ran.
    #[test]
    fn profiler_rounds_report_drift() {
        let spec =
            ProfileSpec { max_tokens: 64, max_seqs: 8, max_context: 128, block_size: 16, repeats: 1, threads: 1 };
        let mut p = Profiler::new(&spec).unwrap();
        let mut speed = 1.0;
        for _ in 0..3 {
            p.round(&mut |b| Ok(speed * (0.01 + 1e-4 * b.num_tokens() as f64)), &mut |_, _| {}).unwrap();
            speed *= 1.1;
        }
        let drift = p.drift_between(0, p.num_rounds() - 1);
        assert!((drift - 0.21).abs() < 1e-9, "{drift}");
        // The medians are the middle round's.
        let (m, _) = p.finish("test".into()).unwrap();
        assert!((m.base_s[0] - 1.1 * (0.01 + 1e-4)).abs() < 1e-12, "{:?}", m.base_s);
    }

    /// A point's first timing in a round runs slow (as after the step before it); the cheap
    /// points are timed five times and keep the clean median, the dear ones are timed once.
    #[test]
    fn cheap_points_keep_the_median_of_their_repeats() {
        let spec =
            ProfileSpec { max_tokens: 64, max_seqs: 8, max_context: 128, block_size: 16, repeats: 1, threads: 1 };
        let cost = |b: &ScheduledBatch| 1e-4 * (1.0 + (b.num_tokens() * b.num_tokens()) as f64);
        let mut p = Profiler::new(&spec).unwrap();
        let mut last: *const ScheduledBatch = std::ptr::null();
        let mut calls = 0usize;
        p.round(
            &mut |b| {
                calls += 1;
                let first = !std::ptr::eq(last, b);
                last = b;
                Ok(cost(b) * if first { 2.0 } else { 1.0 })
            },
            &mut |_, _| {},
        )
        .unwrap();
        let cheap = p.num_cheap();
        // Base points of up to 12 tokens cost under a sixteenth of 64 tokens' (0.41 s); only
        // they repeat, not the cheap pairs over cached context.
        let slowest = 1e-4 * (1.0 + 64.0 * 64.0);
        let want = spec.token_grid().iter().filter(|&&n| 1e-4 * (1.0 + (n * n) as f64) < slowest / 16.0).count();
        assert_eq!((cheap, want), (5, 5), "{cheap} of {} points", p.num_points());
        assert_eq!(calls, 2 * p.num_points() + (CHEAP_REPEATS - 1) * cheap);
        let (m, _) = p.finish("test".into()).unwrap();
        let at = |n: usize| m.base_s[m.tokens.iter().position(|&t| t == n as f64).unwrap()];
        assert!((at(1) - 2e-4).abs() < 1e-12, "{:?}", m.base_s);
        assert!((at(64) - 2.0 * 0.4097).abs() < 1e-9, "{:?}", m.base_s);
    }

    /// A machine that runs one round in three 30% slow: the profile times more rounds, keeps
    /// the steady ones and says which it kept; one whose speed keeps changing is refused.
    #[test]
    fn noisy_rounds_are_repeated_then_refused() {
        let spec =
            ProfileSpec { max_tokens: 64, max_seqs: 8, max_context: 128, block_size: 16, repeats: 3, threads: 1 };
        let cost = |b: &ScheduledBatch| 0.01 + 1e-4 * b.num_tokens() as f64;
        let mut calls = 0usize;
        let n = Profiler::new(&spec).unwrap().num_points();
        // Round 1 (the second) is slow; the warm-up pass runs first, untimed.
        let (m, report) = profile_steady(
            &spec,
            0.1,
            "test".into(),
            &mut |b| {
                calls += 1;
                let round = (calls - 1) / n;
                Ok(cost(b) * if round == 2 { 1.3 } else { 1.0 })
            },
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(report.kept_rounds, vec![0, 2, 3], "{:?}", report.round_speeds);
        assert_eq!(report.round_speeds.len(), 4);
        assert!((m.base_s[0] - cost(&synthetic_batch(&base_design(1), 16, 0))).abs() < 1e-12, "{:?}", m.base_s);
        // Every round 15% slower than the one before: never three rounds within 10%.
        let mut calls = 0usize;
        let e = profile_steady(
            &spec,
            0.1,
            "test".into(),
            &mut |b| {
                calls += 1;
                Ok(cost(b) * 1.15f64.powi(((calls - 1) / n) as i32))
            },
            &mut |_, _| {},
        )
        .unwrap_err();
        let noisy = e.downcast_ref::<TooNoisy>().expect("a TooNoisy error");
        assert_eq!(noisy.speeds.len(), 6, "{noisy}");
        assert!(noisy.to_string().contains("too noisy"), "{noisy}");
    }

    #[test]
    fn integral_of_the_piecewise_linear_curve() {
        let (xs, ys) = ([0.0, 2.0, 4.0], [0.0, 2.0, 6.0]);
        assert!((integral(&xs, &ys, 0.0, 2.0) - 2.0).abs() < 1e-12);
        assert!((integral(&xs, &ys, 1.0, 3.0) - (1.5 + 3.0)).abs() < 1e-12); // 1..2: 1.5, 2..3: 3
        assert!((integral(&xs, &ys, 4.0, 5.0) - 7.0).abs() < 1e-12); // extended: y = 2x - 2
        assert_eq!(integral(&xs, &ys, 3.0, 3.0), 0.0);
    }

    /// `--cost-model` files of either kind load as what they are.
    #[test]
    fn cost_model_files_of_both_kinds_load() {
        let fitted = r#"{"coef": [0.02, 0.001, 0.002, 5e-6], "knee": 16.0}"#;
        assert!(matches!(serde_json::from_str::<MeasuredCost>(fitted).unwrap(), MeasuredCost::Fitted(_)));
        let spec =
            ProfileSpec { max_tokens: 64, max_seqs: 8, max_context: 128, block_size: 16, repeats: 1, threads: 2 };
        let (m, _) =
            profile(&spec, "test".into(), &mut |b| Ok(0.01 + 1e-4 * b.num_tokens() as f64), &mut |_, _| {}).unwrap();
        let back: MeasuredCost = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        let MeasuredCost::Profiled(back) = back else { panic!("a profile loaded as {back:?}") };
        // serde_json's float printing may move the last bit.
        assert_eq!((back.tokens.len(), back.prefill_keys.len()), (m.tokens.len(), m.prefill_keys.len()));
        assert!(back.base_s.iter().zip(&m.base_s).all(|(a, b)| (a - b).abs() < 1e-15));
        assert!(serde_json::from_str::<MeasuredCost>(r#"{"tokens": [1]}"#).is_err());
    }

    #[test]
    fn profiles_too_small_to_draw_a_curve_are_refused() {
        let spec = ProfileSpec { max_tokens: 64, max_seqs: 8, max_context: 4, block_size: 16, repeats: 1, threads: 1 };
        let e = Profiler::new(&spec).unwrap_err().to_string();
        assert!(e.contains("max context 4"), "{e}");
    }

    #[test]
    fn monotone_pools_violators() {
        let mut y = [1.0, 3.0, 2.0, 4.0, 0.0, 5.0];
        monotone(&mut y);
        assert_eq!(y, [1.0, 2.25, 2.25, 2.25, 2.25, 5.0]);
        let mut up = [1.0, 2.0, 3.0];
        monotone(&mut up);
        assert_eq!(up, [1.0, 2.0, 3.0]);
    }

    #[test]
    fn interpolation_is_piecewise_linear_and_extends_the_last_segment() {
        let (xs, ys) = ([1.0, 2.0, 4.0], [10.0, 20.0, 24.0]);
        assert_eq!(interpolate(&xs, &ys, 0.5), 10.0);
        assert_eq!(interpolate(&xs, &ys, 1.5), 15.0);
        assert_eq!(interpolate(&xs, &ys, 3.0), 22.0);
        assert_eq!(interpolate(&xs, &ys, 8.0), 32.0);
    }

    /// A backend whose cost is known (a knee in the linear layers, a per-sampled-row head,
    /// pairs over threads): the profile must recover it and predict unseen mixed batches.
    #[test]
    fn profile_recovers_a_known_cost() {
        let threads: f64 = 2.0;
        let truth = |b: &ScheduledBatch| {
            let n = b.num_tokens() as f64;
            let pairs: f64 =
                b.seqs.iter().map(|s| attention_pairs(s.num_query_tokens as f64, s.context_len as f64)).sum();
            let decode: f64 =
                b.seqs.iter().filter(|s| s.num_query_tokens == 1).map(|s| s.context_len as f64 + 1.0).sum();
            let spread = threads.min(n) / threads;
            0.01 + 2e-4 * (n - 16.0).max(0.0)
                + 1e-3 * (b.logits_indices.len() as f64 - 1.0)
                + (3e-6 * (pairs - decode) + 5e-6 * decode) / spread
        };
        let spec =
            ProfileSpec { max_tokens: 512, max_seqs: 32, max_context: 1024, block_size: 16, repeats: 1, threads: 2 };
        let (m, report) = profile(&spec, "test".into(), &mut |b| Ok(truth(b)), &mut |_, _| {}).unwrap();
        // A 300-row chunk over 500 cached tokens: 3e-6 s per pair, as the truth has it.
        let want = 3e-6 * attention_pairs(300.0, 500.0);
        assert!((m.attention(300.0, 500.0) / want - 1.0).abs() < 1e-9, "{}", m.attention(300.0, 500.0));
        assert!((m.decode_pair_s - 5e-6).abs() < 1e-9, "{}", m.decode_pair_s);
        assert!(report.max_abs_error < 1e-6, "{report:?}");
        let mixed = [
            SynthSeq { query: 1, context: 300, samples: true },
            SynthSeq { query: 1, context: 17, samples: true },
            SynthSeq { query: 200, context: 64, samples: false },
            SynthSeq { query: 57, context: 0, samples: true },
        ];
        let b = synthetic_batch(&mixed, 16, 0);
        let (p, t) = (m.step_time(&b), truth(&b));
        assert!(((p - t) / t).abs() < 1e-6, "predicted {p}, true {t}");
    }

    /// A lone decode row has the memory to itself: its pairs cost less than a batch's. The
    /// profile measures both, and a one-row step is predicted with the lone cost.
    #[test]
    fn a_lone_decode_row_is_priced_apart_from_a_batch() {
        let truth = |b: &ScheduledBatch| {
            let n = b.num_tokens() as f64;
            let decode: f64 =
                b.seqs.iter().filter(|s| s.num_query_tokens == 1).map(|s| s.context_len as f64 + 1.0).sum();
            // One row runs on one of the two threads (twice the wall time per pair), at 3 us
            // a pair; with both threads busy a pair costs 5 us of one thread.
            let attention = if n <= 1.0 { 3e-6 * decode * 2.0 } else { 5e-6 * decode };
            0.01 + 1e-4 * n + attention
        };
        let spec =
            ProfileSpec { max_tokens: 256, max_seqs: 32, max_context: 1024, block_size: 16, repeats: 1, threads: 2 };
        let (m, _) = profile(&spec, "test".into(), &mut |b| Ok(truth(b)), &mut |_, _| {}).unwrap();
        assert!((m.decode_pair_s - 5e-6).abs() < 1e-9, "{}", m.decode_pair_s);
        assert!((m.decode_slope(1.0) - 3e-6).abs() < 1e-9, "{}", m.decode_slope(1.0));
        for ctx in [100, 700] {
            let b = synthetic_batch(&[SynthSeq { query: 1, context: ctx, samples: true }], 16, 0);
            let (p, t) = (m.step_time(&b), truth(&b));
            assert!(((p - t) / t).abs() < 1e-6, "context {ctx}: predicted {p}, true {t}");
        }
    }

    /// Noise must not wreck the slope: each point's first timed run is a 3x outlier, and the
    /// median of three drops it.
    #[test]
    fn profile_medians_shrug_off_outliers() {
        let mut seen = std::collections::HashMap::new();
        let spec =
            ProfileSpec { max_tokens: 256, max_seqs: 16, max_context: 512, block_size: 16, repeats: 3, threads: 1 };
        let (m, _) = profile(
            &spec,
            "test".into(),
            &mut |b| {
                let pairs: f64 =
                    b.seqs.iter().map(|s| attention_pairs(s.num_query_tokens as f64, s.context_len as f64)).sum();
                let t = 0.02 + 1e-4 * b.num_tokens() as f64 + 2e-6 * pairs;
                let k = seen.entry((b.num_tokens(), b.logits_indices.len(), pairs as u64)).or_insert(0);
                *k += 1;
                Ok(if *k == 2 { 3.0 * t } else { t })
            },
            &mut |_, _| {},
        )
        .unwrap();
        let want = 2e-6 * attention_pairs(100.0, 200.0);
        assert!((m.attention(100.0, 200.0) / want - 1.0).abs() < 0.01, "{}", m.attention(100.0, 200.0));
        assert!((m.decode_pair_s / 2e-6 - 1.0).abs() < 0.01, "{}", m.decode_pair_s);
    }
}
