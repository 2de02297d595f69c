//! `weave bench generate`: throughput at several concurrency levels on this machine, with
//! llama.cpp's `llama-batched-bench` measured in the same run as the baseline.

use crate::generate::{generate, GenerateConfig, LoadedModel, PromptSpec};
use crate::sampling::SamplingParams;
use anyhow::{bail, Context};
use serde::Serialize;
use std::path::Path;
use weave_scheduler::SchedulerConfig;

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub concurrency: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub wall_s: f64,
    /// (prompt + output tokens) / wall time, as llama-batched-bench's `S t/s`.
    pub total_tok_s: f64,
    pub output_tok_s: f64,
    /// Prompt tokens / the time until every request had its first token: the prefill rate as
    /// a client sees it (llama-batched-bench's `S_PP t/s` is prompt tokens over its prompt
    /// processing time).
    pub prefill_tok_s: f64,
    pub llama_cpp_total_tok_s: Option<f64>,
    pub llama_cpp_prefill_tok_s: Option<f64>,
    pub ratio: Option<f64>,
    pub prefill_ratio: Option<f64>,
    /// Every repetition's weave and llama.cpp totals (the figures above are medians).
    pub runs_total_tok_s: Vec<f64>,
    pub runs_llama_cpp_tok_s: Vec<f64>,
    pub runs_prefill_tok_s: Vec<f64>,
    pub runs_llama_cpp_prefill_tok_s: Vec<f64>,
    /// Medians over the runs of the requests' mean TTFT and TPOT (ms).
    pub ttft_ms: f64,
    pub tpot_ms: f64,
    /// Medians over the runs of the mean step's forward and sample phases (ms).
    pub forward_ms: f64,
    pub sample_ms: f64,
    /// On a GPU: the decode roofline's output tok/s at this concurrency (weights and the mean
    /// context's KV read once a step at the measured copy bandwidth, or the FLOPs at the
    /// measured GEMM rate, whichever is slower), and weave's output tok/s over it.
    pub roofline_output_tok_s: Option<f64>,
    pub roofline_ratio: Option<f64>,
    /// On a GPU: the median over the runs of the share of the device's timeline in which it
    /// waited on the host between steps (CUDA events).
    pub gpu_gap_share: Option<f64>,
}

/// One run's measurements.
#[derive(Debug, Clone, Copy)]
struct Run {
    wall_s: f64,
    prompt_tokens: usize,
    output_tokens: usize,
    /// When the last request got its first token.
    last_first_token_s: f64,
    /// Means over the requests (ms).
    ttft_ms: f64,
    tpot_ms: f64,
    /// Mean step phases (ms): forward, sample.
    forward_ms: f64,
    sample_ms: f64,
    /// Summed device gaps over summed device busy + gaps, where steps recorded them.
    gpu_gap_share: Option<f64>,
}

/// The GPU side of a benchmark: one CUDA backend (the weights stay on the device across runs)
/// and the device's ceilings, measured once at the start.
#[derive(Debug)]
pub struct GpuBench {
    pub backend: crate::backends::cuda::model::CudaBackend,
    pub ceilings: crate::backends::cuda::roofline::Ceilings,
}

/// The median (the mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A prompt of exactly `n` tokens: distinct per request so nothing hits the prefix cache.
pub fn synthetic_prompt(lm: &LoadedModel, n: usize, salt: usize) -> anyhow::Result<String> {
    let words = ["river", "stone", "light", "market", "garden", "winter", "paper", "signal", "orbit", "copper"];
    let mut text = format!("Request {salt}:");
    let mut i = salt;
    while lm.tokenizer.encode(&text)?.len() < n {
        text.push(' ');
        text.push_str(words[i % words.len()]);
        i = i * 7 + 3;
    }
    // Trim back to exactly n tokens.
    let ids = lm.tokenizer.encode(&text)?;
    Ok(lm.tokenizer.decode(&ids[..n]))
}

/// Peak resident memory of this process (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Peak resident memory of the largest child process waited for so far (Linux), in MiB.
pub fn children_peak_rss_mib() -> Option<f64> {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } == 0;
    // `ru_maxrss` is in KiB on Linux.
    (ok && u.ru_maxrss > 0).then(|| u.ru_maxrss as f64 / 1024.0)
}

#[allow(clippy::too_many_arguments)]
pub fn bench_generate(
    lm: &LoadedModel,
    model_path: &Path,
    concurrency: &[usize],
    prompt_len: usize,
    output_len: usize,
    threads: usize,
    budget: usize,
    llama_bench: Option<&Path>,
    repeat: usize,
    gpu: Option<&mut GpuBench>,
    on_progress: &mut dyn FnMut(usize, usize, &str),
) -> anyhow::Result<Vec<BenchRow>> {
    let mut gpu = gpu;
    let mut ours: Vec<Vec<Run>> = vec![Vec::new(); concurrency.len()];
    // llama.cpp's (S_PP, S) per repetition.
    let mut base: Vec<Vec<(f64, f64)>> = vec![Vec::new(); concurrency.len()];
    // Interleave the two engines so a noisy neighbour hits both alike.
    let rounds = repeat.max(1);
    let total = rounds * (concurrency.len() + usize::from(llama_bench.is_some()));
    let mut done = 0;
    for round in 1..=rounds {
        if let Some(p) = llama_bench {
            on_progress(done, total, &format!("round {round}/{rounds}: llama-batched-bench"));
            for (b, pp, s) in run_llama_batched_bench(p, model_path, concurrency, prompt_len, output_len, threads)? {
                if let Some(i) = concurrency.iter().position(|&c| c == b) {
                    base[i].push((pp, s));
                }
            }
            done += 1;
        }
        for (i, &b) in concurrency.iter().enumerate() {
            on_progress(done, total, &format!("round {round}/{rounds}: weave, {b} concurrent"));
            ours[i].push(run_weave(lm, b, prompt_len, output_len, threads, budget, gpu.as_deref_mut())?);
            done += 1;
        }
    }
    on_progress(done, total, "done");
    // The decode roofline on a GPU: per step, the bf16 weights and the KV of `b` sequences at
    // the mean context are read once; the FLOPs are 2 per weight per sequence.
    let ctx = prompt_len as f64 + output_len as f64 / 2.0;
    let roofline = |b: usize| -> Option<f64> {
        let g = gpu.as_ref()?;
        let (wb, kv_per_token) = (g.backend.weight_bytes() as f64, g.backend.kv_bytes_per_token() as f64);
        let bytes = wb + b as f64 * ctx * kv_per_token;
        let flops = 2.0 * (wb / 2.0) * b as f64;
        let t = (bytes / (g.ceilings.copy_gbs * 1e9)).max(flops / (g.ceilings.gemm_tflops * 1e12));
        Some(b as f64 / t)
    };
    let mut rows = Vec::new();
    for (i, &b) in concurrency.iter().enumerate() {
        let runs = &ours[i];
        let totals: Vec<f64> = runs.iter().map(|r| (r.prompt_tokens + r.output_tokens) as f64 / r.wall_s).collect();
        let outs: Vec<f64> = runs.iter().map(|r| r.output_tokens as f64 / r.wall_s).collect();
        let prefills: Vec<f64> = runs.iter().map(|r| r.prompt_tokens as f64 / r.last_first_token_s).collect();
        let walls: Vec<f64> = runs.iter().map(|r| r.wall_s).collect();
        let (total, prefill) = (median(&totals), median(&prefills));
        let llama_pp: Vec<f64> = base[i].iter().map(|b| b.0).collect();
        let llama_s: Vec<f64> = base[i].iter().map(|b| b.1).collect();
        let llama = (!llama_s.is_empty()).then(|| median(&llama_s));
        let llama_prefill = (!llama_pp.is_empty()).then(|| median(&llama_pp));
        rows.push(BenchRow {
            concurrency: b,
            prompt_tokens: runs[0].prompt_tokens,
            output_tokens: runs[0].output_tokens,
            wall_s: median(&walls),
            total_tok_s: total,
            output_tok_s: median(&outs),
            prefill_tok_s: prefill,
            llama_cpp_total_tok_s: llama,
            llama_cpp_prefill_tok_s: llama_prefill,
            ratio: llama.map(|x| total / x),
            prefill_ratio: llama_prefill.map(|x| prefill / x),
            runs_total_tok_s: totals,
            runs_llama_cpp_tok_s: llama_s,
            runs_prefill_tok_s: prefills,
            runs_llama_cpp_prefill_tok_s: llama_pp,
            ttft_ms: median(&runs.iter().map(|r| r.ttft_ms).collect::<Vec<_>>()),
            tpot_ms: median(&runs.iter().map(|r| r.tpot_ms).collect::<Vec<_>>()),
            forward_ms: median(&runs.iter().map(|r| r.forward_ms).collect::<Vec<_>>()),
            sample_ms: median(&runs.iter().map(|r| r.sample_ms).collect::<Vec<_>>()),
            roofline_output_tok_s: roofline(b),
            roofline_ratio: roofline(b).map(|r| median(&outs) / r),
            gpu_gap_share: {
                let g: Vec<f64> = runs.iter().filter_map(|r| r.gpu_gap_share).collect();
                (!g.is_empty()).then(|| median(&g))
            },
        });
    }
    Ok(rows)
}

/// A benchmark's run of `b` requests on the CPU backend: all of them at once (`b` sequences,
/// a KV cache that holds them all), each for exactly `output_len` tokens (EOS ignored).
fn bench_config(
    lm: &LoadedModel,
    b: usize,
    prompt_len: usize,
    output_len: usize,
    budget: usize,
    threads: usize,
) -> GenerateConfig {
    let kv_tokens = b * (prompt_len + output_len) + 64 * 16;
    GenerateConfig {
        sched: SchedulerConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: b.max(1),
            max_model_len: lm.model.cfg.context_length,
            num_gpu_blocks: kv_tokens / 16 + 2,
            ..Default::default()
        },
        default_max_tokens: output_len,
        sampling: SamplingParams::default(),
        chat: false,
        ignore_eos: true,
        threads,
        device: Default::default(),
        gpu_memory_utilization: 0.9,
        enforce_eager: false,
        profile_layers: false,
    }
}

/// One weave run, on the CPU backend or on the GPU one kept in `gpu`.
fn run_weave(
    lm: &LoadedModel,
    b: usize,
    prompt_len: usize,
    output_len: usize,
    threads: usize,
    budget: usize,
    gpu: Option<&mut GpuBench>,
) -> anyhow::Result<Run> {
    let prompts: Vec<PromptSpec> = (0..b)
        .map(|i| {
            Ok(PromptSpec {
                prompt: synthetic_prompt(lm, prompt_len, i)?,
                max_tokens: Some(output_len),
                ..Default::default()
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let cfg = bench_config(lm, b, prompt_len, output_len, budget, threads);
    let r = match gpu {
        None => generate(lm, &cfg, &prompts, &mut |_| {})?,
        Some(g) => {
            let sched = SchedulerConfig {
                num_gpu_blocks: g.backend.num_blocks(),
                max_model_len: g.backend.max_model_len(),
                ..cfg.sched.clone()
            };
            crate::generate::generate_on(lm, &cfg, &sched, &prompts, &mut g.backend, &mut |_| {})?
        }
    };
    let p: usize = r.completions.iter().map(|c| c.prompt_token_ids.len()).sum();
    let o: usize = r.completions.iter().map(|c| c.output_token_ids.len()).sum();
    if o != b * output_len {
        bail!("benchmark run produced {o} tokens, expected {}", b * output_len);
    }
    let last_first_token_s = r.completions.iter().filter_map(|c| c.ttft_ms).fold(0f64, f64::max) / 1e3;
    if last_first_token_s <= 0.0 {
        bail!("benchmark run recorded no time to first token");
    }
    let mean = |xs: Vec<f64>| if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / xs.len() as f64 };
    let phases: Vec<_> = r.run.steps.iter().filter_map(|s| s.phases).collect();
    Ok(Run {
        wall_s: r.wall_s,
        prompt_tokens: p,
        output_tokens: o,
        last_first_token_s,
        ttft_ms: mean(r.completions.iter().filter_map(|c| c.ttft_ms).collect()),
        tpot_ms: mean(r.completions.iter().filter_map(|c| c.tpot_ms).collect()),
        forward_ms: mean(phases.iter().map(|p| p.forward * 1e3).collect()),
        sample_ms: mean(phases.iter().map(|p| p.sample * 1e3).collect()),
        gpu_gap_share: {
            let busy: f64 = phases.iter().map(|p| p.gpu_busy).sum();
            let gap: f64 = phases.iter().map(|p| p.gpu_gap).sum();
            (busy > 0.0).then(|| gap / (busy + gap))
        },
    })
}

/// Runs llama-batched-bench and returns (B, S_PP t/s, S t/s) per concurrency.
fn run_llama_batched_bench(
    exe: &Path,
    model: &Path,
    concurrency: &[usize],
    pp: usize,
    tg: usize,
    threads: usize,
) -> anyhow::Result<Vec<(usize, f64, f64)>> {
    let npl = concurrency.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",");
    let ctx = concurrency.iter().max().unwrap_or(&1) * (pp + tg) + 256;
    let out = std::process::Command::new(exe)
        .arg("-m")
        .arg(model)
        .args(["-c", &ctx.to_string(), "-b", "2048", "-ub", "512", "-npp", &pp.to_string(), "-ntg", &tg.to_string()])
        .args(["-npl", &npl, "-t", &threads.to_string(), "-tb", &threads.to_string()])
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{} failed:\n{text}", exe.display());
    }
    // Table rows: |  PP |  TG |  B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    let mut rows = Vec::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        if cells.len() >= 10 {
            if let (Ok(b), Ok(pp), Ok(s)) =
                (cells[2].parse::<usize>(), cells[5].parse::<f64>(), cells[9].parse::<f64>())
            {
                rows.push((b, pp, s));
            }
        }
    }
    if rows.is_empty() {
        bail!("could not read llama-batched-bench's table:\n{text}");
    }
    Ok(rows)
}

/// One repetition of `weave bench structured`: the same batch run unconstrained and with
/// every row held to a JSON schema.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StructuredRep {
    /// Mean wall time of the steps in which every row decodes (ms).
    pub free_step_ms: f64,
    pub guided_step_ms: f64,
    /// Guided run, per such step: the mask workers' time and the step's wait for them (ms).
    pub mask_ms: f64,
    pub mask_wait_ms: f64,
    pub steps: usize,
}

/// The step-time cost of structured outputs on the CPU backend: `b` requests of `prompt_len`
/// tokens decoding `output_len` tokens each, unconstrained and then each held to a JSON schema
/// that cannot complete before `output_len` tokens (so both runs have the same steps), `repeat`
/// times interleaved. Compared over the steps where all `b` rows decode.
pub fn bench_structured(
    lm: &LoadedModel,
    b: usize,
    prompt_len: usize,
    output_len: usize,
    threads: usize,
    repeat: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Vec<StructuredRep>> {
    // An array of objects long enough that no row finishes early: each item is ~10 tokens.
    let schema = serde_json::json!({
        "type": "array",
        "items": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9999},
            "name": {"type": "string", "maxLength": 16},
            "ok": {"type": "boolean"}
        }, "required": ["id", "name", "ok"], "additionalProperties": false},
        "minItems": output_len, "maxItems": output_len
    });
    let prompts = |guided: bool| -> anyhow::Result<Vec<PromptSpec>> {
        (0..b)
            .map(|i| {
                Ok(PromptSpec {
                    prompt: synthetic_prompt(lm, prompt_len, i)?,
                    max_tokens: Some(output_len),
                    temperature: Some(1.0),
                    seed: Some(i as u64),
                    structured_outputs: guided.then(|| serde_json::json!({"json": schema})),
                    ..Default::default()
                })
            })
            .collect()
    };
    let (free, guided) = (prompts(false)?, prompts(true)?);
    let cfg = bench_config(lm, b, prompt_len, output_len, (b * prompt_len).max(256), threads);
    // The steps where every row decodes, and their mean time and mask phases.
    let full_steps = |r: &crate::generate::GenerateReport| -> anyhow::Result<(f64, f64, f64, usize)> {
        let steps: Vec<_> = r.run.steps.iter().filter(|s| s.decode_tokens == b && s.prefill_tokens == 0).collect();
        anyhow::ensure!(!steps.is_empty(), "no step decoded all {b} rows");
        if let Some((name, why)) = r.rejected.first() {
            anyhow::bail!("request {name} was refused: {why}");
        }
        let n = steps.len() as f64;
        let mean = |f: &dyn Fn(&crate::engine::steplog::StepRecord) -> f64| steps.iter().map(|s| f(s)).sum::<f64>() / n;
        Ok((
            mean(&|s| s.duration) * 1e3,
            mean(&|s| s.phases.map_or(0.0, |p| p.mask)) * 1e3,
            mean(&|s| s.phases.map_or(0.0, |p| p.mask_wait)) * 1e3,
            steps.len(),
        ))
    };
    // The token trie is built once, before any run is timed.
    lm.guides()?;
    let mut reps = Vec::with_capacity(repeat);
    for k in 0..repeat.max(1) {
        progress(k, repeat.max(1));
        let f = full_steps(&generate(lm, &cfg, &free, &mut |_| {})?)?;
        let g = full_steps(&generate(lm, &cfg, &guided, &mut |_| {})?)?;
        anyhow::ensure!(f.3 == g.3, "the runs differ in shape: {} and {} all-decode steps", f.3, g.3);
        reps.push(StructuredRep {
            free_step_ms: f.0,
            guided_step_ms: g.0,
            mask_ms: g.1,
            mask_wait_ms: g.2,
            steps: g.3,
        });
    }
    progress(repeat.max(1), repeat.max(1));
    Ok(reps)
}
