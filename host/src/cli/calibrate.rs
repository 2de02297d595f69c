//! `weave calibrate`: a step-time cost model for `weave simulate --cost-model`.

use super::*;

/// Measure a step-time cost model for `weave simulate --cost-model`: `--profile` times
/// designed batches on the real CPU backend (recommended); otherwise a model is fitted to
/// measured step logs (e.g. `weave generate --step-log`).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Step logs to fit (without --profile).
    #[arg(required_unless_present = "profile", conflicts_with = "profile")]
    pub logs: Vec<PathBuf>,
    /// Profile a real backend: the CPU with the reference model (or --model), or the GPU
    /// with --device cuda (and e.g. --load-format dummy --model-config llama-3-8b).
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub run: ModelArgs,
    /// Profile: the largest step in tokens (the largest budget you will simulate).
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Profile: the most sampled rows per step (the largest max_num_seqs you will simulate).
    #[arg(long, default_value_t = 32)]
    pub max_seqs: usize,
    /// Profile: the longest cached context in the attention points.
    #[arg(long, default_value_t = 1024)]
    pub max_context: usize,
    /// Profile: timings per point (the median is kept).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Profile: the most the rounds may disagree (a round's median speed against the
    /// typical round's, fastest less slowest; 0.1 = 10%). Beyond it, up to as many rounds
    /// again are timed and the steadiest kept; then the profile is refused as too noisy.
    #[arg(long, default_value_t = 0.1)]
    pub max_spread: f64,
    /// Profile: also write every measured point with the model's prediction (JSON).
    #[arg(long, requires = "profile")]
    pub points: Option<PathBuf>,
    /// Where to write the model (JSON) for `weave simulate --cost-model`.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.profile {
        profile(a)
    } else {
        fit(a)
    }
}

fn profile(a: Args) -> anyhow::Result<()> {
    let Args { run, max_tokens, max_seqs, max_context, repeats, max_spread, points, out, .. } = a;
    anyhow::ensure!(max_spread > 0.0, "--max-spread must be positive, got {max_spread}");
    let threads = run.threads;
    // The CPU profile keeps the file's quantized weights, as `weave generate` runs them.
    let (lm, _path, (device, desc)) = run.load("auto", true)?;
    eprintln!("profiling on {desc}");
    let spec =
        weave::study::profile::ProfileSpec { max_tokens, max_seqs, max_context, block_size: 16, repeats, threads };
    let bar = indicatif::ProgressBar::new(0);
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let (m, report) = match device {
        weave::backends::cuda::ExecDevice::Cpu => {
            weave::study::profile::profile_cpu(&lm, &spec, max_spread, &mut progress)?
        }
        weave::backends::cuda::ExecDevice::Emu => {
            anyhow::bail!("--device emu: the emulator does not model time, so there is nothing to calibrate")
        }
        weave::backends::cuda::ExecDevice::Cuda => {
            let sched = weave_scheduler::SchedulerConfig {
                max_num_batched_tokens: max_tokens,
                max_num_seqs: max_seqs,
                max_model_len: (max_context + max_tokens).min(lm.model.cfg.context_length),
                block_size: 16,
                ..Default::default()
            };
            let mut be = run.cuda_backend(&lm, &sched)?;
            weave::study::profile::profile_cuda(&mut be, &spec, &mut progress)?
        }
    };
    bar.finish_and_clear();
    std::fs::write(&out, serde_json::to_string_pretty(&m)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    if let Some(p) = &points {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    println!("{}", weave::study::profile::describe(&m, &report));
    println!("written to {}", out.display());
    Ok(())
}

fn fit(a: Args) -> anyhow::Result<()> {
    let Args { logs, out, .. } = a;
    let mut steps = Vec::new();
    for p in &logs {
        steps.extend(weave::study::analyze::read_log(p)?);
    }
    let f = weave::study::sim::fit(&steps).map_err(anyhow::Error::msg)?;
    let pred: Vec<f64> = steps.iter().map(|s| weave::study::sim::CostModel::record_time(&f, s)).collect();
    let mape =
        steps.iter().zip(&pred).map(|(s, p)| ((p - s.duration) / s.duration).abs()).sum::<f64>() / steps.len() as f64;
    std::fs::write(&out, serde_json::to_string_pretty(&f)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
            "fitted step time = {:.3e} + {:.3e}*max(0, tokens - {}) + {:.3e}*sampled + {:.3e}*attention pairs (s) on {} steps; mean abs error {:.1}%; written to {}",
            f.coef[0], f.coef[1], f.knee, f.coef[2], f.coef[3], steps.len(), 100.0 * mape, out.display()
        );
    Ok(())
}
