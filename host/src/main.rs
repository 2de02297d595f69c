//! The `weave` command line: a thin layer over the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use weave::engine::Event;

#[derive(Debug, Parser)]
#[command(name = "weave", version, about = "Continuous-batching LLM inference engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Scheduler knobs shared by the commands that run a model.
#[derive(Debug, Clone, clap::Args)]
struct SchedArgs {
    /// Token budget per step (prefill chunk tokens + one per decode).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Cap on one request's prefill chunk per step (0 = none).
    #[arg(long, default_value_t = 0)]
    long_prefill_token_threshold: usize,
    #[arg(long)]
    no_chunked_prefill: bool,
    #[arg(long)]
    no_prefix_caching: bool,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// KV-cache size in tokens (default 16384; see also --kv-cache-gib).
    #[arg(long)]
    kv_cache_tokens: Option<usize>,
    /// KV-cache size in GiB of memory, instead of --kv-cache-tokens.
    #[arg(long, conflicts_with = "kv_cache_tokens")]
    kv_cache_gib: Option<f64>,
    /// Context limit (default: the model's).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Batching policy: fcfs, priority, static, adaptive.
    #[arg(long, default_value = "fcfs")]
    policy: weave_scheduler::PolicyKind,
}

impl SchedArgs {
    fn config(&self, model: &weave::model::config::ModelConfig) -> anyhow::Result<weave_scheduler::SchedulerConfig> {
        let tokens = match (self.kv_cache_tokens, self.kv_cache_gib) {
            (Some(t), _) => t,
            (None, Some(g)) => {
                (g * (1u64 << 30) as f64 / weave::cpu::CpuBackend::kv_bytes_per_token(model) as f64) as usize
            }
            (None, None) => 16384,
        };
        let blocks = tokens / self.block_size;
        anyhow::ensure!(blocks >= 1, "--kv-cache-tokens {tokens} holds no block of {} tokens", self.block_size);
        let max_model_len = self.max_model_len.unwrap_or(model.context_length);
        anyhow::ensure!(
            max_model_len <= model.context_length,
            "--max-model-len {max_model_len} is over the model's context length {}",
            model.context_length
        );
        Ok(weave_scheduler::SchedulerConfig {
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_num_seqs: self.max_num_seqs,
            max_model_len,
            block_size: self.block_size,
            num_gpu_blocks: blocks + 1,
            enable_chunked_prefill: !self.no_chunked_prefill,
            long_prefill_token_threshold: self.long_prefill_token_threshold,
            enable_prefix_caching: !self.no_prefix_caching,
            policy: self.policy,
            ..Default::default()
        })
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Aggregate generation throughput at several concurrency levels (CPU backend), with
    /// llama.cpp's llama-batched-bench on the same GGUF and thread count as the baseline.
    Generate {
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        concurrency: Vec<usize>,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 128)]
        output_len: usize,
        #[arg(long, default_value_t = default_threads())]
        threads: usize,
        #[arg(long, default_value_t = 2048)]
        max_num_batched_tokens: usize,
        /// cpu, cuda or auto (see `weave generate --help`).
        #[arg(long, default_value = "auto")]
        device: String,
        /// Path to llama.cpp's llama-batched-bench, to measure the baseline in the same run.
        #[arg(long)]
        llama_batched_bench: Option<PathBuf>,
        /// Repetitions (interleaved with llama.cpp's); medians are reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[arg(long)]
        json: bool,
    },
}

/// Cost model and workload options of the simulator.
#[derive(Debug, Clone, clap::Args)]
struct SimArgs {
    /// GPU profile for the roofline cost model: a100-80gb, h100-sxm, h200.
    #[arg(long, default_value = "h100-sxm")]
    gpu: String,
    /// Model profile (llama-3-8b, llama-2-7b, mistral-7b, smollm2-135m) or a JSON profile file.
    #[arg(long, default_value = "llama-3-8b")]
    model_profile: String,
    /// A fitted cost model from `weave calibrate` instead of the roofline.
    #[arg(long)]
    cost_model: Option<PathBuf>,
    /// KV cache size in tokens (default: what fits the GPU's memory after the weights, at 90%).
    #[arg(long)]
    kv_cache_tokens: Option<usize>,
}

enum Cost {
    Roofline(weave::sim::Roofline),
    Measured(weave::profile::MeasuredCost),
}

impl SimArgs {
    fn cost(&self) -> anyhow::Result<(Cost, usize)> {
        if let Some(p) = &self.cost_model {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read cost model {}", p.display()))?;
            let f: weave::profile::MeasuredCost = serde_json::from_str(&text).with_context(|| {
                format!("{}: not a cost model from `weave calibrate` (profiled or fitted)", p.display())
            })?;
            return Ok((Cost::Measured(f), self.kv_cache_tokens.unwrap_or(16384)));
        }
        let gpu = weave::sim::find_gpu(&self.gpu).map_err(anyhow::Error::msg)?;
        let model = weave::sim::find_model(&self.model_profile).map_err(anyhow::Error::msg)?;
        let weights_gb = (model.layer_params() + (2 * model.hidden * model.vocab) as f64) * model.dtype_bytes / 1e9;
        let free = (gpu.mem_gb * 0.9 - weights_gb).max(0.5) * 1e9;
        let kv = self.kv_cache_tokens.unwrap_or((free / model.kv_bytes_per_token()) as usize);
        Ok((Cost::Roofline(weave::sim::Roofline::new(gpu, model)), kv))
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Summarise, compare, plot and export step logs (from replay, generate or simulate).
    Analyze {
        /// Step logs (JSONL); several are compared side by side.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// Composition plot (.svg or .png).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Chrome/Perfetto trace of the first log.
        #[arg(long)]
        trace: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Simulate serving: the real scheduler and block manager with a step-time cost model.
    Simulate {
        #[command(flatten)]
        sim: SimArgs,
        #[arg(long, default_value_t = 1000)]
        num_requests: usize,
        /// Arrival rate (requests/s); 0 = all at once.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Gamma shape of inter-arrival times (1 = Poisson, < 1 burstier).
        #[arg(long, default_value_t = 1.0)]
        burstiness: f64,
        /// Prompt lengths: N, uniform:A:B or lognormal:MEDIAN:SIGMA.
        #[arg(long, default_value = "lognormal:512:0.8")]
        prompt_len: weave::sim::Lengths,
        #[arg(long, default_value = "lognormal:200:0.7")]
        output_len: weave::sim::Lengths,
        /// JSONL workload trace (arrival_s, prompt_len, output_len) instead of the generator.
        #[arg(long)]
        workload: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 8192)]
        max_num_batched_tokens: usize,
        #[arg(long, default_value_t = 256)]
        max_num_seqs: usize,
        #[arg(long, default_value_t = 8192)]
        max_model_len: usize,
        #[arg(long)]
        no_chunked_prefill: bool,
        #[arg(long, default_value_t = 0)]
        long_prefill_token_threshold: usize,
        #[arg(long, default_value_t = 0)]
        max_prefill_tokens_per_step: usize,
        #[arg(long, default_value = "fcfs")]
        policy: weave_scheduler::PolicyKind,
        /// TTFT SLO for goodput, seconds.
        #[arg(long, default_value_t = 1.0)]
        slo_ttft: f64,
        /// TPOT SLO for goodput, seconds.
        #[arg(long, default_value_t = 0.1)]
        slo_tpot: f64,
        #[arg(long)]
        step_log: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Measure a step-time cost model for `weave simulate --cost-model`: `--profile` times
    /// designed batches on the real CPU backend (recommended); otherwise a model is fitted to
    /// measured step logs (e.g. `weave generate --step-log`).
    Calibrate {
        /// Step logs to fit (without --profile).
        #[arg(required_unless_present = "profile", conflicts_with = "profile")]
        logs: Vec<PathBuf>,
        /// Profile the real CPU backend with the reference model (or --model).
        #[arg(long)]
        profile: bool,
        #[arg(long)]
        model: Option<PathBuf>,
        /// Profile: the largest step in tokens (the largest budget you will simulate).
        #[arg(long, default_value_t = 1024)]
        max_tokens: usize,
        /// Profile: the most sampled rows per step (the largest max_num_seqs you will simulate).
        #[arg(long, default_value_t = 32)]
        max_seqs: usize,
        /// Profile: the longest cached context in the attention points.
        #[arg(long, default_value_t = 1024)]
        max_context: usize,
        /// Profile: timings per point (the median is kept).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Profile: also write every measured point with the model's prediction (JSON).
        #[arg(long, requires = "profile")]
        points: Option<PathBuf>,
        /// Where to write the model (JSON) for `weave simulate --cost-model`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a tuning experiment on the simulator: batch-size, prefill-cap, chunked-prefill,
    /// static-vs-continuous, adaptive, or all; or sim-vs-real (the simulator checked against
    /// the real CPU backend with the reference model).
    Experiment {
        name: String,
        #[command(flatten)]
        sim: SimArgs,
        /// Requests per run (simulator: 2000, --quick 400; cpu: 24, --quick 6).
        #[arg(long)]
        num_requests: Option<usize>,
        #[arg(long)]
        quick: bool,
        /// sim (the GPU profile's cost model) or cpu (the real reference model on this
        /// machine, at small sizes).
        #[arg(long, default_value = "sim")]
        backend: String,
        /// Output directory (one sub-directory per experiment).
        #[arg(long, default_value = "docs/experiments")]
        out: PathBuf,
    },
    /// Benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Generate text with the real model (CPU backend), many requests batched continuously.
    Generate {
        /// GGUF model (default: the reference model fetched by `cargo xtask fetch-model`).
        #[arg(long)]
        model: Option<PathBuf>,
        /// A prompt (repeatable).
        #[arg(long)]
        prompt: Vec<String>,
        /// One prompt per line, or JSONL with per-request fields (prompt, max_tokens,
        /// temperature, top_k, top_p, seed, stop, stop_token_ids, ignore_eos, id).
        #[arg(long)]
        prompts_file: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Base seed; request i uses seed + i unless it brings its own.
        #[arg(long)]
        seed: Option<u64>,
        /// Stop string (repeatable), applied to every request.
        #[arg(long)]
        stop: Vec<String>,
        /// Apply the model's chat template to each prompt.
        #[arg(long)]
        chat: bool,
        /// Keep generating past EOS (for benchmarks).
        #[arg(long)]
        ignore_eos: bool,
        #[command(flatten)]
        sched: SchedArgs,
        #[arg(long, default_value_t = default_threads())]
        threads: usize,
        /// cpu, cuda or auto (the GPU when one works; the CUDA model backend is not written
        /// yet, so auto falls back to cpu and says why).
        #[arg(long, default_value = "auto")]
        device: String,
        /// One JSON line per request and a summary line, instead of text.
        #[arg(long)]
        json: bool,
        /// Write the per-step JSONL (with wall times) here.
        #[arg(long)]
        step_log: Option<PathBuf>,
    },
    /// Drive the scheduler and block manager with a trace (no model) and summarize the batches.
    Replay {
        /// Trace JSON: {"config": {...}, "requests": [...]}.
        #[arg(long)]
        trace: PathBuf,
        /// Write the per-step JSONL (and a final summary line) here; `-` for stdout.
        #[arg(long)]
        step_log: Option<PathBuf>,
        /// Print the summary as one JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A step log being written (JSONL, `-` = stdout). Event callbacks cannot return errors, so
/// the first write error is kept and reported by [`StepLog::finish`].
struct StepLog {
    w: Option<Box<dyn Write>>,
    err: Option<anyhow::Error>,
}

impl StepLog {
    fn open(path: &Option<PathBuf>) -> anyhow::Result<StepLog> {
        let w: Option<Box<dyn Write>> = match path {
            None => None,
            Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout().lock())),
            Some(p) => Some(Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("cannot create step log {}", p.display()))?,
            ))),
        };
        Ok(StepLog { w, err: None })
    }

    /// Appends one JSON line.
    fn line(&mut self, v: &impl serde::Serialize) {
        if let Some(w) = self.w.as_mut() {
            if let Err(e) =
                serde_json::to_writer(&mut *w, v).map_err(anyhow::Error::from).and_then(|_| Ok(writeln!(w)?))
            {
                self.err.get_or_insert(e);
            }
        }
    }

    /// Writes the final summary line, or reports the first error.
    fn finish(mut self, summary: Option<&impl serde::Serialize>) -> anyhow::Result<()> {
        if let Some(s) = summary {
            self.line(s);
        }
        if let Some(e) = self.err {
            return Err(e.context("writing the step log"));
        }
        if let Some(w) = self.w.as_mut() {
            w.flush().context("writing the step log")?;
        }
        Ok(())
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Analyze { logs, plot, trace, json } => {
            let mut all = Vec::new();
            for p in &logs {
                all.push((p.display().to_string(), weave::analyze::read_log(p)?));
            }
            let analyses: Vec<_> = all.iter().map(|(n, s)| weave::analyze::analyze(n, s)).collect();
            if json {
                println!("{}", serde_json::to_string(&analyses)?);
            } else {
                print!("{}", weave::analyze::render(&analyses));
            }
            if let Some(p) = plot {
                weave::plot::write(&weave::plot::composition_svg(&all)?, &p)?;
                eprintln!("plot written to {}", p.display());
            }
            if let Some(p) = trace {
                std::fs::write(&p, serde_json::to_string(&weave::analyze::chrome_trace(&all[0].1))?)
                    .with_context(|| format!("cannot write {}", p.display()))?;
                eprintln!("trace written to {} (open in ui.perfetto.dev or chrome://tracing)", p.display());
            }
            Ok(())
        }
        Cmd::Simulate {
            sim,
            num_requests,
            rate,
            burstiness,
            prompt_len,
            output_len,
            workload,
            seed,
            max_num_batched_tokens,
            max_num_seqs,
            max_model_len,
            no_chunked_prefill,
            long_prefill_token_threshold,
            max_prefill_tokens_per_step,
            policy,
            slo_ttft,
            slo_tpot,
            step_log,
            json,
        } => {
            let (cost, kv) = sim.cost()?;
            let items = match &workload {
                Some(p) => weave::sim::read_workload(p)?,
                None => weave::sim::Workload {
                    num_requests,
                    rate: if rate <= 0.0 { f64::INFINITY } else { rate },
                    burstiness,
                    prompt: prompt_len,
                    output: output_len,
                    seed,
                }
                .items(),
            };
            let cfg = weave_scheduler::SchedulerConfig {
                max_num_batched_tokens,
                max_num_seqs,
                max_model_len,
                num_gpu_blocks: kv / 16 + 1,
                enable_chunked_prefill: !no_chunked_prefill,
                long_prefill_token_threshold,
                max_prefill_tokens_per_step,
                policy,
                ..Default::default()
            };
            let t0 = std::time::Instant::now();
            let keep = step_log.is_some();
            let (m, report) = match cost {
                Cost::Roofline(c) => weave::sim::simulate(&cfg, c, &items, keep, (slo_ttft, slo_tpot))?,
                Cost::Measured(c) => weave::sim::simulate(&cfg, c, &items, keep, (slo_ttft, slo_tpot))?,
            };
            let secs = t0.elapsed().as_secs_f64();
            for (_, msg) in &report.rejected {
                eprintln!("error: {msg}");
            }
            let mut log = StepLog::open(&step_log)?;
            for r in &report.steps {
                log.line(r);
            }
            log.finish(Some(&m))?;
            if json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                let d = |x: &weave::sim::Dist, k: f64| {
                    format!("mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}", x.mean * k, x.p50 * k, x.p90 * k, x.p99 * k)
                };
                println!("simulated {} requests ({} rejected) in {} steps; {:.2} s of simulated time, {secs:.2} s to simulate", m.requests, m.rejected, m.steps, m.makespan_s);
                println!(
                    "  throughput   {:.2} req/s, {:.0} output tok/s, {:.0} total tok/s",
                    m.requests_per_s, m.output_tokens_per_s, m.total_tokens_per_s
                );
                println!("  TTFT (ms)    {}", d(&m.ttft, 1e3));
                println!("  TPOT (ms)    {}", d(&m.tpot, 1e3));
                println!("  ITL (ms)     {}", d(&m.itl, 1e3));
                println!("  e2e (s)      {}", d(&m.e2e, 1.0));
                println!(
                    "  goodput      {:.2} req/s within TTFT <= {} s and TPOT <= {} s",
                    m.goodput_rps, m.slo_ttft_s, m.slo_tpot_s
                );
                println!("  preemptions  {}", m.preemptions);
            }
            Ok(())
        }
        Cmd::Calibrate { logs: _, profile: true, model, max_tokens, max_seqs, max_context, repeats, points, out } => {
            let threads = default_threads();
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
            let lm = weave::generate::LoadedModel::load(&model.unwrap_or_else(weave::paths::default_model_path))?;
            let spec =
                weave::profile::ProfileSpec { max_tokens, max_seqs, max_context, block_size: 16, repeats, threads };
            let bar = indicatif::ProgressBar::new(0);
            let (m, report) = weave::profile::profile_cpu(&lm, &spec, &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            std::fs::write(&out, serde_json::to_string_pretty(&m)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            if let Some(p) = &points {
                std::fs::write(p, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("cannot write {}", p.display()))?;
            }
            println!("{}", weave::profile::describe(&m, &report));
            println!("written to {}", out.display());
            Ok(())
        }
        Cmd::Calibrate { logs, out, .. } => {
            let mut steps = Vec::new();
            for p in &logs {
                steps.extend(weave::analyze::read_log(p)?);
            }
            let f = weave::sim::fit(&steps).map_err(anyhow::Error::msg)?;
            let pred: Vec<f64> = steps.iter().map(|s| weave::sim::CostModel::record_time(&f, s)).collect();
            let mape = steps.iter().zip(&pred).map(|(s, p)| ((p - s.duration) / s.duration).abs()).sum::<f64>()
                / steps.len() as f64;
            std::fs::write(&out, serde_json::to_string_pretty(&f)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "fitted step time = {:.3e} + {:.3e}*max(0, tokens - {}) + {:.3e}*sampled + {:.3e}*attention pairs (s) on {} steps; mean abs error {:.1}%; written to {}",
                f.coef[0], f.coef[1], f.knee, f.coef[2], f.coef[3], steps.len(), 100.0 * mape, out.display()
            );
            Ok(())
        }
        Cmd::Experiment { name, sim, num_requests, quick, backend, out } => {
            if name == "sim-vs-real" {
                rayon::ThreadPoolBuilder::new().num_threads(default_threads()).build_global().ok();
                let lm = weave::generate::LoadedModel::load(&weave::paths::default_model_path())?;
                let r = weave::experiments::sim_vs_real(&lm, default_threads(), quick)?;
                r.write(&out.join("sim-vs-real"))?;
                print!("{}", weave::experiments::markdown(&r.table));
                return Ok(());
            }
            let names: Vec<&str> = if name == "all" { weave::experiments::NAMES.to_vec() } else { vec![name.as_str()] };
            let lm;
            let (mut runner, kv, scale, sub): (Box<dyn weave::experiments::Runner>, usize, _, &str) = match backend
                .as_str()
            {
                "sim" => {
                    let (cost, kv) = sim.cost()?;
                    let scale = weave::experiments::Scale::gpu(num_requests.unwrap_or(if quick { 400 } else { 2000 }));
                    let r: Box<dyn weave::experiments::Runner> = match cost {
                        Cost::Roofline(c) => Box::new(weave::experiments::SimRunner(c)),
                        Cost::Measured(c) => Box::new(weave::experiments::SimRunner(c)),
                    };
                    (r, kv, scale, "")
                }
                "cpu" => {
                    rayon::ThreadPoolBuilder::new().num_threads(default_threads()).build_global().ok();
                    lm = weave::generate::LoadedModel::load(&weave::paths::default_model_path())?;
                    let scale = weave::experiments::Scale::cpu(num_requests.unwrap_or(if quick { 6 } else { 24 }));
                    (
                        Box::new(weave::experiments::CpuRunner { lm: &lm, threads: default_threads() }),
                        16384,
                        scale,
                        "cpu-",
                    )
                }
                other => anyhow::bail!("unknown --backend {other:?}; use sim or cpu"),
            };
            for n in names {
                let t0 = std::time::Instant::now();
                let t = weave::experiments::run(n, runner.as_mut(), kv, scale)?;
                let dir = out.join(format!("{sub}{n}"));
                weave::experiments::write(&t, &dir)?;
                print!("{}", weave::experiments::markdown(&t));
                eprintln!("({n}: {:.1} s; written to {})\n", t0.elapsed().as_secs_f64(), dir.display());
            }
            Ok(())
        }
        Cmd::Bench(BenchCmd::Generate {
            model,
            concurrency,
            prompt_len,
            output_len,
            threads,
            max_num_batched_tokens,
            device,
            llama_batched_bench,
            repeat,
            json,
        }) => {
            let device = weave::cuda::describe_device(&device).map_err(anyhow::Error::msg)?;
            eprintln!("device: {device}");
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
            let path = model.unwrap_or_else(weave::paths::default_model_path);
            let lm = weave::generate::LoadedModel::load(&path)?;
            let rows = weave::bench::bench_generate(
                &lm,
                &path,
                &concurrency,
                prompt_len,
                output_len,
                threads,
                max_num_batched_tokens,
                llama_batched_bench.as_deref(),
                repeat,
            )?;
            let peak = weave::bench::peak_rss_mib();
            if json {
                println!("{}", serde_json::json!({"rows": rows, "peak_rss_mib": peak, "threads": threads}));
            } else {
                println!(
                    "weave bench generate: prompt {prompt_len} / output {output_len}, {threads} threads, {}",
                    path.display()
                );
                println!(
                    "{:>11} {:>10} {:>13} {:>14} {:>16} {:>8}",
                    "concurrency", "wall s", "total tok/s", "output tok/s", "llama.cpp tok/s", "ratio"
                );
                for r in &rows {
                    let base = r.llama_cpp_total_tok_s.map_or("-".into(), |x| format!("{x:.1}"));
                    let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.2}x"));
                    println!(
                        "{:>11} {:>10.2} {:>13.1} {:>14.1} {:>16} {:>8}",
                        r.concurrency, r.wall_s, r.total_tok_s, r.output_tok_s, base, ratio
                    );
                }
                if let Some(p) = peak {
                    println!("peak RSS {p:.0} MiB");
                }
            }
            Ok(())
        }
        Cmd::Generate {
            model,
            prompt,
            prompts_file,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            chat,
            ignore_eos,
            sched,
            threads,
            device,
            json,
            step_log,
        } => {
            let device = weave::cuda::describe_device(&device).map_err(anyhow::Error::msg)?;
            use weave::generate::{generate, read_prompts_file, GenerateConfig, LoadedModel, PromptSpec};
            let mut prompts: Vec<PromptSpec> =
                prompt.into_iter().map(|p| PromptSpec { prompt: p, ..Default::default() }).collect();
            if let Some(f) = &prompts_file {
                prompts.extend(read_prompts_file(f)?);
            }
            anyhow::ensure!(!prompts.is_empty(), "no prompts: give --prompt TEXT or --prompts-file FILE");
            for p in &mut prompts {
                p.stop.extend(stop.iter().cloned());
            }
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
            let path = model.unwrap_or_else(weave::paths::default_model_path);
            let t_load = std::time::Instant::now();
            let lm = LoadedModel::load(&path)?;
            let cfg = GenerateConfig {
                sched: sched.config(&lm.model.cfg)?,
                default_max_tokens: max_tokens,
                sampling: weave::sampling::SamplingParams { temperature, top_k, top_p, seed },
                chat,
                ignore_eos,
                threads,
            };
            if !json {
                eprintln!(
                    "weave: {} ({} layers, hidden {}, {} heads / {} KV heads) loaded from {} in {:.2} s; device {device}, {} threads, KV cache {} tokens",
                    lm.model.cfg.name,
                    lm.model.cfg.num_layers,
                    lm.model.cfg.hidden,
                    lm.model.cfg.num_q_heads,
                    lm.model.cfg.num_kv_heads,
                    path.display(),
                    t_load.elapsed().as_secs_f64(),
                    threads,
                    (cfg.sched.num_gpu_blocks - 1) * cfg.sched.block_size
                );
            }
            let mut log = StepLog::open(&step_log)?;
            let total_tokens: u64 = prompts.iter().map(|p| p.max_tokens.unwrap_or(max_tokens) as u64).sum();
            let bar = indicatif::ProgressBar::new(total_tokens);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {per_sec} {msg}")
                    .expect("valid template"),
            );
            let report = generate(&lm, &cfg, &prompts, &mut |ev| match ev {
                Event::Rejected { message, .. } => bar.suspend(|| eprintln!("error: {message}")),
                Event::Step { record, update } => {
                    bar.inc(update.new_tokens.len() as u64);
                    log.line(record);
                }
                Event::Finished(_) => {}
            })?;
            bar.finish_and_clear();
            log.finish(Some(&report.summary))?;
            let out_tokens: usize = report.completions.iter().map(|c| c.output_token_ids.len()).sum();
            let in_tokens: usize = report.completions.iter().map(|c| c.prompt_token_ids.len()).sum();
            if json {
                for c in &report.completions {
                    println!("{}", serde_json::to_string(c)?);
                }
                let mut v = serde_json::to_value(&report.summary)?;
                v["wall_s"] = serde_json::json!(report.wall_s);
                v["output_tokens_per_s"] = serde_json::json!(out_tokens as f64 / report.wall_s);
                println!("{v}");
            } else {
                for c in &report.completions {
                    println!(
                        "--- [{}] {} ({} prompt tokens, {} output tokens, finish: {})",
                        c.id,
                        c.prompt.trim(),
                        c.prompt_token_ids.len(),
                        c.output_token_ids.len(),
                        c.finish_reason
                    );
                    println!("{}\n", c.text);
                }
                print!("{}", report.summary.render());
                let mean = |xs: Vec<f64>| if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / xs.len() as f64 };
                println!(
                    "  throughput        {:.1} output tok/s, {:.1} total tok/s ({} prompt + {} output tokens in {:.2} s)",
                    out_tokens as f64 / report.wall_s,
                    (in_tokens + out_tokens) as f64 / report.wall_s,
                    in_tokens,
                    out_tokens,
                    report.wall_s
                );
                println!(
                    "  latency           TTFT mean {:.1} ms, TPOT mean {:.1} ms",
                    mean(report.completions.iter().filter_map(|c| c.ttft_ms).collect()),
                    mean(report.completions.iter().filter_map(|c| c.tpot_ms).collect())
                );
            }
            if report.completions.is_empty() {
                anyhow::bail!("every request was rejected; nothing ran");
            }
            Ok(())
        }
        Cmd::Replay { trace, step_log, json } => {
            let t = weave::trace::Trace::load(&trace)?;
            let mut log = StepLog::open(&step_log)?;
            let (report, summary) = weave::replay::replay(&t, &mut |ev| match ev {
                Event::Rejected { message, .. } => eprintln!("error: {}: {message}", trace.display()),
                Event::Step { record, .. } => log.line(record),
                Event::Finished(_) => {}
            })?;
            log.finish(Some(&summary))?;
            let to_stdout = step_log.as_ref().is_some_and(|p| p.as_os_str() == "-");
            if json && !to_stdout {
                println!("{}", serde_json::to_string(&summary)?);
            } else if !to_stdout {
                print!("{}", summary.render());
            }
            if report.outcomes.is_empty() && !report.rejected.is_empty() {
                anyhow::bail!("{}: every request was rejected; nothing ran", trace.display());
            }
            Ok(())
        }
    }
}
