//! `weave bench structured`: the step-time cost of structured outputs on the CPU backend.

use super::*;

/// The same batch unconstrained and with every row held to a JSON schema (masks computed on
/// worker threads beside the forward pass), interleaved; medians of the mean step time over
/// the steps where every row decodes, their ratio, and the mask time per step.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub run: ModelArgs,
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub output_len: usize,
    /// Repetitions (each runs both, one after the other); medians are reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (lm, path, (exec, device)) = a.run.load("auto", true)?;
    anyhow::ensure!(
        exec == weave::backends::cuda::ExecDevice::Cpu,
        "weave bench structured measures the CPU backend; give --device cpu"
    );
    eprintln!("device: {device}");
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} repetitions {elapsed_precise}")?);
    let reps = weave::study::bench::bench_structured(
        &lm,
        a.concurrency,
        a.prompt_len,
        a.output_len,
        a.run.threads,
        a.repeat,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    let med = |f: &dyn Fn(&weave::study::bench::StructuredRep) -> f64| {
        weave::study::bench::median(&reps.iter().map(f).collect::<Vec<_>>())
    };
    let (free, guided) = (med(&|r| r.free_step_ms), med(&|r| r.guided_step_ms));
    let ratios: Vec<f64> = reps.iter().map(|r| r.guided_step_ms / r.free_step_ms).collect();
    let (mask, wait) = (med(&|r| r.mask_ms), med(&|r| r.mask_wait_ms));
    if a.json {
        println!(
            "{}",
            serde_json::json!({"reps": reps, "free_step_ms": free, "guided_step_ms": guided, "ratio": guided / free,
                "mask_ms": mask, "mask_wait_ms": wait, "concurrency": a.concurrency, "threads": a.run.threads})
        );
        return Ok(());
    }
    println!(
        "weave bench structured: {} requests, prompt {} / output {}, {} threads, {}, medians of {}",
        a.concurrency,
        a.prompt_len,
        a.output_len,
        a.run.threads,
        path.display(),
        reps.len()
    );
    println!("  steps with all {} rows decoding: {} a run", a.concurrency, reps[0].steps);
    println!("  mean step, unconstrained      {free:8.2} ms");
    println!("  mean step, JSON schema        {guided:8.2} ms   ratio {:.3}x", guided / free);
    println!(
        "  per-repetition ratios         {}",
        ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(" ")
    );
    println!("  masks per step: workers {mask:.3} ms (beside the forward pass), step waited {wait:.3} ms");
    Ok(())
}
