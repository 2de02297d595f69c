//! `weave bench serve`: a serving benchmark against any OpenAI-compatible server.

use super::*;
use std::sync::Arc;
use std::time::Duration;

/// Load an OpenAI-compatible server (weave's or another's) with streamed requests and report
/// throughput, goodput and TTFT/TPOT/ITL/E2EL, as `vllm bench serve` does.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// /v1/completions or /v1/chat/completions.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model name to send (default: the first the server lists at /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 200)]
    pub num_prompts: usize,
    /// Requests per second (Poisson, or gamma with --burstiness); inf sends all at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,
    /// Gamma shape of inter-arrival gaps: 1 = Poisson, < 1 burstier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 64)]
    pub random_output_len: usize,
    /// Lengths drawn uniformly within ± this fraction of the above.
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// JSONL of {"prompt": ..., "max_tokens": N} instead of random prompts.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// SLOs for goodput, e.g. --goodput ttft:500 tpot:50 (milliseconds; ttft, tpot, e2el).
    #[arg(long, num_args = 1.., value_parser = weave::serve::bench::parse_goodput)]
    pub goodput: Vec<(String, f64)>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ask the server to ignore EOS so that every request runs to its output length.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Per-request timeout (seconds).
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Write the full report (with every request) as JSON here.
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub disable_progress: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.num_prompts >= 1, "--num-prompts must be at least 1");
    anyhow::ensure!(a.timeout > 0.0, "--timeout must be positive");
    let cfg = weave::serve::bench::BenchServeConfig {
        base_url: a.base_url,
        endpoint: a.endpoint,
        model: a.model,
        num_prompts: a.num_prompts,
        request_rate: a.request_rate,
        burstiness: a.burstiness,
        max_concurrency: a.max_concurrency,
        random_input_len: a.random_input_len,
        random_output_len: a.random_output_len,
        random_range_ratio: a.random_range_ratio,
        dataset: a.dataset,
        goodput: a.goodput,
        seed: a.seed,
        ignore_eos: a.ignore_eos,
        timeout: Duration::from_secs_f64(a.timeout),
        progress: !a.disable_progress,
    };
    let bar = if cfg.progress {
        indicatif::ProgressBar::new(cfg.num_prompts as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed_precise}")
            .expect("valid template"),
    );
    let b = bar.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut report = rt.block_on(weave::serve::bench::run(&cfg, Arc::new(move || b.inc(1))))?;
    bar.finish_and_clear();
    if let Some(p) = &a.result_file {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    report.requests.clear();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render());
    }
    anyhow::ensure!(report.completed > 0, "every request failed; first error: {:?}", report.errors.first());
    Ok(())
}
