//! `weave experiment NAME`: tuning experiments on the simulator (any GPU and model profile),
//! each a table (markdown, CSV, JSON) and a plot, written under `--out`.

use crate::study::plot;
use crate::study::profile::MeasuredCost;
use crate::study::sim::{simulate, CostModel, Lengths, Metrics, WorkItem, Workload};
use serde::Serialize;
use std::path::Path;
use weave_scheduler::{PolicyKind, SchedulerConfig};

pub const NAMES: &[&str] = &["batch-size", "prefill-cap", "chunked-prefill", "static-vs-continuous", "adaptive"];

/// One row: the setting's label and the metrics it got.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub setting: String,
    pub x: f64,
    #[serde(flatten)]
    pub metrics: Metrics,
    /// Experiment-specific figures (e.g. the long prompt's TTFT).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub name: String,
    pub description: String,
    pub rows: Vec<Row>,
    pub findings: Vec<String>,
}

/// Workload sizes of a run. [`Scale::gpu`] for the simulator's GPU profiles;
/// [`Scale::cpu`] for the real CPU backend with the reference model (small sizes).
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub requests: usize,
    /// Chat-like lengths: lognormal medians.
    pub prompt_median: f64,
    pub output_median: f64,
    /// chunked-prefill: the long prompts and their chunk sizes, the decode load's lengths,
    /// and the interval between long prompts (s).
    pub long_prompts: [(usize, usize); 2],
    pub decode_load: (usize, usize),
    pub long_every_s: f64,
    /// How long the chunked-prefill workload lasts (s); on the real backend, wall time.
    pub decode_load_s: f64,
    /// adaptive: loads swept, as fractions of capacity (low loads take long on a wall clock).
    pub load_fractions: &'static [f64],
    /// batch-size: the budgets swept; prefill-cap: the caps swept (budget = the largest).
    pub budgets: &'static [usize],
    pub prefill_caps: &'static [usize],
    pub max_model_len: usize,
}

impl Scale {
    pub fn gpu(requests: usize) -> Scale {
        Scale {
            requests,
            prompt_median: 512.0,
            output_median: 200.0,
            long_prompts: [(1000, 256), (5000, 512)],
            decode_load: (64, 400),
            long_every_s: 0.5,
            decode_load_s: (requests as f64 / 8.0).max(20.0),
            load_fractions: &[0.05, 0.3, 0.6, 0.9],
            budgets: &[512, 1024, 2048, 4096, 8192],
            prefill_caps: &[512, 2048, 8192],
            max_model_len: 8192,
        }
    }
    /// A real model on a GPU (`--backend cuda`, e.g. a dummy llama-3-8b on an H200): the
    /// simulator's shapes, with fewer requests and shorter timed loads, so that the five
    /// experiments run in minutes of device time.
    pub fn gpu_real(requests: usize) -> Scale {
        Scale {
            decode_load_s: (requests as f64 / 16.0).clamp(8.0, 15.0),
            load_fractions: &[0.3, 0.6, 0.9],
            ..Scale::gpu(requests)
        }
    }
    /// The real 135M model on a laptop-class CPU: everything an order of magnitude smaller.
    pub fn cpu(requests: usize) -> Scale {
        let quick = requests <= 8;
        Scale {
            requests,
            prompt_median: 64.0,
            output_median: 24.0,
            long_prompts: [(500, 128), (1000, 256)],
            decode_load: (32, 48),
            long_every_s: 4.0,
            decode_load_s: if quick { 8.0 } else { 20.0 },
            load_fractions: if quick { &[0.5, 0.9] } else { &[0.3, 0.6, 0.9] },
            budgets: if quick { &[64, 256, 1024] } else { &[64, 128, 256, 512, 1024] },
            prefill_caps: &[64, 256, 1024],
            max_model_len: 4096,
        }
    }
}

/// Runs a workload under a scheduler config: on the simulator or on the real CPU backend.
pub trait Runner {
    fn run(&mut self, cfg: &SchedulerConfig, items: &[WorkItem])
        -> anyhow::Result<(Metrics, crate::engine::RunReport)>;
}

/// The simulator with a cost model.
#[derive(Debug, Clone)]
pub struct SimRunner<C>(pub C);

impl<C: CostModel + Clone> Runner for SimRunner<C> {
    fn run(
        &mut self,
        cfg: &SchedulerConfig,
        items: &[WorkItem],
    ) -> anyhow::Result<(Metrics, crate::engine::RunReport)> {
        simulate(cfg, self.0.clone(), items, false, SLO)
    }
}

/// The real model on the CPU backend, wall clock.
#[derive(Debug)]
pub struct CpuRunner<'a> {
    pub lm: &'a crate::generate::LoadedModel,
    pub threads: usize,
}

impl Runner for CpuRunner<'_> {
    fn run(
        &mut self,
        cfg: &SchedulerConfig,
        items: &[WorkItem],
    ) -> anyhow::Result<(Metrics, crate::engine::RunReport)> {
        let r = run_cpu(self.lm, cfg, items, self.threads)?;
        let m = real_metrics(&r);
        Ok((m, r))
    }
}

/// A model on the CUDA backend, wall clock: one backend (its weights stay on the device) for
/// every run, each run with a fresh scheduler over the blocks the device holds.
#[derive(Debug)]
pub struct CudaRunner<'a> {
    pub lm: &'a crate::generate::LoadedModel,
    pub backend: crate::backends::cuda::model::CudaBackend,
}

impl Runner for CudaRunner<'_> {
    fn run(
        &mut self,
        cfg: &SchedulerConfig,
        items: &[WorkItem],
    ) -> anyhow::Result<(Metrics, crate::engine::RunReport)> {
        let cfg = SchedulerConfig { num_gpu_blocks: cfg.num_gpu_blocks.min(self.backend.num_blocks()), ..cfg.clone() };
        let r = run_real(self.lm, &cfg, items, &mut self.backend)?;
        let m = real_metrics(&r);
        Ok((m, r))
    }
}

/// A real run's metrics under the experiments' SLOs.
pub(crate) fn real_metrics(r: &crate::engine::RunReport) -> Metrics {
    crate::study::sim::metrics(&r.outcomes, r.rejected.len(), &r.itl, r.num_steps, SLO.0, SLO.1)
}

/// Mean step time of a run, seconds.
pub(crate) fn mean_step_s(steps: &[crate::engine::steplog::StepRecord]) -> f64 {
    steps.iter().map(|s| s.duration).sum::<f64>() / steps.len().max(1) as f64
}

fn base_cfg(kv_tokens: usize, max_model_len: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens: 8192,
        max_num_seqs: 256,
        max_model_len,
        block_size: 16,
        num_gpu_blocks: kv_tokens / 16 + 1,
        ..Default::default()
    }
}

/// SLOs used for goodput: 1 s to first token, 100 ms per output token.
pub const SLO: (f64, f64) = (1.0, 0.1);

pub(crate) fn row(setting: String, x: f64, m: Metrics) -> Row {
    Row { setting, x, metrics: m, extra: Default::default() }
}

/// Runs one experiment through `runner`.
pub fn run(name: &str, runner: &mut dyn Runner, kv_tokens: usize, scale: Scale) -> anyhow::Result<Table> {
    let n = scale.requests;
    let chat = |rate: f64, seed: u64| Workload {
        num_requests: n,
        rate,
        burstiness: 1.0,
        prompt: Lengths::LogNormal { median: scale.prompt_median, sigma: 0.8 },
        output: Lengths::LogNormal { median: scale.output_median, sigma: 0.7 },
        seed,
    };
    let cfg = base_cfg(kv_tokens, scale.max_model_len);
    Ok(match name {
        "batch-size" => {
            // Throughput offline (everything queued at once); latency online at 70% of the
            // offline capacity of the default budget.
            let offline = chat(f64::INFINITY, 1).items();
            let online = chat(capacity_rate(runner, &cfg, &scale) * 0.7, 1).items();
            let mut rows = Vec::new();
            for (label, items) in [("offline", &offline), ("online 70%", &online)] {
                for &b in scale.budgets {
                    let c = SchedulerConfig { max_num_batched_tokens: b, ..cfg.clone() };
                    rows.push(row(format!("{label}, budget {b}"), b as f64, runner.run(&c, items)?.0));
                }
            }
            let (off, on) = rows.split_at(scale.budgets.len());
            let by = |f: fn(&Metrics) -> f64| move |a: &&Row, b: &&Row| f(&a.metrics).total_cmp(&f(&b.metrics));
            let best_tp = off.iter().max_by(by(|m| m.output_tokens_per_s)).unwrap();
            let worst_tp = off.iter().min_by(by(|m| m.output_tokens_per_s)).unwrap();
            let best_lat = on.iter().min_by(by(|m| m.e2e.mean)).unwrap();
            let best_ttft = on.iter().min_by(by(|m| m.ttft.mean)).unwrap();
            let best_tpot = on.iter().min_by(by(|m| m.tpot.p99)).unwrap();
            let findings = vec![
                format!(
                    "best for throughput: {} ({:.0} output tok/s; {:.2}x the worst, {})",
                    best_tp.setting,
                    best_tp.metrics.output_tokens_per_s,
                    best_tp.metrics.output_tokens_per_s / worst_tp.metrics.output_tokens_per_s,
                    worst_tp.setting
                ),
                format!("best for mean end-to-end latency: {} ({:.2} s)", best_lat.setting, best_lat.metrics.e2e.mean),
                format!("best for mean TTFT: {} ({:.0} ms)", best_ttft.setting, best_ttft.metrics.ttft.mean * 1e3),
                format!("best for p99 TPOT: {} ({:.1} ms)", best_tpot.setting, best_tpot.metrics.tpot.p99 * 1e3),
            ];
            Table {
                name: name.into(),
                description: format!(
                    "Token budget per step. Chat-like requests (lognormal prompts median {}, outputs median {}): {n} queued at once (offline throughput), and the same lengths arriving as a Poisson stream at 70% of capacity (online latency).",
                    scale.prompt_median, scale.output_median
                ),
                rows,
                findings,
            }
        }
        "prefill-cap" => {
            let items = chat(capacity_rate(runner, &cfg, &scale), 2).items();
            let mut rows = Vec::new();
            for &cap in scale.prefill_caps {
                let c = SchedulerConfig { max_prefill_tokens_per_step: cap, ..cfg.clone() };
                rows.push(row(format!("prefill cap {cap}"), cap as f64, runner.run(&c, &items)?.0));
            }
            let f = |r: &Row| {
                format!(
                    "{}: TTFT mean {:.3} s, p99 TPOT {:.1} ms, {:.0} tok/s",
                    r.setting,
                    r.metrics.ttft.mean,
                    r.metrics.tpot.p99 * 1e3,
                    r.metrics.output_tokens_per_s
                )
            };
            Table {
                name: name.into(),
                description: "Cap on prefill tokens per step (budget 8192), same load as batch-size.".into(),
                findings: rows.iter().map(f).collect(),
                rows,
            }
        }
        "chunked-prefill" => {
            let mut rows = Vec::new();
            let mut findings = Vec::new();
            for (long, chunk) in scale.long_prompts {
                // Steady decode load: short prompts, long outputs; a long prompt at a fixed interval.
                let dur = scale.decode_load_s;
                let mut items = Workload {
                    num_requests: n,
                    rate: n as f64 / dur,
                    burstiness: 1.0,
                    prompt: Lengths::Fixed(scale.decode_load.0),
                    output: Lengths::Fixed(scale.decode_load.1),
                    seed: 3,
                }
                .items();
                let longs: Vec<WorkItem> = (0..(dur / scale.long_every_s) as usize)
                    .map(|i| WorkItem {
                        arrival_s: 1.0 + scale.long_every_s * i as f64,
                        prompt_len: long,
                        output_len: 16,
                    })
                    .collect();
                items.extend(longs);
                items.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
                for chunked in [false, true] {
                    let c = SchedulerConfig {
                        max_num_batched_tokens: if chunked { chunk } else { long.max(8192) },
                        enable_chunked_prefill: chunked,
                        ..cfg.clone()
                    };
                    let (m, rep) = runner.run(&c, &items)?;
                    let long_ttft: Vec<f64> =
                        rep.outcomes.iter().filter(|o| o.num_prompt_tokens == long).filter_map(|o| o.ttft()).collect();
                    let short_tpot: Vec<f64> =
                        rep.outcomes.iter().filter(|o| o.num_prompt_tokens != long).filter_map(|o| o.tpot()).collect();
                    let lt = crate::study::sim::Dist::of(&long_ttft);
                    let st = crate::study::sim::Dist::of(&short_tpot);
                    let label = format!(
                        "prompt {long}, {}",
                        if chunked { format!("chunked ({chunk})") } else { "not chunked".into() }
                    );
                    let mut r = row(label.clone(), long as f64, m);
                    r.extra.insert("long_prompt_ttft_mean_s".into(), lt.mean.into());
                    r.extra.insert("decode_tpot_p99_s".into(), st.p99.into());
                    r.extra.insert("decode_itl_p99_s".into(), r.metrics.itl.p99.into());
                    let itl_max = rep.itl.iter().copied().fold(0.0, f64::max);
                    r.extra.insert("itl_max_s".into(), itl_max.into());
                    findings.push(format!(
                        "{label}: long-prompt TTFT {:.0} ms, decode p99 TPOT {:.1} ms, inter-token latency p99 {:.1} ms / max {:.1} ms, {:.0} output tok/s",
                        lt.mean * 1e3,
                        st.p99 * 1e3,
                        r.metrics.itl.p99 * 1e3,
                        itl_max * 1e3,
                        r.metrics.output_tokens_per_s
                    ));
                    rows.push(r);
                }
            }
            let [(l1, c1), (l2, c2)] = scale.long_prompts;
            let description = format!(
                "Long prompts ({l1} with chunk {c1}; {l2} with chunk {c2}) every {} s under a steady decode load (prompt {}, output {}), chunked vs not.",
                scale.long_every_s, scale.decode_load.0, scale.decode_load.1
            );
            Table { name: name.into(), description, rows, findings }
        }
        "static-vs-continuous" => {
            let items = chat(capacity_rate(runner, &cfg, &scale) * 0.8, 4).items();
            let mut rows = Vec::new();
            for (label, p) in [("static", PolicyKind::Static), ("continuous", PolicyKind::Fcfs)] {
                let c = SchedulerConfig { policy: p, ..cfg.clone() };
                rows.push(row(label.into(), rows.len() as f64, runner.run(&c, &items)?.0));
            }
            let (s, c) = (&rows[0].metrics, &rows[1].metrics);
            let findings = vec![
                format!(
                    "continuous / static throughput: {:.2}x ({:.0} vs {:.0} output tok/s)",
                    c.output_tokens_per_s / s.output_tokens_per_s,
                    c.output_tokens_per_s,
                    s.output_tokens_per_s
                ),
                format!(
                    "static / continuous mean latency: {:.2}x ({:.2} s vs {:.2} s)",
                    s.e2e.mean / c.e2e.mean,
                    s.e2e.mean,
                    c.e2e.mean
                ),
                format!(
                    "static / continuous mean TTFT: {:.2}x ({:.2} s vs {:.2} s)",
                    s.ttft.mean / c.ttft.mean,
                    s.ttft.mean,
                    c.ttft.mean
                ),
            ];
            Table { name: name.into(), description: "The same chat-like load (80% of continuous batching's capacity) under static and continuous batching.".into(), rows, findings }
        }
        "adaptive" => {
            let cap = capacity_rate(runner, &cfg, &scale);
            let mut rows = Vec::new();
            let mut findings = Vec::new();
            for &frac in scale.load_fractions {
                let items = chat(cap * frac, 5).items();
                for (label, c) in [
                    ("fixed 512, chunked", SchedulerConfig { max_num_batched_tokens: 512, ..cfg.clone() }),
                    ("fixed 8192, chunked", cfg.clone()),
                    ("fixed 8192, no chunking", SchedulerConfig { enable_chunked_prefill: false, ..cfg.clone() }),
                    ("adaptive", SchedulerConfig { policy: PolicyKind::Adaptive, ..cfg.clone() }),
                ] {
                    let m = runner.run(&c, &items)?.0;
                    findings.push(format!(
                        "{:.0}% load, {label}: mean e2e {:.2} s, TTFT {:.3} s, goodput {:.2} req/s",
                        frac * 100.0,
                        m.e2e.mean,
                        m.ttft.mean,
                        m.goodput_rps
                    ));
                    rows.push(row(format!("{label} @ {:.0}%", frac * 100.0), frac * cap, m));
                }
            }
            Table { name: name.into(), description: "Adaptive policy (small budget, whole prompts at low load; large budget with chunking at high load) against fixed settings over a sweep of arrival rates (fraction of capacity).".into(), rows, findings }
        }
        other => anyhow::bail!("unknown experiment {other:?}; known: {}", NAMES.join(", ")),
    })
}

/// Arrival rate (req/s) near the system's saturation for the chat workload: requests all at
/// once give the peak request throughput.
fn capacity_rate(runner: &mut dyn Runner, cfg: &SchedulerConfig, scale: &Scale) -> f64 {
    let items = Workload {
        num_requests: scale.requests.min(2000),
        rate: f64::INFINITY,
        burstiness: 1.0,
        prompt: Lengths::LogNormal { median: scale.prompt_median, sigma: 0.8 },
        output: Lengths::LogNormal { median: scale.output_median, sigma: 0.7 },
        seed: 9,
    }
    .items();
    runner.run(cfg, &items).map(|r| r.0.requests_per_s * 0.9).unwrap_or(1.0)
}

pub fn markdown(t: &Table) -> String {
    let mut s = format!("### {}\n\n{}\n\n", t.name, t.description);
    s += "| setting | req/s | output tok/s | TTFT mean (s) | TTFT p99 (s) | TPOT mean (ms) | TPOT p99 (ms) | ITL p99 (ms) | e2e mean (s) | goodput (req/s) | preemptions |";
    let extra_keys: Vec<String> = t.rows.first().map(|r| r.extra.keys().cloned().collect()).unwrap_or_default();
    for k in &extra_keys {
        s += &format!(" {k} |");
    }
    s += "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";
    s += &"---:|".repeat(extra_keys.len());
    s += "\n";
    for r in &t.rows {
        let m = &r.metrics;
        s += &format!(
            "| {} | {:.2} | {:.0} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {} |",
            r.setting,
            m.requests_per_s,
            m.output_tokens_per_s,
            m.ttft.mean,
            m.ttft.p99,
            m.tpot.mean * 1e3,
            m.tpot.p99 * 1e3,
            m.itl.p99 * 1e3,
            m.e2e.mean,
            m.goodput_rps,
            m.preemptions
        );
        for k in &extra_keys {
            s += &format!(" {:.4} |", r.extra[k].as_f64().unwrap_or(f64::NAN));
        }
        s += "\n";
    }
    s += "\n";
    for f in &t.findings {
        s += &format!("- {f}\n");
    }
    s
}

pub fn csv(t: &Table) -> String {
    let mut s = String::from("setting,x,requests_per_s,output_tokens_per_s,ttft_mean_s,ttft_p99_s,tpot_mean_s,tpot_p99_s,itl_p99_s,e2e_mean_s,goodput_rps,preemptions\n");
    for r in &t.rows {
        let m = &r.metrics;
        s += &format!(
            "\"{}\",{},{},{},{},{},{},{},{},{},{},{}\n",
            r.setting,
            r.x,
            m.requests_per_s,
            m.output_tokens_per_s,
            m.ttft.mean,
            m.ttft.p99,
            m.tpot.mean,
            m.tpot.p99,
            m.itl.p99,
            m.e2e.mean,
            m.goodput_rps,
            m.preemptions
        );
    }
    s
}

/// Writes table.md, table.csv, table.json and plot.svg into `dir`.
pub fn write(t: &Table, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("table.md"), markdown(t))?;
    std::fs::write(dir.join("table.csv"), csv(t))?;
    std::fs::write(dir.join("table.json"), serde_json::to_string_pretty(t)?)?;
    let tput: Vec<(f64, f64)> =
        t.rows.iter().enumerate().map(|(i, r)| (i as f64, r.metrics.output_tokens_per_s)).collect();
    let ttft: Vec<(f64, f64)> = t.rows.iter().enumerate().map(|(i, r)| (i as f64, r.metrics.ttft.mean * 1e3)).collect();
    let tpot: Vec<(f64, f64)> = t.rows.iter().enumerate().map(|(i, r)| (i as f64, r.metrics.tpot.p99 * 1e3)).collect();
    let svg = plot::lines_svg(
        &format!("{}: rows 0..{} (see table.md)", t.name, t.rows.len().saturating_sub(1)),
        "row",
        "",
        &[("output tok/s".into(), tput), ("TTFT mean (ms)".into(), ttft), ("TPOT p99 (ms)".into(), tpot)],
    )?;
    plot::write(&svg, &dir.join("plot.svg"))?;
    Ok(())
}

/// One real CPU-backend run of `items` (arrivals on the wall clock, synthetic token ids).
pub fn run_cpu(
    lm: &crate::generate::LoadedModel,
    cfg: &SchedulerConfig,
    items: &[WorkItem],
    threads: usize,
) -> anyhow::Result<crate::engine::RunReport> {
    let backend = crate::backends::cpu::CpuBackend::for_sched(lm.model.clone(), cfg, threads, 0)?;
    run_real(lm, cfg, items, backend)
}

/// One real run of `items` on `backend` (arrivals on the wall clock, synthetic token ids
/// spread over the vocabulary).
pub fn run_real<B: crate::engine::Backend>(
    lm: &crate::generate::LoadedModel,
    cfg: &SchedulerConfig,
    items: &[WorkItem],
    backend: B,
) -> anyhow::Result<crate::engine::RunReport> {
    let mut engine = crate::engine::Engine::new(
        weave_scheduler::Scheduler::new(cfg.clone())?,
        backend,
        crate::engine::Clock::Seconds,
    );
    engine.collect_itl = true;
    let vocab = lm.model.cfg.vocab_size as u32;
    let mut arrivals = crate::study::sim::arrivals(items);
    for a in &mut arrivals {
        for t in &mut a.request.prompt {
            *t = 1000 + (t.wrapping_mul(2_654_435_761) % (vocab - 1000)); // spread over the vocabulary
        }
    }
    engine.run(arrivals, &mut |_, _| false, &mut |_| {})
}

/// What [`crate::study::sim_vs_real::sim_vs_real`] produces: the table, the step logs of the (median) real runs and of
/// the simulations, named `<workload>-real` / `<workload>-sim-<model>`, and the profile
/// used for each workload.
#[derive(Debug)]
pub struct SimVsReal {
    pub table: Table,
    pub logs: Vec<(String, Vec<crate::engine::steplog::StepRecord>)>,
    pub profiles: Vec<(String, crate::study::profile::Profiled)>,
    /// A compact markdown table of the errors (empty if the experiment has none).
    pub summary: String,
}

impl SimVsReal {
    /// Writes the table (see [`write()`]), `profile-<workload>.json`, and `steps-<name>.jsonl`
    /// per log.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write(&self.table, dir)?;
        if !self.summary.is_empty() {
            std::fs::write(dir.join("summary.md"), &self.summary)?;
        }
        for (key, p) in &self.profiles {
            std::fs::write(dir.join(format!("profile-{key}.json")), serde_json::to_string_pretty(p)?)?;
        }
        for (name, steps) in &self.logs {
            let mut text = String::new();
            for s in steps {
                text += &serde_json::to_string(s)?;
                text.push('\n');
            }
            std::fs::write(dir.join(format!("steps-{name}.jsonl")), text)?;
        }
        Ok(())
    }
}

/// A measured step for [`refit_roofline`]: tokens, sampled rows, each sequence's
/// `(query rows, context)`, seconds.
pub type MeasuredStep = (f64, f64, Vec<(f64, f64)>, f64);

/// The roofline's efficiencies re-fitted to measured steps (`(tokens, sampled, seqs, seconds)`,
/// each seq `(query rows, context)`): MFU and MBU by a grid over 0.02..1, the overhead as the
/// median of what is left; the fit minimises the median relative error.
pub fn refit_roofline(
    base: &crate::study::sim::Roofline,
    points: &[MeasuredStep],
) -> (crate::study::sim::Roofline, f64) {
    let mut best = (base.clone(), f64::INFINITY);
    if points.is_empty() {
        return best;
    }
    let grid: Vec<f64> = (1..=50).map(|i| i as f64 * 0.02).collect();
    for &mfu in &grid {
        for &mbu in &grid {
            let r0 = crate::study::sim::Roofline { mfu, mbu, overhead_s: 0.0, ..base.clone() };
            let bare: Vec<f64> = points.iter().map(|(n, s, seqs, _)| r0.time(*n, *s, seqs.iter().copied())).collect();
            let left: Vec<f64> = points.iter().zip(&bare).map(|(p, b)| p.3 - b).collect();
            let overhead = crate::study::bench::median(&left).max(0.0);
            let errs: Vec<f64> = points.iter().zip(&bare).map(|(p, b)| ((b + overhead - p.3) / p.3).abs()).collect();
            let e = crate::study::bench::median(&errs);
            if e < best.1 {
                best = (crate::study::sim::Roofline { overhead_s: overhead, ..r0 }, e);
            }
        }
    }
    best
}

/// The simulator against a model on the GPU (`--backend cuda`): a step-time profile measured on
/// the device from designed batches, the datasheet roofline (`gpu`'s figures at the default
/// efficiencies) and the roofline re-fitted to the profile's points each predict three
/// held-out workloads, which then run for real. The table compares mean step time, mean TTFT
/// and p99 inter-token latency.
pub fn sim_vs_real_gpu(
    lm: &crate::generate::LoadedModel,
    backend: &mut crate::backends::cuda::model::CudaBackend,
    gpu: crate::study::sim::GpuProfile,
    model: crate::study::sim::ModelProfile,
    quick: bool,
) -> anyhow::Result<SimVsReal> {
    let n = if quick { 64 } else { 200 };
    let blocks = backend.num_blocks();
    let max_model_len = backend.max_model_len();
    let cfg = |budget: usize| SchedulerConfig {
        max_num_batched_tokens: budget,
        max_num_seqs: 256,
        max_model_len,
        block_size: 16,
        num_gpu_blocks: blocks,
        ..Default::default()
    };
    let spec = crate::study::profile::ProfileSpec {
        max_tokens: if quick { 2048 } else { 8192 },
        max_seqs: if quick { 64 } else { 256 },
        max_context: if quick { 2048 } else { 4096 },
        block_size: 16,
        repeats: 3,
        threads: 1,
    };
    let (profiled, report) = crate::study::profile::profile_cuda(backend, &spec, &mut |_, _| {})?;
    let mut findings = vec![format!("profile: {}", crate::study::profile::describe(&profiled, &report))];
    let datasheet = crate::study::sim::Roofline::new(gpu, model);
    let points: Vec<MeasuredStep> = report
        .points
        .iter()
        .map(|p| {
            let per = p.rows as f64 / p.seqs.max(1) as f64;
            (p.rows as f64, p.sampled as f64, vec![(per, p.context as f64); p.seqs.max(1)], p.measured_s)
        })
        .collect();
    let (refit, refit_err) = refit_roofline(&datasheet, &points);
    findings.push(format!(
        "roofline re-fitted to the profile's {} points: MFU {:.2}, MBU {:.2}, overhead {:.2} ms (datasheet defaults 0.60, 0.80, 2.00 ms); median error on the points {:.1}%",
        points.len(),
        refit.mfu,
        refit.mbu,
        refit.overhead_s * 1e3,
        refit_err * 100.0
    ));
    let held = [
        (
            "A: Poisson 8 req/s, chat lengths, budget 2048",
            2048,
            Workload {
                num_requests: n,
                rate: 8.0,
                burstiness: 1.0,
                prompt: Lengths::LogNormal { median: 512.0, sigma: 0.6 },
                output: Lengths::Uniform(64, 256),
                seed: 31,
            },
        ),
        (
            "B: bursty 16 req/s, long prompts, budget 8192",
            8192,
            Workload {
                num_requests: n,
                rate: 16.0,
                burstiness: 0.5,
                prompt: Lengths::Uniform(1000, 3000),
                output: Lengths::Uniform(32, 128),
                seed: 32,
            },
        ),
        (
            "C: decode-heavy 8 req/s, budget 1024",
            1024,
            Workload {
                num_requests: n,
                rate: 8.0,
                burstiness: 1.0,
                prompt: Lengths::LogNormal { median: 128.0, sigma: 0.5 },
                output: Lengths::Uniform(200, 400),
                seed: 33,
            },
        ),
    ];
    let (mut rows, mut logs) = (Vec::new(), Vec::new());
    for (key, (label, budget, w)) in ["a", "b", "c"].into_iter().zip(held) {
        let items = w.items();
        let r = run_real(lm, &cfg(budget), &items, &mut *backend)?;
        let real_m = real_metrics(&r);
        let rs = mean_step_s(&r.steps);
        logs.push((format!("{key}-real"), r.steps));
        let mut row_real = row(format!("{label} (real)"), budget as f64, real_m.clone());
        row_real.extra.insert("mean_step_s".into(), rs.into());
        rows.push(row_real);
        let mut one = |kind: &str, sim: anyhow::Result<(Metrics, crate::engine::RunReport)>| -> anyhow::Result<()> {
            let (sim_m, sim) = sim?;
            let ss = mean_step_s(&sim.steps);
            let err = |a: f64, b: f64| if b > 0.0 { (a - b) / b } else { 0.0 };
            let (step_err, ttft_err, itl_err) =
                (err(ss, rs), err(sim_m.ttft.mean, real_m.ttft.mean), err(sim_m.itl.p99, real_m.itl.p99));
            findings.push(format!(
                "{label}, {kind}: mean step {:.2} ms real vs {:.2} simulated ({:+.1}%); mean TTFT {:.0} vs {:.0} ms ({:+.1}%); p99 ITL {:.1} vs {:.1} ms ({:+.1}%)",
                rs * 1e3,
                ss * 1e3,
                step_err * 100.0,
                real_m.ttft.mean * 1e3,
                sim_m.ttft.mean * 1e3,
                ttft_err * 100.0,
                real_m.itl.p99 * 1e3,
                sim_m.itl.p99 * 1e3,
                itl_err * 100.0
            ));
            logs.push((format!("{key}-sim-{}", kind.replace(' ', "-")), sim.steps));
            let mut r = row(format!("{label} (simulated, {kind})"), budget as f64, sim_m);
            r.extra.insert("mean_step_s".into(), ss.into());
            r.extra.insert("step_time_error".into(), step_err.into());
            r.extra.insert("ttft_error".into(), ttft_err.into());
            r.extra.insert("itl_p99_error".into(), itl_err.into());
            rows.push(r);
            Ok(())
        };
        one("profiled", simulate(&cfg(budget), MeasuredCost::Profiled(profiled.clone()), &items, true, SLO))?;
        one("datasheet roofline", simulate(&cfg(budget), datasheet.clone(), &items, true, SLO))?;
        one("re-fitted roofline", simulate(&cfg(budget), refit.clone(), &items, true, SLO))?;
    }
    let table = Table {
        name: "sim-vs-real".into(),
        description: format!(
            "The simulator predicting held-out workloads on the GPU ({}, {} requests each), with the step-time model profiled there from designed batches, the datasheet roofline ({}), and the roofline re-fitted to the profile's points.",
            backend.describe(),
            n,
            gpu.name
        ),
        rows,
        findings,
    };
    Ok(SimVsReal { table, logs, profiles: vec![("gpu".into(), profiled)], summary: String::new() })
}

#[cfg(test)]
mod refit_tests {
    use super::*;
    use crate::study::sim::{find_gpu, find_model, CostModel, Roofline};

    #[test]
    fn refitting_recovers_the_efficiencies_that_made_the_points() {
        let base = Roofline::new(find_gpu("h200").unwrap(), find_model("llama-3-8b").unwrap());
        let truth = Roofline { mfu: 0.4, mbu: 0.7, overhead_s: 0.001, ..base.clone() };
        // Decode steps (bandwidth-bound) and prefill steps (compute-bound), so both show.
        let mut points = Vec::new();
        for (seqs, q, c) in [
            (1usize, 1.0, 512.0),
            (64, 1.0, 2048.0),
            (256, 1.0, 1024.0),
            (1, 4096.0, 0.0),
            (4, 2048.0, 0.0),
            (8, 512.0, 512.0),
        ] {
            let shapes = vec![(q, c); seqs];
            let t = truth.time(q * seqs as f64, seqs as f64, shapes.iter().copied());
            points.push((q * seqs as f64, seqs as f64, shapes, t));
        }
        let (fit, err) = refit_roofline(&base, &points);
        assert!(err < 0.01, "median error {err}");
        assert!((fit.mfu - 0.4).abs() < 0.03 && (fit.mbu - 0.7).abs() < 0.03, "{fit:?}");
        assert!((fit.overhead_s - 0.001).abs() < 3e-4, "{}", fit.overhead_s);
    }
}
