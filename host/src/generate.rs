//! `weave generate`: real generation with the CPU backend through the engine loop.

use crate::backends::cpu::{CpuBackend, CpuModel, KvDtype};
use crate::engine::steplog::Summary;
use crate::engine::{Arrival, Clock, Engine, Event, Outcome, RunReport};
use crate::model::chat::ChatTemplate;
use crate::model::config::ModelConfig;
use crate::model::gguf::Gguf;
use crate::model::tokenizer::{StreamDecoder, WeaveTokenizer};
use crate::model::weights::{Precision, Weights};
use crate::sampling::SamplingParams;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use weave_scheduler::{NewRequest, Scheduler, SchedulerConfig};

/// A loaded model: weights, tokenizer, chat template.
#[derive(Debug)]
pub struct LoadedModel {
    pub path: PathBuf,
    pub model: Arc<CpuModel>,
    pub tokenizer: WeaveTokenizer,
    pub chat: Option<ChatTemplate>,
    /// The type a GPU holds the weights and activations in (`--dtype`: bf16 or f16).
    pub gpu_dtype: weave_kernels_gpu::Dtype,
    /// Structured outputs' token trie and parser factory, built on first use.
    guides: std::sync::OnceLock<Arc<crate::structured::GuideFactory>>,
}

impl LoadedModel {
    /// Loads with the default precision ([`Precision::Quant`]).
    pub fn load(path: &Path) -> anyhow::Result<LoadedModel> {
        Self::load_with(path, Precision::default())
    }

    /// Loads at `precision`, with the KV cache type `auto` picks for it.
    pub fn load_with(path: &Path, precision: Precision) -> anyhow::Result<LoadedModel> {
        let kv = KvDtype::parse("auto", precision).map_err(anyhow::Error::msg)?;
        Self::load_opts(path, precision, kv)
    }

    pub fn load_opts(path: &Path, precision: Precision, kv_dtype: KvDtype) -> anyhow::Result<LoadedModel> {
        if !path.exists() {
            bail!(
                "model file {} does not exist; fetch the reference model with `cargo xtask fetch-model`, or pass --model PATH",
                path.display()
            );
        }
        let g = Gguf::open(path)?;
        let cfg = ModelConfig::from_gguf(&g)?;
        let tokenizer = WeaveTokenizer::from_gguf(&g)?;
        if tokenizer.vocab_size() < cfg.vocab_size {
            bail!(
                "{}: tokenizer has {} tokens but the model {}",
                path.display(),
                tokenizer.vocab_size(),
                cfg.vocab_size
            );
        }
        let chat = ChatTemplate::from_gguf(&g, &tokenizer.bos_text, &tokenizer.eos_text);
        let w = Weights::load(&g, &cfg, precision)?;
        let max_pos = cfg.context_length;
        let mut model = CpuModel::new(cfg, w, max_pos);
        model.kv_dtype = kv_dtype;
        Ok(LoadedModel {
            path: path.into(),
            model: Arc::new(model),
            tokenizer,
            chat,
            gpu_dtype: weave_kernels_gpu::Dtype::Bf16,
            guides: Default::default(),
        })
    }

    /// The parser factory structured outputs compile with, built on first use (the token trie
    /// of a 49k vocabulary takes a moment).
    pub fn guides(&self) -> anyhow::Result<Arc<crate::structured::GuideFactory>> {
        if let Some(f) = self.guides.get() {
            return Ok(f.clone());
        }
        let f = Arc::new(crate::structured::GuideFactory::new(&self.tokenizer, self.model.cfg.vocab_size)?);
        Ok(self.guides.get_or_init(|| f).clone())
    }
}

impl LoadedModel {
    /// Random weights of shape `profile` (see [`crate::model::dummy`]), with the byte-level
    /// tokenizer and no chat template. For a CPU run (`for_cpu`) the weights are made on the
    /// host, and a shape whose weights would not fit in half of this machine's available
    /// memory is refused; for a GPU run they are left for the device to fill
    /// ([`crate::model::weights::LinearData::Dummy`]), and only the norms live on the host.
    pub fn dummy(
        profile: &crate::model::profiles::ModelProfile,
        dtype: crate::model::dummy::DummyDtype,
        kv_dtype: KvDtype,
        for_cpu: bool,
    ) -> anyhow::Result<LoadedModel> {
        profile.check().map_err(anyhow::Error::msg)?;
        let cfg = profile.config();
        let bytes = (profile.layer_params()
            + ((1 + usize::from(!profile.tied_embeddings)) * cfg.hidden * cfg.vocab_size) as f64)
            * if dtype == crate::model::dummy::DummyDtype::F32 { 4.0 } else { 2.0 };
        if let Some(avail) = available_memory_bytes().filter(|_| for_cpu) {
            if bytes > 0.5 * avail {
                bail!(
                    "dummy {} needs {:.1} GB of weights in {}, and this machine has {:.1} GB available: use a smaller --model-config (e.g. smollm2-135m) on the CPU, or --device cuda",
                    profile.name,
                    bytes / 1e9,
                    dtype.name(),
                    avail / 1e9
                );
            }
        }
        // On a GPU the device fills the matrices itself: 16 GB of an 8B model never cross the host.
        let to = if for_cpu {
            crate::model::dummy::Materialize::Host(dtype)
        } else {
            crate::model::dummy::Materialize::Device
        };
        let w = crate::model::dummy::weights(&cfg, profile.tied_embeddings, to, 0);
        let max_pos = cfg.context_length;
        let mut model = CpuModel::new(cfg, w, max_pos);
        model.kv_dtype = kv_dtype;
        Ok(LoadedModel {
            path: PathBuf::from(format!("dummy:{}", profile.name)),
            model: Arc::new(model),
            tokenizer: WeaveTokenizer::bytes(),
            chat: None,
            guides: Default::default(),
            gpu_dtype: match dtype {
                crate::model::dummy::DummyDtype::F16 => weave_kernels_gpu::Dtype::F16,
                _ => weave_kernels_gpu::Dtype::Bf16,
            },
        })
    }
}

/// `MemAvailable` (Linux), in bytes.
fn available_memory_bytes() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// One request as given on the command line or in a prompts file (JSONL fields).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    pub prompt: String,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: Option<bool>,
    /// Structured output, as the API spells it: `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema"}}`.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    /// vLLM's `{json | regex | choice | grammar | json_object}`.
    #[serde(default)]
    pub structured_outputs: Option<serde_json::Value>,
}

impl PromptSpec {
    /// The constraint this prompt asks for, compiled by `lm`'s factory; the error names the
    /// field.
    fn guide(&self, lm: &LoadedModel) -> Result<Option<crate::structured::Guide>, String> {
        let body = serde_json::json!({
            "response_format": self.response_format,
            "structured_outputs": self.structured_outputs,
        });
        let Some((c, param)) = crate::structured::fields::constraint(&body).map_err(|e| e.message)? else {
            return Ok(None);
        };
        let f =
            lm.guides().map_err(|e| format!("{param}: structured output is not available for this model: {e:#}"))?;
        f.compile(&c).map(Some).map_err(|e| format!("{param}: {e}"))
    }
}

/// Reads a prompts file: one prompt per line, or JSONL (`{"prompt": ..., ...}`) when the
/// first non-blank line starts with `{`. Errors name the file and line.
pub fn read_prompts_file(path: &Path) -> anyhow::Result<Vec<PromptSpec>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read prompts file {}", path.display()))?;
    let jsonl = text.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| l.trim_start().starts_with('{'));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if jsonl {
            if line.trim().is_empty() {
                continue;
            }
            let spec: PromptSpec = serde_json::from_str(line)
                .with_context(|| format!("{}: line {}: not a valid request", path.display(), i + 1))?;
            out.push(spec);
        } else {
            out.push(PromptSpec { prompt: line.to_string(), ..Default::default() });
        }
    }
    Ok(out)
}

/// Run-wide settings.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub sched: SchedulerConfig,
    pub default_max_tokens: usize,
    pub sampling: SamplingParams,
    pub chat: bool,
    pub ignore_eos: bool,
    pub threads: usize,
    /// Where the model runs: the CPU backend, or the CUDA one (which sizes the KV cache from
    /// the device's memory, replacing `sched.num_gpu_blocks`).
    pub device: crate::backends::cuda::ExecDevice,
    /// Fraction of the GPU's memory to use (vLLM's `--gpu-memory-utilization`).
    pub gpu_memory_utilization: f64,
    /// No CUDA graphs (vLLM's `--enforce-eager`).
    pub enforce_eager: bool,
    /// An NVTX range per layer on the GPU (`--profile-layers`).
    pub profile_layers: bool,
}

/// One finished completion.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: serde_json::Value,
    pub prompt: String,
    pub prompt_token_ids: Vec<u32>,
    pub output_token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: String,
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub num_cached_tokens: usize,
}

#[derive(Debug)]
pub struct GenerateReport {
    pub completions: Vec<Completion>,
    pub rejected: Vec<(serde_json::Value, String)>,
    pub run: RunReport,
    pub summary: Summary,
    pub wall_s: f64,
    /// The GPU, its weights and KV cache, when the run was on one.
    pub device_description: Option<String>,
}

/// Tokenizes, runs and detokenizes. Bad requests are reported in `rejected`; the rest run.
pub fn generate(
    lm: &LoadedModel,
    cfg: &GenerateConfig,
    prompts: &[PromptSpec],
    on_event: &mut dyn FnMut(Event<'_>),
) -> anyhow::Result<GenerateReport> {
    let (backend, sched, description) = make_backend(lm, cfg)?;
    let mut r = generate_on(lm, cfg, &sched, prompts, backend, on_event)?;
    r.device_description = description;
    Ok(r)
}

/// `cfg` with `model`'s KV layer groups ([`crate::model::config::ModelConfig::kv_layout`]): a
/// sliding-window model's full and windowed groups. `num_gpu_blocks` stays: blocks of one
/// group's layers. (A config left at one group runs a sliding-window model with every layer
/// keeping every token.)
pub fn sched_for_model(cfg: &SchedulerConfig, model: &crate::model::config::ModelConfig) -> SchedulerConfig {
    SchedulerConfig { kv_groups: model.kv_layout().groups, ..cfg.clone() }
}

/// The backend `cfg.device` names, the scheduler config to run it with (the CUDA backend sizes
/// the KV cache from the device's memory, replacing `num_gpu_blocks`), and a line describing
/// the device when it is a GPU.
pub fn make_backend(
    lm: &LoadedModel,
    cfg: &GenerateConfig,
) -> anyhow::Result<(Box<dyn crate::engine::Backend>, SchedulerConfig, Option<String>)> {
    let mut sched_cfg = cfg.sched.clone();
    match cfg.device {
        crate::backends::cuda::ExecDevice::Cpu => {
            if lm.model.w.on_device_only() {
                bail!("{}: the weights were left for a GPU to fill and cannot run on the CPU; load them with --device cpu", lm.path.display());
            }
            let be = CpuBackend::for_sched(lm.model.clone(), &sched_cfg, cfg.threads, cfg.sampling.seed.unwrap_or(0))?;
            Ok((Box::new(be), sched_cfg, None))
        }
        crate::backends::cuda::ExecDevice::Cuda | crate::backends::cuda::ExecDevice::Emu => {
            let be = cuda_backend(lm, cfg)?;
            // The KV cache is what the device's memory holds, as in vLLM.
            sched_cfg.num_gpu_blocks = be.num_blocks();
            let d = be.describe();
            Ok((Box::new(be), sched_cfg, Some(d)))
        }
    }
}

/// The CUDA backend for `cfg`'s limits, on device 0 (or the emulator, `cfg.device`).
pub fn cuda_backend(
    lm: &LoadedModel,
    cfg: &GenerateConfig,
) -> anyhow::Result<crate::backends::cuda::model::CudaBackend> {
    cuda_backend_for(
        lm,
        cfg.device,
        &cfg.sched,
        cfg.gpu_memory_utilization,
        cfg.enforce_eager,
        cfg.profile_layers,
        cfg.sampling.seed.unwrap_or(0),
    )
}

/// The CUDA backend on `device` (GPU 0, or the emulator) for a scheduler config (its batch,
/// sequence and length limits), with vLLM's memory and graph settings.
pub fn cuda_backend_for(
    lm: &LoadedModel,
    device: crate::backends::cuda::ExecDevice,
    s: &SchedulerConfig,
    gpu_memory_utilization: f64,
    enforce_eager: bool,
    profile_layers: bool,
    seed: u64,
) -> anyhow::Result<crate::backends::cuda::model::CudaBackend> {
    use crate::backends::cuda::model::{CudaBackend, CudaLimits};
    let k = crate::backends::cuda::Kernels::open(device)?;
    let limits = CudaLimits {
        max_num_batched_tokens: s.max_num_batched_tokens,
        max_num_seqs: s.max_num_seqs,
        max_model_len: s.max_model_len,
        block_size: s.block_size,
        gpu_memory_utilization,
        enforce_eager,
        profile_layers,
        dtype: lm.gpu_dtype,
    };
    Ok(CudaBackend::new(k, &lm.model, limits, seed)?)
}

/// [`generate`] on a given backend, with the scheduler config made for it: a benchmark keeps
/// one backend (and the weights on its device) across runs.
pub fn generate_on<B: crate::engine::Backend>(
    lm: &LoadedModel,
    cfg: &GenerateConfig,
    sched_cfg: &SchedulerConfig,
    prompts: &[PromptSpec],
    backend: B,
    on_event: &mut dyn FnMut(Event<'_>),
) -> anyhow::Result<GenerateReport> {
    let tok = &lm.tokenizer;
    let mut arrivals = Vec::new();
    let mut rejected = Vec::new();
    // Each accepted request, by its name: its position in `prompts` and its prompt's tokens.
    let mut accepted: HashMap<String, (usize, Vec<u32>)> = HashMap::new();
    let mut stops: HashMap<u64, Vec<String>> = HashMap::new();
    for (i, p) in prompts.iter().enumerate() {
        let name = p.id.clone().unwrap_or_else(|| serde_json::json!(i));
        let reject = |msg: String| (name.clone(), format!("request {name}: {msg}"));
        if p.prompt.trim().is_empty() {
            rejected.push(reject("the prompt is empty".into()));
            continue;
        }
        let sampling = SamplingParams {
            temperature: p.temperature.unwrap_or(cfg.sampling.temperature),
            top_k: p.top_k.unwrap_or(cfg.sampling.top_k),
            top_p: p.top_p.unwrap_or(cfg.sampling.top_p),
            seed: p.seed.or(cfg.sampling.seed.map(|s| s.wrapping_add(i as u64))),
            logprobs: cfg.sampling.logprobs,
        };
        if let Err(e) = sampling.validate() {
            rejected.push(reject(e));
            continue;
        }
        let guide = match p.guide(lm) {
            Ok(g) => g,
            Err(e) => {
                rejected.push(reject(e));
                continue;
            }
        };
        let text = match (&lm.chat, cfg.chat) {
            (Some(t), true) => t.render_user(&p.prompt).map_err(|e| anyhow::anyhow!("{}: {e}", lm.path.display()))?,
            (None, true) => bail!("{}: --chat given but the model has no chat template", lm.path.display()),
            (_, false) => p.prompt.clone(),
        };
        let ids = match tok.encode(&text) {
            Ok(ids) => ids,
            Err(e) => {
                rejected.push(reject(e.to_string()));
                continue;
            }
        };
        let mut req = NewRequest::new(0, ids, p.max_tokens.unwrap_or(cfg.default_max_tokens));
        req.ignore_eos = p.ignore_eos.unwrap_or(cfg.ignore_eos);
        req.eos_token_id = tok.eos;
        req.stop_token_ids = if req.ignore_eos { Vec::new() } else { tok.stop_ids.clone() };
        req.stop_token_ids.extend(&p.stop_token_ids);
        let k = arrivals.len() as u64;
        accepted.insert(name.to_string(), (i, req.prompt.clone()));
        if !p.stop.is_empty() {
            stops.insert(k, p.stop.clone());
        }
        arrivals.push(Arrival { at: 0.0, name, request: req, sampling, guide });
    }
    for (name, msg) in &rejected {
        on_event(Event::Rejected { name, message: msg });
    }
    let sched = Scheduler::new(sched_cfg.clone())?;
    let mut engine = Engine::new(sched, backend, Clock::Seconds);
    if arrivals.iter().any(|a| a.guide.is_some()) {
        engine.enable_guides(&*lm.guides()?, crate::structured::masks::default_workers(cfg.threads));
    }
    // Stop strings: watch each request's decoded text as it streams.
    let mut decoders: HashMap<u64, (StreamDecoder, String)> = HashMap::new();
    let mut stop_check = |id: u64, out: &[u32]| -> bool {
        let Some(ss) = stops.get(&id) else { return false };
        let (dec, text) = decoders.entry(id).or_default();
        text.push_str(&dec.push(tok, *out.last().expect("a new token")));
        ss.iter().any(|s| text.contains(s.as_str()))
    };
    let t0 = std::time::Instant::now();
    let run = engine.run(arrivals, &mut stop_check, on_event)?;
    let wall_s = t0.elapsed().as_secs_f64();
    rejected.extend(run.rejected.iter().cloned());
    let mut completions: Vec<(usize, Completion)> = run
        .outcomes
        .iter()
        .map(|o| {
            let (i, ids) = &accepted[&o.name.to_string()];
            (*i, completion(o, tok, &prompts[*i], ids))
        })
        .collect();
    // In the order the requests were given.
    completions.sort_by_key(|c| c.0);
    let completions = completions.into_iter().map(|c| c.1).collect();
    let mut summary = Summary::from_steps(&run.steps, "seconds");
    summary.rejected = rejected.len();
    summary.prefix_cache_hit_rate = engine.sched.prefix_cache_stats().hit_rate();
    Ok(GenerateReport { completions, rejected, run, summary, wall_s, device_description: None })
}

fn completion(o: &Outcome, tok: &WeaveTokenizer, spec: &PromptSpec, prompt_ids: &[u32]) -> Completion {
    // The stop token itself is not part of the text.
    let mut shown = &o.output_tokens[..];
    if o.reason == weave_scheduler::FinishReason::Stop && shown.last().is_some_and(|t| tok.stop_ids.contains(t)) {
        shown = &shown[..shown.len() - 1];
    }
    let mut text = tok.decode(shown);
    if let Some(c) = spec.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(c);
    }
    Completion {
        prompt: spec.prompt.clone(),
        id: o.name.clone(),
        prompt_token_ids: prompt_ids.to_vec(),
        output_token_ids: o.output_tokens.clone(),
        text,
        finish_reason: o.reason.as_str().to_string(),
        ttft_ms: o.ttft().map(|s| s * 1e3),
        tpot_ms: o.tpot().map(|s| s * 1e3),
        num_cached_tokens: o.num_cached_tokens,
    }
}
