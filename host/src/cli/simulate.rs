//! `weave simulate`: Simulate serving: the real scheduler and block manager with a step-time cost model.

use super::*;

/// Simulate serving: the real scheduler and block manager with a step-time cost model.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub sim: SimArgs,
    #[arg(long, default_value_t = 1000)]
    pub num_requests: usize,
    /// Arrival rate (requests/s); 0 = all at once.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Gamma shape of inter-arrival times (1 = Poisson, < 1 burstier).
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Prompt lengths: N, uniform:A:B or lognormal:MEDIAN:SIGMA.
    #[arg(long, default_value = "lognormal:512:0.8")]
    pub prompt_len: weave::study::sim::Lengths,
    #[arg(long, default_value = "lognormal:200:0.7")]
    pub output_len: weave::study::sim::Lengths,
    /// JSONL workload trace (arrival_s, prompt_len, output_len) instead of the generator.
    #[arg(long)]
    pub workload: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 8192)]
    pub max_model_len: usize,
    #[arg(long)]
    pub no_chunked_prefill: bool,
    #[arg(long, default_value_t = 0)]
    pub long_prefill_token_threshold: usize,
    #[arg(long, default_value_t = 0)]
    pub max_prefill_tokens_per_step: usize,
    #[arg(long, default_value = "fcfs")]
    pub policy: weave_scheduler::PolicyKind,
    /// TTFT SLO for goodput, seconds.
    #[arg(long, default_value_t = 1.0)]
    pub slo_ttft: f64,
    /// TPOT SLO for goodput, seconds.
    #[arg(long, default_value_t = 0.1)]
    pub slo_tpot: f64,
    #[arg(long)]
    pub step_log: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Args {
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
    } = a;
    let (cost, kv) = sim.cost()?;
    let items = match &workload {
        Some(p) => weave::study::sim::read_workload(p)?,
        None => weave::study::sim::Workload {
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
        Cost::Roofline(c) => weave::study::sim::simulate(&cfg, c, &items, keep, (slo_ttft, slo_tpot))?,
        Cost::Measured(c) => weave::study::sim::simulate(&cfg, c, &items, keep, (slo_ttft, slo_tpot))?,
    };
    let secs = t0.elapsed().as_secs_f64();
    for (_, msg) in &report.rejected {
        eprintln!("error: {msg}");
    }
    let mut log = StepLog::open(step_log.as_deref())?;
    for r in &report.steps {
        log.line(r);
    }
    log.finish(Some(&m))?;
    if json {
        println!("{}", serde_json::to_string(&m)?);
    } else {
        let d = |x: &weave::study::sim::Dist, k: f64| {
            format!("mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}", x.mean * k, x.p50 * k, x.p90 * k, x.p99 * k)
        };
        println!(
            "simulated {} requests ({} rejected) in {} steps; {:.2} s of simulated time, {secs:.2} s to simulate",
            m.requests, m.rejected, m.steps, m.makespan_s
        );
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
