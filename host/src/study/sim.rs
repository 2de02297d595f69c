//! `weave simulate`: the real scheduler and block manager in a discrete-event loop whose step
//! times come from a cost model instead of a model run.
//!
//! Cost models: a roofline of a named GPU running a named model ([`Roofline`]), or a linear
//! model fitted to measured step logs of a real backend ([`Fitted`], `weave calibrate`).

pub use crate::backends::sim::{attention_pairs, CostModel, SimBackend};
use crate::engine::{Arrival, Clock, Engine, Outcome};
pub use crate::model::profiles::{find_model, models, ModelProfile};
pub use crate::workload::{read_workload, Lengths, WorkItem, Workload};
use serde::{Deserialize, Serialize};
use weave_scheduler::{NewRequest, Scheduler, SchedulerConfig};

/// A GPU as the roofline sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GpuProfile {
    pub name: &'static str,
    /// Dense bf16 tensor-core peak, TFLOP/s.
    pub peak_tflops: f64,
    /// HBM bandwidth, GB/s.
    pub mem_bw_gbs: f64,
    pub mem_gb: f64,
}

/// Datasheet figures (dense, no sparsity).
pub const GPUS: &[GpuProfile] = &[
    GpuProfile { name: "a100-80gb", peak_tflops: 312.0, mem_bw_gbs: 2039.0, mem_gb: 80.0 },
    GpuProfile { name: "h100-sxm", peak_tflops: 989.0, mem_bw_gbs: 3350.0, mem_gb: 80.0 },
    GpuProfile { name: "h200", peak_tflops: 989.0, mem_bw_gbs: 4800.0, mem_gb: 141.0 },
];

pub fn find_gpu(name: &str) -> Result<GpuProfile, String> {
    GPUS.iter().copied().find(|g| g.name == name.to_lowercase()).ok_or_else(|| {
        format!("unknown GPU profile {name:?}; known: {}", GPUS.iter().map(|g| g.name).collect::<Vec<_>>().join(", "))
    })
}

/// Roofline: each part of the step takes the longer of its FLOPs at the achievable compute
/// rate and its bytes at the achievable bandwidth; plus a fixed per-step overhead.
#[derive(Debug, Clone)]
pub struct Roofline {
    pub gpu: GpuProfile,
    pub model: ModelProfile,
    /// Achievable fraction of peak FLOP/s (model FLOPs utilisation).
    pub mfu: f64,
    /// Achievable fraction of peak bandwidth.
    pub mbu: f64,
    /// Scheduling, launch and sampling overhead per step, seconds.
    pub overhead_s: f64,
}

impl Roofline {
    pub fn new(gpu: GpuProfile, model: ModelProfile) -> Roofline {
        Roofline { gpu, model, mfu: 0.6, mbu: 0.8, overhead_s: 0.002 }
    }
}

impl CostModel for Roofline {
    fn time(&self, n: f64, sampled: f64, seqs: impl Iterator<Item = (f64, f64)>) -> f64 {
        let m = &self.model;
        let flops_rate = self.gpu.peak_tflops * 1e12 * self.mfu;
        let bw = self.gpu.mem_bw_gbs * 1e9 * self.mbu;
        // Linear layers: weights read once per step; 2 FLOPs per weight per token.
        let gemm_flops = 2.0 * m.layer_params() * n + 2.0 * (m.hidden * m.vocab) as f64 * sampled;
        let gemm_bytes = (m.layer_params() + (m.hidden * m.vocab) as f64) * m.dtype_bytes;
        let gemm = (gemm_flops / flops_rate).max(gemm_bytes / bw);
        // Attention: query q over context c and itself (causal): q*c + q(q+1)/2 score pairs,
        // 4 FLOPs per pair and head dim (QK^T and PV); K/V of c + q tokens read per sequence.
        let (mut attn_flops, mut kv_bytes) = (0.0, 0.0);
        let qd = (m.heads * m.head_dim * m.layers) as f64;
        for (q, c) in seqs {
            attn_flops += 4.0 * qd * attention_pairs(q, c);
            kv_bytes += (c + q) * m.kv_bytes_per_token();
        }
        let attn = (attn_flops / flops_rate).max(kv_bytes / bw);
        gemm + attn + self.overhead_s
    }
}

/// Step time fitted to measured steps:
/// `a + b * max(0, tokens - knee) + c * sampled + d * attention pairs`. Below the knee a step
/// costs about the same whatever its size (reading the weights dominates); above it, the
/// linear layers' compute grows with the tokens. A roofline, learnt from the logs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fitted {
    pub coef: [f64; 4],
    #[serde(default)]
    pub knee: f64,
}

/// The four regressors of [`Fitted`] for one step: 1, tokens past the knee, sampled rows,
/// attention pairs.
pub fn features(tokens: f64, sampled: f64, pairs: f64, knee: f64) -> [f64; 4] {
    [1.0, (tokens - knee).max(0.0), sampled, pairs]
}

impl CostModel for Fitted {
    fn time(&self, tokens: f64, sampled: f64, seqs: impl Iterator<Item = (f64, f64)>) -> f64 {
        let pairs: f64 = seqs.map(|(q, c)| attention_pairs(q, c)).sum();
        let x = features(tokens, sampled, pairs, self.knee);
        x.iter().zip(&self.coef).map(|(a, b)| a * b).sum::<f64>().max(0.0)
    }
}

/// The regressors of a logged step.
fn record_features(s: &crate::engine::steplog::StepRecord, knee: f64) -> [f64; 4] {
    let pairs: f64 = s.seq_shapes().map(|(q, c)| attention_pairs(q, c)).sum();
    features(s.total_tokens() as f64, s.sampled_rows() as f64, pairs, knee)
}

/// Least squares fit of [`Fitted`] to measured steps (from step logs), in relative error,
/// with the knee chosen by grid search.
pub fn fit(steps: &[crate::engine::steplog::StepRecord]) -> Result<Fitted, String> {
    if steps.len() < 8 {
        return Err(format!("{} steps are too few to fit a step-time model (need at least 8)", steps.len()));
    }
    let max_tokens = steps.iter().map(|s| s.total_tokens()).max().unwrap_or(0) as f64;
    let mut best: Option<(f64, Fitted)> = None;
    for knee in [0.0, 4.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0, 256.0] {
        if knee >= max_tokens {
            break;
        }
        let Some(f) = fit_with_knee(steps, knee) else { continue };
        let err: f64 = steps.iter().map(|s| ((f.record_time(s) - s.duration) / s.duration.max(1e-9)).powi(2)).sum();
        if best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, f));
        }
    }
    best.map(|b| b.1).ok_or_else(|| "the step-time fit is singular".into())
}

fn fit_with_knee(steps: &[crate::engine::steplog::StepRecord], knee: f64) -> Option<Fitted> {
    let mut ata = [[0.0f64; 4]; 4];
    let mut atb = [0.0f64; 4];
    // Weighted by 1/duration^2: minimise relative error, so the many small (decode) steps
    // count as much as the few large (prefill) ones.
    for s in steps {
        let x = record_features(s, knee);
        let w = 1.0 / s.duration.max(1e-9).powi(2);
        for i in 0..4 {
            atb[i] += w * x[i] * s.duration;
            for j in 0..4 {
                ata[i][j] += w * x[i] * x[j];
            }
        }
    }
    // Small ridge term keeps the system solvable when a regressor never varies.
    for (i, row) in ata.iter_mut().enumerate() {
        row[i] += 1e-9 * (1.0 + row[i]);
    }
    solve4(ata, atb).map(|coef| Fitted { coef, knee })
}

fn solve4(mut a: [[f64; 4]; 4], mut b: [f64; 4]) -> Option<[f64; 4]> {
    for c in 0..4 {
        let p = (c..4).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[p][c].abs() < 1e-300 {
            return None;
        }
        a.swap(c, p);
        b.swap(c, p);
        for r in 0..4 {
            if r != c {
                let f = a[r][c] / a[c][c];
                let pivot = a[c];
                for (x, y) in a[r].iter_mut().zip(pivot).skip(c) {
                    *x -= f * y;
                }
                b[r] -= f * b[c];
            }
        }
    }
    Some([b[0] / a[0][0], b[1] / a[1][1], b[2] / a[2][2], b[3] / a[3][3]])
}

/// Turns workload items into engine arrivals with distinct token ids (no prefix sharing).
pub fn arrivals(items: &[WorkItem]) -> Vec<Arrival> {
    let mut next: u32 = 1;
    items
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let prompt: Vec<u32> = (next..next + w.prompt_len as u32).collect();
            next = next.wrapping_add(w.prompt_len as u32);
            let mut req = NewRequest::new(0, prompt, w.output_len);
            req.ignore_eos = true;
            Arrival {
                at: w.arrival_s,
                name: serde_json::json!(i),
                request: req,
                sampling: Default::default(),
                guide: None,
            }
        })
        .collect()
}

/// Serving metrics of a run, in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub requests: usize,
    pub rejected: usize,
    pub makespan_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    pub ttft: Dist,
    pub tpot: Dist,
    pub itl: Dist,
    pub e2e: Dist,
    pub preemptions: u64,
    /// Requests per second that met both SLOs.
    pub goodput_rps: f64,
    pub slo_ttft_s: f64,
    pub slo_tpot_s: f64,
    pub steps: usize,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Dist {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Dist {
    pub fn of(xs: &[f64]) -> Dist {
        use crate::study::analyze::percentile;
        if xs.is_empty() {
            return Dist::default();
        }
        Dist {
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
            p50: percentile(xs, 50.0),
            p90: percentile(xs, 90.0),
            p99: percentile(xs, 99.0),
        }
    }
}

pub fn metrics(
    outcomes: &[Outcome],
    rejected: usize,
    itl: &[f64],
    steps: usize,
    slo_ttft_s: f64,
    slo_tpot_s: f64,
) -> Metrics {
    let first = outcomes.iter().map(|o| o.arrival).fold(f64::INFINITY, f64::min);
    let last = outcomes.iter().map(|o| o.finish).fold(0.0, f64::max);
    let span = (last - first).max(1e-12);
    let out_tok: usize = outcomes.iter().map(|o| o.output_tokens.len()).sum();
    let in_tok: usize = outcomes.iter().map(|o| o.num_prompt_tokens).sum();
    let ttft: Vec<f64> = outcomes.iter().filter_map(Outcome::ttft).collect();
    let tpot: Vec<f64> = outcomes.iter().filter_map(Outcome::tpot).collect();
    let e2e: Vec<f64> = outcomes.iter().map(|o| o.finish - o.arrival).collect();
    let good = outcomes
        .iter()
        .filter(|o| o.ttft().is_some_and(|t| t <= slo_ttft_s) && o.tpot().is_none_or(|t| t <= slo_tpot_s))
        .count();
    Metrics {
        requests: outcomes.len(),
        rejected,
        makespan_s: span,
        requests_per_s: outcomes.len() as f64 / span,
        output_tokens_per_s: out_tok as f64 / span,
        total_tokens_per_s: (in_tok + out_tok) as f64 / span,
        ttft: Dist::of(&ttft),
        tpot: Dist::of(&tpot),
        itl: Dist::of(itl),
        e2e: Dist::of(&e2e),
        preemptions: outcomes.iter().map(|o| o.num_preemptions as u64).sum(),
        goodput_rps: good as f64 / span,
        slo_ttft_s,
        slo_tpot_s,
        steps,
    }
}

/// Runs `items` through the real scheduler with `cost` as the clock.
pub fn simulate<C: CostModel>(
    cfg: &SchedulerConfig,
    cost: C,
    items: &[WorkItem],
    keep_steps: bool,
    slo: (f64, f64),
) -> anyhow::Result<(Metrics, crate::engine::RunReport)> {
    let mut engine = Engine::new(Scheduler::new(cfg.clone())?, SimBackend { cost }, Clock::Seconds);
    engine.keep_steps = keep_steps;
    engine.collect_itl = true;
    let report = engine.run(arrivals(items), &mut |_, _| false, &mut |_| {})?;
    let m = metrics(&report.outcomes, report.rejected.len(), &report.itl, report.num_steps, slo.0, slo.1);
    Ok((m, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;
    use weave_scheduler::StepOutput;

    #[test]
    fn workloads_have_the_asked_rate_and_shape() {
        let w = Workload {
            num_requests: 20000,
            rate: 5.0,
            burstiness: 1.0,
            prompt: Lengths::Fixed(10),
            output: Lengths::Uniform(1, 3),
            seed: 1,
        };
        let it = w.items();
        let span = it.last().unwrap().arrival_s;
        assert!((20000.0 / span - 5.0).abs() < 0.2, "rate {}", 20000.0 / span);
        let gaps: Vec<f64> = it.windows(2).map(|p| p[1].arrival_s - p[0].arrival_s).collect();
        let cv = |g: &[f64]| {
            let m = g.iter().sum::<f64>() / g.len() as f64;
            (g.iter().map(|x| (x - m).powi(2)).sum::<f64>() / g.len() as f64).sqrt() / m
        };
        assert!((cv(&gaps) - 1.0).abs() < 0.05, "Poisson CV {}", cv(&gaps));
        let bursty = Workload { burstiness: 0.25, ..w.clone() }.items();
        let g2: Vec<f64> = bursty.windows(2).map(|p| p[1].arrival_s - p[0].arrival_s).collect();
        assert!((cv(&g2) - 2.0).abs() < 0.2, "gamma(0.25) CV {}", cv(&g2));
        assert!(it.iter().all(|x| (1..=3).contains(&x.output_len)));
        let ln = Lengths::LogNormal { median: 100.0, sigma: 0.5 };
        let mut r = Rng::new(3);
        let mut xs: Vec<usize> = (0..5001).map(|_| ln.sample(&mut r)).collect();
        xs.sort();
        assert!((90..=110).contains(&xs[2500]), "median {}", xs[2500]);
        assert!("uniform:1".parse::<Lengths>().is_err());
        assert_eq!("lognormal:5:0.1".parse::<Lengths>(), Ok(Lengths::LogNormal { median: 5.0, sigma: 0.1 }));
    }

    #[test]
    fn roofline_decode_is_bandwidth_bound_prefill_compute_bound() {
        let r = Roofline::new(find_gpu("H100-SXM").unwrap(), find_model("llama-3-8b").unwrap());
        let mut s = Scheduler::new(SchedulerConfig { max_num_batched_tokens: 4096, ..Default::default() }).unwrap();
        s.add_request(NewRequest::new(1, (1..=2048).collect(), 4)).unwrap();
        let prefill = s.schedule();
        // 8B params x 2 FLOPs x 2048 tokens at 60% of 989 TFLOP/s: ~55 ms.
        let t = r.step_time(&prefill);
        assert!((0.045..0.08).contains(&t), "prefill {t}");
        s.update(&StepOutput { sampled: vec![5] }).unwrap();
        let decode = s.schedule();
        // ~16 GB of weights at 80% of 3.35 TB/s: ~6 ms, plus 2 ms overhead.
        let t = r.step_time(&decode);
        assert!((0.006..0.011).contains(&t), "decode {t}");
        assert!(find_gpu("v100").unwrap_err().contains("known: a100-80gb, h100-sxm, h200"));
        assert!(find_model("gpt-5").unwrap_err().contains("llama-3-8b"));
    }

    #[test]
    fn fit_recovers_a_known_linear_model() {
        let truth = [0.003, 2e-5, 1e-4, 3e-9];
        let mut steps = Vec::new();
        for i in 0..50usize {
            let q = 1 + (i * 37) % 300;
            let c = (i * 91) % 1000;
            let rec = crate::engine::steplog::ScheduledRecord {
                id: serde_json::json!(i),
                num_tokens: q as u32,
                is_prefill: q > 1,
                num_computed_tokens_before: c as u32,
                samples: i % 3 != 0,
            };
            let mut sched = vec![rec];
            for k in 0..(i % 7) {
                sched.push(crate::engine::steplog::ScheduledRecord {
                    id: serde_json::json!(k),
                    num_tokens: 1,
                    is_prefill: false,
                    num_computed_tokens_before: 100,
                    samples: true,
                });
            }
            let tokens: u32 = sched.iter().map(|x| x.num_tokens).sum();
            let pairs: f64 = sched
                .iter()
                .map(|x| {
                    let (q, c) = (x.num_tokens as f64, x.num_computed_tokens_before as f64);
                    q * c + q * (q + 1.0) / 2.0
                })
                .sum();
            let sampled = sched.iter().filter(|x| x.samples).count() as f64;
            let x = features(tokens as f64, sampled, pairs, 16.0);
            let duration: f64 = x.iter().zip(&truth).map(|(a, b)| a * b).sum();
            steps.push(crate::engine::steplog::StepRecord {
                step: i as u64,
                time: 0.0,
                duration,
                scheduled: sched,
                preempted: vec![],
                finished: vec![],
                num_running: 0,
                num_waiting: 0,
                kv_blocks_used: 0,
                kv_blocks_total: 1,
                prefill_tokens: 0,
                decode_tokens: tokens as usize,
                num_seqs: 0,
                num_prefill_seqs: 0,
                num_partial_prefills: 0,
                token_budget: 1,
                phases: None,
            });
        }
        let f = fit(&steps).unwrap();
        assert_eq!(f.knee, 16.0);
        for (a, b) in f.coef.iter().zip(&truth) {
            assert!((a - b).abs() <= 1e-3 * b.abs() + 1e-12, "{:?} vs {truth:?}", f.coef);
        }
    }
}
