//! The `weave` command line: one file per subcommand, each parsing its flags, calling the
//! library and rendering the result. Options shared by several commands live here.

pub mod analyze;
pub mod bench;
pub mod bench_kernels;
pub mod bench_serve;
pub mod bench_structured;
pub mod calibrate;
pub mod experiment;
mod generate;
pub mod logits;
pub mod model_config;
pub mod replay;
pub mod serve;
pub mod simulate;

pub use anyhow::Context;
pub use std::path::PathBuf;
pub use weave::engine::steplog::StepLogWriter as StepLog;
pub use weave::engine::Event;

/// Scheduler knobs shared by the commands that run a model.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedArgs {
    /// Token budget per step (prefill chunk tokens + one per decode).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Cap on one request's prefill chunk per step (0 = none).
    #[arg(long, default_value_t = 0)]
    pub long_prefill_token_threshold: usize,
    #[arg(long)]
    pub no_chunked_prefill: bool,
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Give a sliding-window model's window layers the same KV blocks as its full layers, so
    /// that every layer keeps every token (vLLM's flag). By default a block holds one layer
    /// group and a window layer's blocks go back once out of its window.
    #[arg(long)]
    pub disable_hybrid_kv_cache_manager: bool,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV-cache size in tokens (default 16384; see also --kv-cache-gib).
    #[arg(long)]
    pub kv_cache_tokens: Option<usize>,
    /// KV-cache size in GiB of memory, instead of --kv-cache-tokens.
    #[arg(long, conflicts_with = "kv_cache_tokens")]
    pub kv_cache_gib: Option<f64>,
    /// Context limit (default: the model's).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// KV-cache element type: auto (f16, or f32 with --cpu-precision f32), f16 or f32.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Batching policy: fcfs, priority, static, adaptive.
    #[arg(long, default_value = "fcfs")]
    pub policy: weave_scheduler::PolicyKind,
}

/// The KV cache for the load line: its tokens, and its layer groups where there are several.
pub fn kv_cache_phrase(sched: &weave_scheduler::SchedulerConfig) -> String {
    let g = sched.kv_groups;
    if g.len() <= 1 {
        return format!("{} tokens", sched.kv_capacity_tokens());
    }
    format!(
        "{} tokens in every layer ({} blocks, each one layer group's: {} full and {} window groups, window {})",
        sched.kv_capacity_tokens(),
        sched.num_gpu_blocks - 1,
        g.full,
        g.windowed,
        g.window
    )
}

impl SchedArgs {
    pub fn config(&self, cpu: &weave::backends::cpu::CpuModel) -> anyhow::Result<weave_scheduler::SchedulerConfig> {
        let model = &cpu.cfg;
        let tokens = match (self.kv_cache_tokens, self.kv_cache_gib) {
            (Some(t), _) => t,
            (None, Some(g)) => (g * (1u64 << 30) as f64 / cpu.kv_bytes_per_token() as f64) as usize,
            (None, None) => 16384,
        };
        // A block holds one layer group's K/V: the same memory holds `groups` times as many
        // (see `ModelConfig::kv_layout`).
        let layout = if self.disable_hybrid_kv_cache_manager {
            weave::model::config::KvLayout::single(model.num_layers)
        } else {
            model.kv_layout()
        };
        let blocks = tokens / self.block_size * layout.groups.len();
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
            kv_groups: layout.groups,
            ..Default::default()
        })
    }
}

/// The model and where it runs, for every command that runs one.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// GGUF model (default: the reference model fetched by `cargo xtask fetch-model`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = default_threads())]
    pub threads: usize,
    /// CPU weights: quant (keep Q4_0/Q4_1/Q4_K packed in 4 bits, Q5_0/Q5_1/Q5_K/Q8_0 in 8,
    /// 8-bit activations; the default) or f32 (dequantize at load: exact, 4x+ the memory).
    #[arg(long, default_value = "quant")]
    pub cpu_precision: weave::model::weights::Precision,
    /// cpu, cuda, auto or emu (the CUDA backend on the SIMT emulator, slowly, for proving the GPU path without a GPU); auto takes the GPU when one works and the command has a CUDA path, which only
    /// `weave generate` has so far; auto says which it picked and why).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Fraction of the GPU's memory weave may use: the weights and the step's workspace first,
    /// the KV cache gets the rest (vLLM's flag).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Run every GPU step eagerly: no CUDA graphs for decode steps (vLLM's flag).
    #[arg(long)]
    pub enforce_eager: bool,
    /// NVTX ranges around each step's phases (schedule, prepare, forward, sample, update) for
    /// Nsight Systems; the library (libnvToolsExt.so.1 or $WEAVE_NVTX_LIB) is loaded at run
    /// time. WEAVE_NVTX=1 does the same.
    #[arg(long)]
    pub nvtx: bool,
    /// With --nvtx: a range around each layer too (GPU steps that run eagerly; a CUDA graph
    /// replays its layers without the host, so use --enforce-eager to see them all).
    #[arg(long)]
    pub profile_layers: bool,
    /// Where the weights come from: auto (the GGUF file) or dummy (random weights of
    /// --model-config's shape, from a fixed seed, as vLLM's `--load-format dummy`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "gguf", "dummy"])]
    pub load_format: String,
    /// The shape of dummy weights: llama-3-8b, llama-2-7b, mistral-7b, smollm2-135m, or a
    /// JSON profile file (the simulator's model profiles).
    #[arg(long)]
    pub model_config: Option<String>,
    /// Weight type (vLLM's flag): auto, bfloat16, float16 or float32. On the CPU it sets the
    /// type of dummy weights (auto: bfloat16); GGUF weights keep their file's types there (see
    /// --cpu-precision).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl ModelArgs {
    /// Picks the device (`cuda_ok`: the command has a CUDA path), sizes the thread pool and
    /// loads the model with the KV cache type `kv_cache_dtype`: the model, its path
    /// (`dummy:NAME` for dummy weights) and the device with a line describing the choice.
    pub fn load(
        &self,
        kv_cache_dtype: &str,
        cuda_ok: bool,
    ) -> anyhow::Result<(weave::generate::LoadedModel, PathBuf, (weave::backends::cuda::ExecDevice, String))> {
        anyhow::ensure!(
            self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0,
            "--gpu-memory-utilization {} is not in (0, 1]",
            self.gpu_memory_utilization
        );
        let device = weave::backends::cuda::choose_device(&self.device, cuda_ok).map_err(anyhow::Error::msg)?;
        if self.nvtx || self.profile_layers {
            if let Err(why) = weave::engine::nvtx::enable() {
                eprintln!("weave: --nvtx: {why}");
            }
        }
        rayon::ThreadPoolBuilder::new().num_threads(self.threads).build_global().ok();
        if self.load_format == "dummy" {
            let Some(name) = &self.model_config else {
                anyhow::bail!(
                    "--load-format dummy needs --model-config NAME|config.json (the shape to fill with random weights)"
                );
            };
            anyhow::ensure!(
                self.model.is_none(),
                "--model and --load-format dummy do not go together: dummy weights take their shape from --model-config"
            );
            let profile = weave::model::profiles::find_model(name).map_err(anyhow::Error::msg)?;
            let dtype = weave::model::dummy::DummyDtype::parse(&self.dtype).map_err(anyhow::Error::msg)?;
            let precision = if dtype == weave::model::dummy::DummyDtype::F32 {
                weave::model::weights::Precision::F32
            } else {
                weave::model::weights::Precision::Quant
            };
            let kv = weave::backends::cpu::KvDtype::parse(kv_cache_dtype, precision).map_err(anyhow::Error::msg)?;
            let for_cpu = device.0 == weave::backends::cuda::ExecDevice::Cpu;
            anyhow::ensure!(
                for_cpu || dtype != weave::model::dummy::DummyDtype::F32,
                "--dtype {} on the GPU is not written yet: the CUDA backend holds weights in bfloat16 or float16",
                self.dtype
            );
            let lm = weave::generate::LoadedModel::dummy(&profile, dtype, kv, for_cpu)?;
            return Ok((lm, PathBuf::from(format!("dummy:{}", profile.name)), device));
        }
        anyhow::ensure!(
            self.model_config.is_none(),
            "--model-config gives the shape of dummy weights; add --load-format dummy, or drop it to load --model"
        );
        // On the GPU --dtype sets the type GGUF weights are widened into; on the CPU they keep
        // their file's types.
        let gpu_dtype = match weave::model::dummy::DummyDtype::parse(&self.dtype).map_err(anyhow::Error::msg)? {
            _ if device.0 == weave::backends::cuda::ExecDevice::Cpu => {
                anyhow::ensure!(
                    self.dtype == "auto",
                    "--dtype {} applies to dummy weights on the CPU, and to every model on the GPU; GGUF weights keep their file's types on the CPU (see --cpu-precision)",
                    self.dtype
                );
                weave_kernels_gpu::Dtype::Bf16
            }
            weave::model::dummy::DummyDtype::F32 => {
                anyhow::bail!(
                    "--dtype {} on the GPU is not written yet: the CUDA backend holds weights in bfloat16 or float16",
                    self.dtype
                )
            }
            weave::model::dummy::DummyDtype::F16 => weave_kernels_gpu::Dtype::F16,
            weave::model::dummy::DummyDtype::Bf16 => weave_kernels_gpu::Dtype::Bf16,
        };
        let path = self.model.clone().unwrap_or_else(weave::paths::default_model_path);
        let mut lm = load_model(&path, self.cpu_precision, kv_cache_dtype)?;
        lm.gpu_dtype = gpu_dtype;
        Ok((lm, path, device))
    }
}

impl ModelArgs {
    /// The CUDA backend for `sched`'s limits with this command's GPU settings, said in one line
    /// on stderr (the device, the weights, the KV cache).
    pub fn cuda_backend(
        &self,
        lm: &weave::generate::LoadedModel,
        sched: &weave_scheduler::SchedulerConfig,
    ) -> anyhow::Result<weave::backends::cuda::model::CudaBackend> {
        let be = weave::generate::cuda_backend_for(
            lm,
            weave::backends::cuda::ExecDevice::Cuda,
            sched,
            self.gpu_memory_utilization,
            self.enforce_eager,
            self.profile_layers,
            0,
        )?;
        eprintln!("{}", be.describe());
        Ok(be)
    }
}

/// Loads the model for the commands that run one: weights at `precision`, the KV cache type
/// from `--kv-cache-dtype`.
pub fn load_model(
    path: &std::path::Path,
    precision: weave::model::weights::Precision,
    kv_cache_dtype: &str,
) -> anyhow::Result<weave::generate::LoadedModel> {
    let kv = weave::backends::cpu::KvDtype::parse(kv_cache_dtype, precision).map_err(anyhow::Error::msg)?;
    weave::generate::LoadedModel::load_opts(path, precision, kv)
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Cost model and workload options of the simulator.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// GPU profile for the roofline cost model: a100-80gb, h100-sxm, h200.
    #[arg(long, default_value = "h100-sxm")]
    pub gpu: String,
    /// Model profile (llama-3-8b, llama-2-7b, mistral-7b, smollm2-135m) or a JSON profile file.
    #[arg(long, default_value = "llama-3-8b")]
    pub model_profile: String,
    /// A fitted cost model from `weave calibrate` instead of the roofline.
    #[arg(long)]
    pub cost_model: Option<PathBuf>,
    /// KV cache size in tokens (default: what fits the GPU's memory after the weights, at 90%).
    #[arg(long)]
    pub kv_cache_tokens: Option<usize>,
}

pub enum Cost {
    Roofline(weave::study::sim::Roofline),
    Measured(weave::study::profile::MeasuredCost),
}

impl SimArgs {
    pub fn cost(&self) -> anyhow::Result<(Cost, usize)> {
        if let Some(p) = &self.cost_model {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read cost model {}", p.display()))?;
            let f: weave::study::profile::MeasuredCost = serde_json::from_str(&text).with_context(|| {
                format!("{}: not a cost model from `weave calibrate` (profiled or fitted)", p.display())
            })?;
            return Ok((Cost::Measured(f), self.kv_cache_tokens.unwrap_or(16384)));
        }
        let gpu = weave::study::sim::find_gpu(&self.gpu).map_err(anyhow::Error::msg)?;
        let model = weave::study::sim::find_model(&self.model_profile).map_err(anyhow::Error::msg)?;
        let weights_gb = (model.layer_params() + (2 * model.hidden * model.vocab) as f64) * model.dtype_bytes / 1e9;
        let free = (gpu.mem_gb * 0.9 - weights_gb).max(0.5) * 1e9;
        let kv = self.kv_cache_tokens.unwrap_or((free / model.kv_bytes_per_token()) as usize);
        Ok((Cost::Roofline(weave::study::sim::Roofline::new(gpu, model)), kv))
    }
}

#[derive(Debug, clap::Parser)]
#[command(name = "weave", version, about = "Continuous-batching LLM inference engine")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Summarise, compare, plot and export step logs (from replay, generate or simulate).
    Analyze(analyze::Args),
    /// Simulate serving: the real scheduler and block manager with a step-time cost model.
    Simulate(simulate::Args),
    /// Measure a step-time cost model for `weave simulate --cost-model`.
    Calibrate(calibrate::Args),
    /// Run a tuning experiment (batch-size, prefill-cap, chunked-prefill,
    /// static-vs-continuous, adaptive, all) or sim-vs-real.
    Experiment(experiment::Args),
    /// Benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Generate text with the real model (CPU or GPU backend), many requests batched continuously.
    Generate(generate::Args),
    /// Drive the scheduler and block manager with a trace (no model) and summarize the batches.
    Replay(replay::Args),
    /// Serve the model over an OpenAI-compatible HTTP API, with Prometheus metrics.
    Serve(serve::Args),
    /// Print a named model shape as JSON (the shapes `--load-format dummy` and the simulator use).
    ModelConfig(model_config::Args),
    /// Decode one prompt greedily and write each step's top-2 logits and the first step's
    /// logits as JSON: for comparing the CPU and GPU backends.
    Logits(logits::Args),
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// Aggregate generation throughput at several concurrency levels (CPU or GPU backend), with
    /// llama.cpp's llama-batched-bench on the same GGUF and thread count as the baseline.
    Generate(bench::Args),
    /// Load an OpenAI-compatible server (weave's or another's) and report throughput, goodput
    /// and TTFT/TPOT/ITL/E2EL, as `vllm bench serve` does.
    Serve(bench_serve::Args),
    /// Time the paged attention kernel on the GPU over decode, prefill and mixed shapes,
    /// against the device's roofline and PyTorch's SDPA measured in the same run.
    Kernels(bench_kernels::Args),
    /// The step-time cost of structured outputs (CPU backend): the same batch unconstrained
    /// and with every row held to a JSON schema, interleaved; medians and their ratio.
    Structured(bench_structured::Args),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.cmd {
            Cmd::Analyze(a) => analyze::run(a),
            Cmd::Simulate(a) => simulate::run(a),
            Cmd::Calibrate(a) => calibrate::run(a),
            Cmd::Experiment(a) => experiment::run(a),
            Cmd::Bench(BenchCmd::Generate(a)) => bench::run(a),
            Cmd::Generate(a) => generate::run(a),
            Cmd::Replay(a) => replay::run(a),
            Cmd::Serve(a) => serve::run(a),
            Cmd::Bench(BenchCmd::Serve(a)) => bench_serve::run(a),
            Cmd::Bench(BenchCmd::Kernels(a)) => bench_kernels::run(a),
            Cmd::Bench(BenchCmd::Structured(a)) => bench_structured::run(a),
            Cmd::ModelConfig(a) => model_config::run(a),
            Cmd::Logits(a) => logits::run(a),
        }
    }
}
