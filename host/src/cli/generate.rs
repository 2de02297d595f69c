//! `weave generate`: Generate text with the real model (CPU or GPU backend), many requests batched continuously.

use super::*;

/// Generate text with the real model (CPU or GPU backend), many requests batched continuously.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A prompt (repeatable).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// One prompt per line, or JSONL with per-request fields (prompt, max_tokens,
    /// temperature, top_k, top_p, seed, stop, stop_token_ids, ignore_eos, id).
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Base seed; request i uses seed + i unless it brings its own.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable), applied to every request.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Apply the model's chat template to each prompt.
    #[arg(long)]
    pub chat: bool,
    /// Keep generating past EOS (for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub sched: SchedArgs,
    #[command(flatten)]
    pub run: ModelArgs,
    /// One JSON line per request and a summary line, instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the per-step JSONL (with wall times and phases) here.
    #[arg(long)]
    pub step_log: Option<PathBuf>,
    /// Print where the steps' time went: schedule, prepare, forward, sample and update, each
    /// as mean, p50 and p99, with its share of the step.
    #[arg(long)]
    pub profile: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Args {
        run,
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
        json,
        step_log,
        profile,
    } = a;
    use weave::generate::{generate, read_prompts_file, GenerateConfig, PromptSpec};
    let mut prompts: Vec<PromptSpec> =
        prompt.into_iter().map(|p| PromptSpec { prompt: p, ..Default::default() }).collect();
    if let Some(f) = &prompts_file {
        prompts.extend(read_prompts_file(f)?);
    }
    anyhow::ensure!(!prompts.is_empty(), "no prompts: give --prompt TEXT or --prompts-file FILE");
    for p in &mut prompts {
        p.stop.extend(stop.iter().cloned());
    }
    let t_load = std::time::Instant::now();
    let (lm, path, (exec_device, device)) = run.load(&sched.kv_cache_dtype, true)?;
    let threads = run.threads;
    let cfg = GenerateConfig {
        sched: sched.config(&lm.model)?,
        default_max_tokens: max_tokens,
        sampling: weave::sampling::SamplingParams { temperature, top_k, top_p, seed, logprobs: None },
        chat,
        ignore_eos,
        threads,
        device: exec_device,
        gpu_memory_utilization: run.gpu_memory_utilization,
        enforce_eager: run.enforce_eager,
        profile_layers: run.profile_layers,
    };
    if !json {
        eprintln!(
            "weave: {} ({}{}, {} layers, hidden {}, {} heads / {} KV heads) loaded from {} in {:.2} s; device {device}, {} threads, weights {} ({:.0} MiB, {} kernels), KV cache {} in {}",
            lm.model.cfg.name,
            lm.model.cfg.arch,
            match lm.model.cfg.deltas.describe().as_str() {
                "none" => String::new(),
                d => format!(": {d}"),
            },
            lm.model.cfg.num_layers,
            lm.model.cfg.hidden,
            lm.model.cfg.num_q_heads,
            lm.model.cfg.num_kv_heads,
            path.display(),
            t_load.elapsed().as_secs_f64(),
            threads,
            lm.model.w.storage(),
            lm.model.w.size_bytes() as f64 / (1u64 << 20) as f64,
            weave::backends::cpu::qmatmul::Isa::detect().name(),
            super::kv_cache_phrase(&cfg.sched),
            lm.model.kv_dtype.name()
        );
    }
    let mut log = StepLog::open(step_log.as_deref())?;
    let total_tokens: u64 = prompts.iter().map(|p| p.max_tokens.unwrap_or(max_tokens) as u64).sum();
    let bar = indicatif::ProgressBar::new(total_tokens);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {per_sec} {msg}").expect("valid template"),
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
        if let Some(d) = &report.device_description {
            println!("device: {d}");
        }
        print!("{}", report.summary.render());
        if profile {
            match weave::engine::steplog::phase_table(&report.run.steps) {
                Some(t) => print!("{t}"),
                None => println!("phases: this backend does not time them"),
            }
        }
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
