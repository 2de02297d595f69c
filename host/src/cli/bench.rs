//! `weave bench generate`: Aggregate generation throughput at several concurrency levels (CPU backend), with

use super::*;

/// Aggregate generation throughput at several concurrency levels (CPU backend), with
/// llama.cpp's llama-batched-bench on the same GGUF and thread count as the baseline.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub run: ModelArgs,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Path to llama.cpp's llama-batched-bench, to measure the baseline in the same run.
    #[arg(long)]
    pub llama_batched_bench: Option<PathBuf>,
    /// Repetitions (interleaved with llama.cpp's); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { run, concurrency, prompt_len, output_len, max_num_batched_tokens, llama_batched_bench, repeat, json } =
        a;
    anyhow::ensure!(
        !(run.load_format == "dummy" && llama_batched_bench.is_some()),
        "--llama-batched-bench runs a GGUF file; it has no dummy weights to compare with"
    );
    let (lm, path, (exec, device)) = run.load("auto", true)?;
    anyhow::ensure!(
        !(exec == weave::backends::cuda::ExecDevice::Cuda && llama_batched_bench.is_some()),
        "--llama-batched-bench is the CPU baseline; on a GPU the baseline is PyTorch (tools/gpu/hf_baseline.py)"
    );
    anyhow::ensure!(
        exec != weave::backends::cuda::ExecDevice::Emu,
        "--device emu: the emulator does not model time, so it has nothing to benchmark; use weave generate --device emu"
    );
    eprintln!("device: {device}");
    // On a GPU: one backend for every run, and the device's ceilings measured first.
    let mut gpu = match exec {
        weave::backends::cuda::ExecDevice::Cpu => None,
        weave::backends::cuda::ExecDevice::Cuda | weave::backends::cuda::ExecDevice::Emu => {
            let cmax = concurrency.iter().copied().max().unwrap_or(1);
            let cfg = weave::generate::GenerateConfig {
                sched: weave_scheduler::SchedulerConfig {
                    max_num_batched_tokens,
                    max_num_seqs: cmax,
                    max_model_len: (prompt_len + output_len + 16).min(lm.model.cfg.context_length),
                    ..Default::default()
                },
                default_max_tokens: output_len,
                sampling: Default::default(),
                chat: false,
                ignore_eos: true,
                threads: run.threads,
                device: exec,
                gpu_memory_utilization: run.gpu_memory_utilization,
                enforce_eager: run.enforce_eager,
                profile_layers: run.profile_layers,
            };
            let backend = weave::generate::cuda_backend(&lm, &cfg)?;
            eprintln!("device: {}", backend.describe());
            let ceilings = backend.ceilings()?;
            eprintln!(
                "ceilings measured now: copy {:.0} GB/s (read + write), bf16 GEMM {:.0} TFLOP/s",
                ceilings.copy_gbs, ceilings.gemm_tflops
            );
            Some(weave::study::bench::GpuBench { backend, ceilings })
        }
    };
    let threads = run.threads;
    // Runs take minutes: say which is running.
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} runs {elapsed_precise} {msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(500));
    let rows = weave::study::bench::bench_generate(
        &lm,
        &path,
        &concurrency,
        prompt_len,
        output_len,
        threads,
        max_num_batched_tokens,
        llama_batched_bench.as_deref(),
        repeat,
        gpu.as_mut(),
        &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
        },
    )?;
    bar.finish_and_clear();
    let peak = weave::study::bench::peak_rss_mib();
    let llama_peak = llama_batched_bench.as_ref().and_then(|_| weave::study::bench::children_peak_rss_mib());
    if json {
        println!(
            "{}",
            serde_json::json!({"rows": rows, "peak_rss_mib": peak, "llama_cpp_peak_rss_mib": llama_peak, "threads": threads,
                "ceilings": gpu.as_ref().map(|g| g.ceilings)})
        );
    } else {
        println!(
            "weave bench generate: prompt {prompt_len} / output {output_len}, {threads} threads, {}, medians of {repeat}",
            path.display()
        );
        println!(
            "{:>11} {:>8} {:>11} {:>12} {:>13} {:>11} {:>7} {:>13} {:>7}",
            "concurrency",
            "wall s",
            "total tok/s",
            "output tok/s",
            "prefill tok/s",
            "llama tok/s",
            "ratio",
            "llama prefill",
            "ratio"
        );
        let opt = |x: Option<f64>, unit: &str| x.map_or("-".into(), |x| format!("{x:.1}{unit}"));
        for r in &rows {
            println!(
                "{:>11} {:>8.2} {:>11.1} {:>12.1} {:>13.1} {:>11} {:>7} {:>13} {:>7}",
                r.concurrency,
                r.wall_s,
                r.total_tok_s,
                r.output_tok_s,
                r.prefill_tok_s,
                opt(r.llama_cpp_total_tok_s, ""),
                r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
                opt(r.llama_cpp_prefill_tok_s, ""),
                r.prefill_ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            );
        }
        println!(
            "{:>11} {:>9} {:>9} {:>11} {:>10} {:>13} {:>8} {:>8}",
            "concurrency", "TTFT ms", "TPOT ms", "forward ms", "sample ms", "roofline tok/s", "of it", "GPU gap"
        );
        for r in &rows {
            println!(
                "{:>11} {:>9.1} {:>9.2} {:>11.2} {:>10.2} {:>13} {:>8} {:>8}",
                r.concurrency,
                r.ttft_ms,
                r.tpot_ms,
                r.forward_ms,
                r.sample_ms,
                r.roofline_output_tok_s.map_or("-".into(), |x| format!("{x:.0}")),
                r.roofline_ratio.map_or("-".into(), |x| format!("{:.0}%", 100.0 * x)),
                r.gpu_gap_share.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x)),
            );
        }
        match (peak, llama_peak) {
            (Some(p), Some(l)) => println!("peak RSS {p:.0} MiB, llama-batched-bench {l:.0} MiB ({:.2}x)", p / l),
            (Some(p), None) => println!("peak RSS {p:.0} MiB"),
            _ => {}
        }
    }
    Ok(())
}
