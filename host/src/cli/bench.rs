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
    let (lm, path, device) = run.load("auto")?;
    eprintln!("device: {device}");
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
        &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
        },
    )?;
    bar.finish_and_clear();
    let peak = weave::study::bench::peak_rss_mib();
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
