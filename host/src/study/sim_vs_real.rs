//! `weave experiment sim-vs-real` on the CPU: the simulator, with a step-time model profiled
//! from designed batches ([`crate::study::profile`]), against real runs of five held-out
//! workloads on the CPU backend.
//!
//! A shared machine's speed wanders (its neighbours' load), so the check is built to see it
//! rather than be fooled by it:
//! - the workloads' arrival rates are set from the machine's own capacity (simulated from the
//!   first profile round, all requests at once), so every workload loads a slow machine as it
//!   loads a fast one, instead of drowning it;
//! - the profile's rounds bracket each workload's runs (one before, one after) and its model
//!   is made from the rounds around it; a workload whose bracketing rounds disagree by more
//!   than [`MAX_DRIFT`] is run again once, and flagged if they disagree again;
//! - each workload runs for real [`REPEATS`] times; the table gives the median and the spread.

use crate::engine::steplog::StepRecord;
use crate::study::bench::median;
use crate::study::experiments::{mean_step_s, row, run_cpu, SimVsReal, Table, SLO};
use crate::study::profile::{CpuTimer, ProfileSpec, Profiled, Profiler};
use crate::study::sim::{attention_pairs, simulate, CostModel, Lengths, Metrics, Workload};
use weave_scheduler::SchedulerConfig;

/// Real runs per workload.
pub const REPEATS: usize = 3;

/// The most a workload's bracketing profile rounds may disagree (median over the points)
/// before its runs are repeated.
pub const MAX_DRIFT: f64 = 0.10;

/// Profile rounds a workload's model is made from: those nearest its runs. On a 2-core AVX2
/// machine the rounds of one experiment ran up to 8% faster or slower than the typical one,
/// one round at a time and not as a trend; from three rounds, one quiet round moved a model
/// 8% (workload C missed by 11%). The median of five stays local and shrugs off one or two.
pub const ROUND_WINDOW: usize = 5;

/// The `k` rounds (of `n`) nearest the runs between rounds `before` and `after`: those two
/// first, then outwards, the earlier first on a tie; in order.
pub fn nearest_rounds(before: usize, after: usize, n: usize, k: usize) -> Vec<usize> {
    let distance = |i: usize| {
        if (before..=after).contains(&i) {
            0
        } else if i < before {
            before - i
        } else {
            i - after
        }
    };
    let mut all: Vec<usize> = (0..n).collect();
    all.sort_by_key(|&i| (distance(i), i));
    all.truncate(k);
    all.sort();
    all
}

/// A held-out workload: lengths and arrival shape, the load it puts on the machine, and the
/// scheduler's budget.
#[derive(Debug, Clone)]
pub struct HeldOut {
    pub key: &'static str,
    pub label: &'static str,
    /// Fraction of the machine's capacity (requests/s with everything queued at once) to
    /// arrive at; `None`: all requests at once.
    pub load: Option<f64>,
    /// The workload; its `rate` is set from the load.
    pub workload: Workload,
    pub budget: usize,
    pub max_model_len: usize,
}

/// The five held-out workloads: other seeds, arrival processes, lengths and budgets than
/// anything profiled. `quick` halves the requests.
pub fn held_out(quick: bool) -> Vec<HeldOut> {
    let n = |k: usize| if quick { k.div_ceil(2) } else { k };
    let w = |num_requests, burstiness, prompt, output, seed| Workload {
        num_requests,
        rate: f64::INFINITY,
        burstiness,
        prompt,
        output,
        seed,
    };
    vec![
        HeldOut {
            key: "a",
            label: "A: Poisson at 50% load, prompts lognormal(120), outputs 16-48, budget 256",
            load: Some(0.5),
            workload: w(n(32), 1.0, Lengths::LogNormal { median: 120.0, sigma: 0.6 }, Lengths::Uniform(16, 48), 21),
            budget: 256,
            max_model_len: 2048,
        },
        HeldOut {
            key: "b",
            label: "B: bursty (gamma 0.5) at 90% load, prompts 200-600, outputs 8-40, budget 1024",
            load: Some(0.9),
            workload: w(n(32), 0.5, Lengths::Uniform(200, 600), Lengths::Uniform(8, 40), 22),
            budget: 1024,
            max_model_len: 2048,
        },
        HeldOut {
            key: "c",
            label: "C: decode-heavy Poisson at 60% load, prompts lognormal(48), outputs 48-128, budget 512",
            load: Some(0.6),
            workload: w(n(32), 1.0, Lengths::LogNormal { median: 48.0, sigma: 0.5 }, Lengths::Uniform(48, 128), 23),
            budget: 512,
            max_model_len: 2048,
        },
        HeldOut {
            key: "d",
            label: "D: decode-heavy, 32 at once, prompts lognormal(32), outputs 64-128, budget 512",
            load: None,
            workload: w(n(32), 1.0, Lengths::LogNormal { median: 32.0, sigma: 0.5 }, Lengths::Uniform(64, 128), 24),
            budget: 512,
            max_model_len: 2048,
        },
        HeldOut {
            key: "e",
            label: "E: long context, Poisson at 70% load, prompts 2000-4000, outputs 16-48, budget 1024",
            load: Some(0.7),
            workload: w(n(6), 1.0, Lengths::Uniform(2000, 4000), Lengths::Uniform(16, 48), 25),
            budget: 1024,
            max_model_len: 4096 + 64,
        },
    ]
}

fn cfg(h: &HeldOut) -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens: h.budget,
        max_num_seqs: 32,
        max_model_len: h.max_model_len,
        block_size: 16,
        // Room for every request of the longest workload at once: no preemption anywhere.
        num_gpu_blocks: 2048,
        ..Default::default()
    }
}

/// One real run's figures.
#[derive(Debug, Clone)]
struct RealRun {
    mean_step_s: f64,
    metrics: Metrics,
    steps: Vec<StepRecord>,
}

/// The real runs of one workload and the profile rounds around them.
#[derive(Debug)]
struct Runs {
    rate: f64,
    runs: Vec<RealRun>,
    /// Profile rounds timed just before and just after the runs.
    rounds: (usize, usize),
    /// Tries (2 when the first one's rounds drifted apart).
    tries: usize,
}

/// The simulator against the real CPU backend on [`held_out`] workloads; see the module doc.
pub fn sim_vs_real(lm: &crate::generate::LoadedModel, threads: usize, quick: bool) -> anyhow::Result<SimVsReal> {
    crate::study::profile::ensure_one_kv_group(lm)?;
    let repeats = if quick { 1 } else { REPEATS };
    let workloads = held_out(quick);
    let spec = ProfileSpec { max_tokens: 1024, max_seqs: 32, max_context: 4096, block_size: 16, repeats: 1, threads };
    let mut profiler = Profiler::new(&spec)?;
    let mut timer = CpuTimer::new(lm, &spec);
    let name = timer.name.clone();
    let mut round = |p: &mut Profiler| -> anyhow::Result<usize> {
        p.round(&mut |b| timer.time(b), &mut |_, _| {})?;
        Ok(p.num_rounds() - 1)
    };
    // The capacity the rates are set from, from the rounds timed first: two, and a third
    // (the median of three) when those two disagree. One disturbed round alone moved every
    // workload's load by a fifth (a compile beside round 0 ran it 41% slow).
    round(&mut profiler)?;
    round(&mut profiler)?;
    if profiler.drift_between(0, 1).abs() > MAX_DRIFT {
        round(&mut profiler)?;
    }
    let start: Vec<usize> = (0..profiler.num_rounds()).collect();
    let (first, _) = profiler.finish_rounds(&start, name.clone())?;
    let mut all = Vec::new();
    for h in &workloads {
        // The rate that loads this machine as asked: a fraction of what the first round says
        // it serves with every request queued at once.
        let rate = match h.load {
            None => f64::INFINITY,
            Some(load) => {
                let everything = Workload { rate: f64::INFINITY, ..h.workload.clone() }.items();
                let (m, _) = simulate(&cfg(h), first.clone(), &everything, false, SLO)?;
                load * m.requests_per_s
            }
        };
        let items = Workload { rate, ..h.workload.clone() }.items();
        let mut tries = 0;
        let runs = loop {
            tries += 1;
            let before = profiler.num_rounds() - 1;
            let mut runs = Vec::new();
            for _ in 0..repeats {
                let r = run_cpu(lm, &cfg(h), &items, threads)?;
                runs.push(RealRun {
                    mean_step_s: mean_step_s(&r.steps),
                    metrics: crate::study::experiments::real_metrics(&r),
                    steps: r.steps,
                });
            }
            let after = round(&mut profiler)?;
            let drift = profiler.drift_between(before, after);
            eprintln!(
                "sim-vs-real {}: {} runs at {:.3} req/s; the profile rounds around them differ by {:+.1}%",
                h.key,
                repeats,
                rate,
                drift * 100.0
            );
            if drift.abs() <= MAX_DRIFT || tries == 2 {
                break Runs { rate, runs, rounds: (before, after), tries };
            }
        };
        all.push(runs);
    }
    let speeds = profiler.round_speeds();
    let mut rows = Vec::new();
    let mut findings = vec![format!(
        "profile rounds against the typical one, in the order timed: {} (spread {:.1}%); the rates from rounds {start:?}",
        speeds.iter().map(|s| format!("{:+.1}%", s * 100.0)).collect::<Vec<_>>().join(" "),
        profiler.spread() * 100.0
    )];
    let mut logs = Vec::new();
    let mut profiles = Vec::new();
    let mut summary = Vec::new();
    for (h, r) in workloads.iter().zip(&all) {
        // The model from the rounds nearest the runs: the two around them, then outwards.
        let (b, a) = r.rounds;
        let picked = nearest_rounds(b, a, profiler.num_rounds(), ROUND_WINDOW);
        let (profiled, report) = profiler.finish_rounds(&picked, name.clone())?;
        let drift = profiler.drift_between(b, a);
        findings.push(format!(
            "{}: {:.3} req/s; profile from rounds {picked:?} ({}); the rounds around the runs differ by {:+.1}%{}",
            h.label,
            r.rate,
            crate::study::profile::describe(&profiled, &report),
            drift * 100.0,
            match (r.tries, drift.abs() > MAX_DRIFT) {
                (_, true) =>
                    " (NOISY: the machine changed speed during these runs, twice; their errors are not evidence)",
                (2, false) => " (run twice: the first try's rounds drifted apart)",
                _ => "",
            }
        ));
        findings.push(format!("{}: {}", h.key.to_uppercase(), per_term(&profiled, &r.runs)));
        let items = Workload { rate: r.rate, ..h.workload.clone() }.items();
        let (sim_m, sim) = simulate(&cfg(h), profiled.clone(), &items, true, SLO)?;
        findings.push(tail_finding(h.key, &r.runs, &sim.steps));
        let real = Spread::of(&r.runs);
        let sim_step = mean_step_s(&sim.steps);
        let err = |sim: f64, real: f64| (sim - real) / real;
        let (e_step, e_ttft, e_itl) =
            (err(sim_step, real.step.0), err(sim_m.ttft.mean, real.ttft.0), err(sim_m.itl.p99, real.itl99.0));
        // The median real run (by TTFT) stands for the workload in the table and the logs.
        let mut order: Vec<usize> = (0..r.runs.len()).collect();
        order.sort_by(|&i, &j| r.runs[i].metrics.ttft.mean.total_cmp(&r.runs[j].metrics.ttft.mean));
        let mid = &r.runs[order[order.len() / 2]];
        logs.push((format!("{}-real", h.key), mid.steps.clone()));
        logs.push((format!("{}-sim", h.key), sim.steps));
        profiles.push((h.key.to_string(), profiled));
        let mut real_row =
            row(format!("{} (real, median run of {})", h.label, r.runs.len()), r.rate, mid.metrics.clone());
        real_row.extra.insert("mean_step_s".into(), real.step.0.into());
        real_row.extra.insert("step_time_error".into(), 0.0.into());
        real_row.extra.insert("ttft_error".into(), 0.0.into());
        real_row.extra.insert("itl_p99_error".into(), 0.0.into());
        rows.push(real_row);
        let mut sim_row = row(format!("{} (simulated)", h.label), r.rate, sim_m.clone());
        sim_row.extra.insert("mean_step_s".into(), sim_step.into());
        sim_row.extra.insert("step_time_error".into(), e_step.into());
        sim_row.extra.insert("ttft_error".into(), e_ttft.into());
        sim_row.extra.insert("itl_p99_error".into(), e_itl.into());
        rows.push(sim_row);
        summary.push(SummaryRow {
            key: h.key.to_uppercase(),
            label: h.label.to_string(),
            rate: r.rate,
            real,
            sim: (sim_step, sim_m.ttft.mean, sim_m.itl.p99),
            errors: (e_step, e_ttft, e_itl),
            noisy: drift.abs() > MAX_DRIFT,
        });
    }
    let table = Table {
        name: "sim-vs-real".into(),
        description: format!(
            "The simulator predicting five held-out workloads on the real CPU backend (SmolLM2-135M, {threads} threads, {}), with a step-time model profiled from designed batches; arrival rates are fractions of this machine's capacity; real figures are the median of {repeats} runs.",
            cpu_isa()
        ),
        rows,
        findings,
    };
    Ok(SimVsReal { table, logs, profiles, summary: summary_markdown(&summary, repeats) })
}

/// The vector ISA the CPU kernels can use here, for the reader of a table.
pub fn cpu_isa() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            return "x86-64 with AVX-512 VNNI".into();
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "x86-64 with AVX-512 (no VNNI)".into();
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "x86-64 with AVX2 only".into();
        }
        "x86-64 without AVX2".into()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.into()
    }
}

/// The smallest and largest of `xs`.
fn min_max(xs: &[f64]) -> (f64, f64) {
    xs.iter().fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)))
}

/// Median and spread ((max - min) / median) over the real runs of mean step time, mean TTFT
/// and p99 ITL.
#[derive(Debug, Clone, Copy)]
struct Spread {
    step: (f64, f64),
    ttft: (f64, f64),
    itl99: (f64, f64),
}

impl Spread {
    fn of(runs: &[RealRun]) -> Spread {
        let f = |get: &dyn Fn(&RealRun) -> f64| {
            let xs: Vec<f64> = runs.iter().map(get).collect();
            let m = median(&xs);
            let (lo, hi) = min_max(&xs);
            (m, if m > 0.0 { (hi - lo) / m } else { 0.0 })
        };
        Spread { step: f(&|r| r.mean_step_s), ttft: f(&|r| r.metrics.ttft.mean), itl99: f(&|r| r.metrics.itl.p99) }
    }
}

#[derive(Debug)]
struct SummaryRow {
    key: String,
    label: String,
    rate: f64,
    real: Spread,
    /// Simulated mean step time, mean TTFT, p99 ITL (s).
    sim: (f64, f64, f64),
    errors: (f64, f64, f64),
    noisy: bool,
}

fn summary_markdown(rows: &[SummaryRow], repeats: usize) -> String {
    let mut s = String::from(
        "| held-out workload | req/s | mean step: real (spread) / simulated | error | mean TTFT: real (spread) / simulated | error | p99 ITL: real (spread) / simulated | error |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let cell = |(m, sp): (f64, f64), sim: f64| format!("{:.1} (±{:.0}%) / {:.1} ms", m * 1e3, sp * 50.0, sim * 1e3);
        s += &format!(
            "| {}{} | {:.2} | {} | {:+.1}% | {} | {:+.1}% | {} | {:+.1}% |\n",
            r.label,
            if r.noisy { " (noisy)" } else { "" },
            r.rate,
            cell(r.real.step, r.sim.0),
            r.errors.0 * 100.0,
            cell(r.real.ttft, r.sim.1),
            r.errors.1 * 100.0,
            cell(r.real.itl99, r.sim.2),
            r.errors.2 * 100.0,
        );
    }
    s += &format!(
        "\nReal: the median of {repeats} runs; (±x%): half the runs' range over the median. Workloads {}.\n",
        rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>().join(", ")
    );
    s
}

/// Of the decode tokens (those an ITL ends at), the fraction that came out of a step with
/// prefill in it. ITL is bimodal: a token waits one decode step or one prefill-chunk step,
/// 10-20x longer. Where this fraction is near 1%, p99 ITL sits on the cliff between the two
/// modes and a token more or less behind a prefill moves it several-fold.
pub fn behind_prefill(steps: &[StepRecord]) -> f64 {
    let (mut behind, mut all) = (0usize, 0usize);
    for s in steps {
        let decodes = s.scheduled.iter().filter(|q| q.samples && !q.is_prefill).count();
        all += decodes;
        if s.prefill_tokens > 0 {
            behind += decodes;
        }
    }
    if all == 0 {
        0.0
    } else {
        behind as f64 / all as f64
    }
}

/// The ITL tail's shape, real against simulated: how many tokens waited behind a prefill.
fn tail_finding(key: &str, runs: &[RealRun], sim: &[StepRecord]) -> String {
    let real: Vec<f64> = runs.iter().map(|r| behind_prefill(&r.steps)).collect();
    let ((lo, hi), mid) = (min_max(&real), median(&real));
    let sim = behind_prefill(sim);
    let cliff = |x: f64| (0.007..=0.013).contains(&x);
    format!(
        "{}: decode tokens that waited behind a prefill step: real {:.2}% (runs {:.2}-{:.2}%), simulated {:.2}%{}",
        key.to_uppercase(),
        mid * 100.0,
        lo * 100.0,
        hi * 100.0,
        sim * 100.0,
        if cliff(mid) || cliff(sim) {
            " (near 1%: p99 ITL sits on the cliff between decode and prefill steps, and its error measures which side a \
             few tokens fell, not the model)"
        } else {
            ""
        }
    )
}

/// The cost model's fit, term by term, on the real runs' own steps (no simulated queueing):
/// decode-only steps by rows, and steps with prefill; the engine's own time per step
/// (scheduling and the update, outside the backend) and the gap between steps.
fn per_term(m: &Profiled, runs: &[RealRun]) -> String {
    type Pick = fn(&StepRecord) -> bool;
    let buckets: [(&str, Pick); 6] = [
        ("decode 1 row", |s| s.prefill_tokens == 0 && s.decode_tokens == 1),
        ("decode 2-7", |s| s.prefill_tokens == 0 && (2..8).contains(&s.decode_tokens)),
        ("decode 8-15", |s| s.prefill_tokens == 0 && (8..16).contains(&s.decode_tokens)),
        ("decode 16-31", |s| s.prefill_tokens == 0 && (16..32).contains(&s.decode_tokens)),
        ("decode 32", |s| s.prefill_tokens == 0 && s.decode_tokens >= 32),
        ("with prefill", |s| s.prefill_tokens > 0),
    ];
    let steps: Vec<&StepRecord> = runs.iter().flat_map(|r| &r.steps).collect();
    let mut parts = Vec::new();
    for (name, pick) in buckets {
        let b: Vec<&&StepRecord> = steps.iter().filter(|s| pick(s)).collect();
        if b.is_empty() {
            continue;
        }
        let real = b.iter().map(|s| s.duration).sum::<f64>() / b.len() as f64;
        let pred = b.iter().map(|s| m.record_time(s)).sum::<f64>() / b.len() as f64;
        parts.push(format!(
            "{name}: {} steps, {:.1} ms real vs {:.1} predicted ({:+.1}%)",
            b.len(),
            real * 1e3,
            pred * 1e3,
            (pred - real) / real * 100.0
        ));
    }
    let phases: Vec<_> = steps.iter().filter_map(|s| s.phases).collect();
    let engine = phases.iter().map(|p| p.schedule + p.update).sum::<f64>() / phases.len().max(1) as f64;
    let mut gaps = Vec::new();
    for r in runs {
        for w in r.steps.windows(2) {
            let g = w[1].time - w[0].time - w[0].duration;
            // Idle waits for the next arrival are not the engine's cost.
            if g < 0.01 {
                gaps.push(g);
            }
        }
    }
    let pairs: f64 = steps.iter().flat_map(|s| s.seq_shapes()).map(|(q, c)| attention_pairs(q, c)).sum();
    format!(
        "the model on the real steps: {}; the engine outside the backend {:.3} ms a step (scheduling and update, in the step time), {:.3} ms between steps (median; not in it); {:.1}M attention pairs",
        parts.join("; "),
        engine * 1e3,
        if gaps.is_empty() { 0.0 } else { median(&gaps) * 1e3 },
        pairs / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held out means unseen: no workload shares a seed with another or with the profile's
    /// designs, and each names the load it was built for.
    #[test]
    fn five_distinct_held_out_workloads() {
        let w = held_out(false);
        assert_eq!(w.len(), 5);
        let mut seeds: Vec<u64> = w.iter().map(|h| h.workload.seed).collect();
        seeds.dedup();
        assert_eq!(seeds.len(), 5);
        let e = &w[4];
        let items = e.workload.items();
        assert!(items.iter().all(|i| (2000..=4000).contains(&i.prompt_len)), "{items:?}");
        assert!(items.iter().all(|i| i.prompt_len + i.output_len <= e.max_model_len));
        // D puts 32 decodes in flight at once.
        assert_eq!((w[3].load, w[3].workload.num_requests), (None, 32));
        let quick = held_out(true);
        assert!(quick.iter().zip(&w).all(|(q, f)| q.workload.num_requests == f.workload.num_requests.div_ceil(2)));
    }

    #[test]
    fn a_workload_takes_the_rounds_nearest_its_runs() {
        assert_eq!(nearest_rounds(0, 1, 8, 5), [0, 1, 2, 3, 4]);
        assert_eq!(nearest_rounds(3, 4, 8, 5), [1, 2, 3, 4, 5]);
        assert_eq!(nearest_rounds(6, 7, 8, 5), [3, 4, 5, 6, 7]);
        assert_eq!(nearest_rounds(0, 1, 3, 5), [0, 1, 2]);
    }

    /// Only decode tokens count, and each counts against the step it came out of: a prefill's
    /// first token (its TTFT) is not an ITL.
    #[test]
    fn behind_prefill_counts_decode_tokens_in_steps_with_prefill() {
        let step = |prefill: usize, seqs: &[(bool, bool)]| -> StepRecord {
            let scheduled: Vec<_> = seqs
                .iter()
                .enumerate()
                .map(|(i, &(is_prefill, samples))| {
                    serde_json::json!({"id": i, "num_tokens": 1, "is_prefill": is_prefill,
                        "num_computed_tokens_before": 0, "samples": samples})
                })
                .collect();
            serde_json::from_value(serde_json::json!({"step": 0, "time": 0.0, "duration": 0.01,
                "scheduled": scheduled, "preempted": [], "finished": [], "num_running": 0,
                "num_waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0,
                "prefill_tokens": prefill, "decode_tokens": 0, "num_seqs": 0,
                "num_prefill_seqs": 0, "num_partial_prefills": 0, "token_budget": 0}))
            .unwrap()
        };
        let steps = [
            step(0, &[(false, true), (false, true), (false, true)]),
            // One decode behind a prefill chunk that samples its first token, and a middle
            // chunk that samples nothing.
            step(40, &[(false, true), (true, true), (true, false)]),
        ];
        assert_eq!(behind_prefill(&steps), 0.25);
        assert_eq!(behind_prefill(&[]), 0.0);
    }

    #[test]
    fn spread_is_the_range_over_the_median() {
        let run = |s: f64| RealRun {
            mean_step_s: s,
            metrics: crate::study::sim::metrics(&[], 0, &[], 0, 1.0, 0.1),
            steps: Vec::new(),
        };
        let s = Spread::of(&[run(0.010), run(0.012), run(0.011)]);
        assert!((s.step.0 - 0.011).abs() < 1e-12);
        assert!((s.step.1 - 0.002 / 0.011).abs() < 1e-12);
    }
}
