//! `weave logits`: one prompt decoded greedily with each step's top-2 logits and the first
//! step's whole row, as JSON, for comparing backends (`tools/gpu/check.sh` diffs the CPU's
//! and the GPU's).

use super::*;

/// Decode one prompt greedily, step by step, and write each step's token and top-2 logits,
/// with the first step's logits row, as JSON (for comparing the CPU and GPU backends).
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = "The capital of France is")]
    pub prompt: String,
    /// Tokens to decode (the first from the prompt's step).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Where to write the JSON (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub run: ModelArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.steps > 0, "--steps must be at least 1");
    let (lm, _path, (device, desc)) = a.run.load("auto", true)?;
    let ids = lm.tokenizer.encode(&a.prompt).map_err(|e| anyhow::anyhow!("--prompt: {e}"))?;
    let block_size = 16;
    let len = ids.len() + a.steps;
    anyhow::ensure!(
        len <= lm.model.cfg.context_length,
        "the prompt ({} tokens) and --steps {} exceed the model's context of {}",
        ids.len(),
        a.steps,
        lm.model.cfg.context_length
    );
    eprintln!("weave logits: device {desc}");
    let trace = match device {
        weave::backends::cuda::ExecDevice::Cpu => {
            anyhow::ensure!(!lm.model.w.on_device_only(), "dummy weights left for the GPU cannot run on the CPU");
            let groups = lm.model.cfg.kv_layout().groups.len();
            let mut be = weave::backends::cpu::CpuBackend::new(
                lm.model.clone(),
                weave::study::logits::trace_blocks(groups, len, block_size),
                block_size,
                a.run.threads,
                0,
            );
            weave::study::logits::greedy_trace(&mut be, "cpu", &ids, a.steps, block_size)?
        }
        weave::backends::cuda::ExecDevice::Cuda | weave::backends::cuda::ExecDevice::Emu => {
            let cfg = weave::generate::GenerateConfig {
                sched: weave_scheduler::SchedulerConfig {
                    max_num_batched_tokens: ids.len().max(block_size),
                    max_num_seqs: 1,
                    max_model_len: len + block_size,
                    block_size,
                    ..Default::default()
                },
                default_max_tokens: a.steps,
                sampling: Default::default(),
                chat: false,
                ignore_eos: true,
                threads: a.run.threads,
                device,
                gpu_memory_utilization: a.run.gpu_memory_utilization,
                enforce_eager: true,
                profile_layers: false,
            };
            let mut be = weave::generate::cuda_backend(&lm, &cfg)?;
            weave::study::logits::greedy_trace(&mut be, "cuda", &ids, a.steps, block_size)?
        }
    };
    eprintln!("tokens: {:?}", trace.tokens);
    eprintln!("text: {:?}", lm.tokenizer.decode(&trace.tokens));
    let json = serde_json::to_string(&trace)?;
    match &a.out {
        Some(p) => std::fs::write(p, json).with_context(|| format!("cannot write {}", p.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}
