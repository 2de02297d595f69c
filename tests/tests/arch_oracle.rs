//! Each architecture weave reads (Llama 3 with rotary divisors, Qwen2, Qwen3, Gemma 3) against
//! llama.cpp, on small random-weight models (`weave::model::synth`) that the test rebuilds from
//! their seeds; `tests/fixtures/arch_oracle.json` holds the vocabulary and what llama.cpp made
//! of the same files (`tools/golden/arch_oracle.py`):
//! - the tokenization of a corpus under each tokenizer (llama-bpe, qwen2, SentencePiece);
//! - the first step's log-probabilities, and greedy continuations: where weave's token parts
//!   from llama.cpp's, llama.cpp's own top two must be within a rounding of each other there;
//! - batch invariance: each prompt's tokens inside a batch equal its tokens alone.

use serde_json::Value;
use std::path::PathBuf;
use weave::generate::{generate, GenerateConfig, LoadedModel, PromptSpec};
use weave::model::gguf::GgmlType;
use weave::model::synth::{gguf, quant_specs, specs, SynthSpec, SynthVocab};
use weave::model::weights::Precision;
use weave::sampling::SamplingParams;
use weave_scheduler::{NewRequest, Scheduler, SchedulerConfig};

/// Both sides run f32 weights, an f32 KV cache and plain attention (the script asks
/// llama.cpp for them); what is left is the order of sums: a few 1e-6 in log-probability.
/// The same bounds the gap where greedy tokens part.
const LOGPROB_TOL: f64 = 1e-4;
/// Gemma's GELU: ggml reads it from an f16 table (about 2e-3 measured).
const GELU_LOGPROB_TOL: f64 = 5e-3;
/// An f32 file with weave's default (packed) settings: the f16 KV cache (about 2e-3 measured).
const F16_KV_LOGPROB_TOL: f64 = 1e-2;
/// Quantized files: llama.cpp rounds the activations of every product to 8 bits (blocks of
/// 32, or 256 against K-quants), weave to 8 bits in blocks of 32 when packed and not at all
/// with `--cpu-precision f32`; on these small random models that moves a log-probability by
/// up to 0.20 (measured, both ways).
const QUANT_LOGPROB_TOL: f64 = 0.3;
/// The real Gemma 3 270M on weave's packed path against llama.cpp on the Q4_K_M file. Both
/// round activations to 8 bits, differently, and on this real model that moves the tail of a
/// step's top tokens by far more than on the random ones: llama.cpp against itself, recorded
/// on an AVX-512 machine and on an AVX2 one, moved by up to 0.16 at the first step and 3.4
/// later. The largest first-step difference, `<eos>` after the code prompt, is rounding: with
/// exact weights weave gives -2.23 there, as llama.cpp does on the weights widened to F32
/// (-2.231; see `real_gemma3_270m_exact_weights_equal_llama_cpps_f32`), against -1.82 on
/// the Q4_K_M file; weave's packed path gives -2.43. The bound holds that one prompt; every
/// other must meet `QUANT_LOGPROB_TOL`.
const REAL_GEMMA_LOGPROB_TOL: f64 = 0.85;

/// The bound for model `s` at `precision`, on first-step log-probabilities and on llama.cpp's
/// gap where greedy tokens part.
fn tolerance(s: &SynthSpec, precision: Precision) -> f64 {
    if s.ty != GgmlType::F32 {
        QUANT_LOGPROB_TOL
    } else if precision == Precision::Quant {
        F16_KV_LOGPROB_TOL
    } else if s.arch == "gemma3" {
        // ggml's GELU reads an f16 table: Gemma's logits carry its rounding.
        GELU_LOGPROB_TOL
    } else {
        LOGPROB_TOL
    }
}

fn fixture() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/arch_oracle.json");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (make it with tools/golden/arch_oracle.py)", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Each of `specs`' models, written to a temporary file and loaded at `precision`.
fn models(f: &Value, specs: Vec<SynthSpec>, precision: Precision) -> Vec<(SynthSpec, LoadedModel)> {
    let bpe: SynthVocab = serde_json::from_value(f["vocab"].clone()).unwrap();
    let spm: SynthVocab = serde_json::from_value(f["spm_vocab"].clone()).unwrap();
    // A folder per call: the tests run at once, each writing its own copies.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("weave-arch-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = specs
        .into_iter()
        .map(|s| {
            let p = dir.join(format!("{}.gguf", s.name));
            std::fs::write(&p, gguf(&s, if s.spm() { &spm } else { &bpe })).unwrap();
            let lm = LoadedModel::load_with(&p, precision).unwrap_or_else(|e| panic!("{}: {e:#}", s.name));
            (s, lm)
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn config(budget: usize) -> GenerateConfig {
    GenerateConfig {
        sched: SchedulerConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: 16,
            max_model_len: 256,
            block_size: 16,
            num_gpu_blocks: 256,
            enable_chunked_prefill: true,
            enable_prefix_caching: true,
            ..Default::default()
        },
        default_max_tokens: 32,
        sampling: SamplingParams::default(),
        chat: false,
        ignore_eos: true,
        threads: 2,
        device: Default::default(),
        gpu_memory_utilization: 0.9,
        enforce_eager: false,
        profile_layers: false,
    }
}

#[test]
fn tokenization_equals_llama_cpps() {
    let f = fixture();
    let ms = models(&f, specs(), Precision::F32);
    for (pre, cases) in f["tokenize"].as_object().unwrap() {
        let (s, lm) = ms.iter().find(|(s, _)| s.pre == pre).unwrap_or_else(|| panic!("no synthetic model uses {pre}"));
        let cases = cases.as_array().unwrap();
        assert!(cases.len() >= 200, "{pre}: {} strings", cases.len());
        let mut wrong = Vec::new();
        for c in cases {
            let text = c["text"].as_str().unwrap();
            if lm.tokenizer.encode_plain(text) != ids(&c["ids"]) {
                wrong.push(text);
            }
        }
        assert!(
            wrong.is_empty(),
            "{pre} ({}): {} of {} strings differ, e.g. {:?}",
            s.name,
            wrong.len(),
            cases.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}

/// Compares one model's first-step log-probabilities and greedy tokens with llama.cpp's:
/// returns the largest first-step difference, how many tokens of each prompt agree, and
/// llama.cpp's gap between its token and ours where they part.
fn against_llama_cpp(f: &Value, s: &SynthSpec, lm: &LoadedModel, gap_tol: f64) -> (f64, Vec<usize>, Vec<f64>) {
    let name = &s.name;
    let prompts =
        f["models"][name]["prompts"].as_array().unwrap_or_else(|| panic!("{name}: no prompts in the fixture"));
    let (diffs, agreed, gaps) = prompts_against_llama_cpp(name, prompts, lm, gap_tol);
    (diffs.iter().copied().fold(0.0, f64::max), agreed, gaps)
}

/// [`against_llama_cpp`] on the recorded `prompts` of model `name`, with each prompt's
/// largest first-step difference.
fn prompts_against_llama_cpp(
    name: &str,
    prompts: &[Value],
    lm: &LoadedModel,
    gap_tol: f64,
) -> (Vec<f64>, Vec<usize>, Vec<f64>) {
    let reqs: Vec<PromptSpec> = prompts
        .iter()
        .map(|p| PromptSpec { prompt: p["text"].as_str().unwrap().into(), ..Default::default() })
        .collect();
    let r = generate(lm, &config_for(lm, 512), &reqs, &mut |_| {}).unwrap();
    assert!(r.rejected.is_empty(), "{name}: {:?}", r.rejected);
    let (mut diffs, mut agreed, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
    for (p, c) in prompts.iter().zip(&r.completions) {
        let pname = p["text"].as_str().unwrap();
        assert_eq!(c.prompt_token_ids, ids(&p["prompt_ids"]), "{name}: prompt {pname:?}");
        // The first step's log-probabilities of llama.cpp's top tokens.
        let mut sch = Scheduler::new(weave::generate::sched_for_model(&config(512).sched, &lm.model.cfg)).unwrap();
        sch.add_request(NewRequest::new(0, c.prompt_token_ids.clone(), 1)).unwrap();
        let b = sch.schedule();
        let mut be = weave::backends::cpu::CpuBackend::new(lm.model.clone(), 256, 16, 2, 0);
        let logits = be.forward(&b);
        // `top`: per step, llama.cpp's `[id, log-probability]` pairs, most likely first.
        let mut diff = 0.0f64;
        for t in p["top"][0].as_array().unwrap() {
            let ours = log_softmax_at(&logits, t[0].as_u64().unwrap() as usize);
            diff = diff.max((ours - t[1].as_f64().unwrap()).abs());
        }
        diffs.push(diff);
        // Greedy tokens, up to a parting that llama.cpp's own log-probabilities allow: there,
        // our token must be as likely as theirs to within `gap_tol`. (llama.cpp's
        // `ignore_eos` bans end-of-generation tokens, weave's only keeps going, so an end
        // token of ours parts from theirs by being the likelier.)
        let (ours, theirs) = (&c.output_token_ids, ids(&p["tokens"]));
        assert_eq!((ours.len(), theirs.len()), (32, 32), "{name}, {pname:?}");
        let same = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
        if same < theirs.len() {
            let lp = |id: u32| {
                p["top"][same]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|t| t[0].as_u64() == Some(id as u64))
                    .map(|t| t[1].as_f64().unwrap())
            };
            let gap = lp(ours[same]).zip(lp(theirs[same])).map(|(o, t)| t - o);
            assert!(
                gap.is_some_and(|g| g < gap_tol),
                "{name}, {pname:?}: token {same} is {} where llama.cpp's is {} (llama.cpp's log-probability gap: {gap:?}, allowed {gap_tol})\n ours   {ours:?}\n theirs {theirs:?}",
                ours[same],
                theirs[same],
            );
            gaps.extend(gap);
        }
        agreed.push(same);
    }
    (diffs, agreed, gaps)
}

#[test]
fn first_step_logprobs_and_greedy_tokens_equal_llama_cpps() {
    let f = fixture();
    for (s, lm) in models(&f, specs(), Precision::F32) {
        let tol = tolerance(&s, Precision::F32);
        let (worst, agreed, gaps) = against_llama_cpp(&f, &s, &lm, tol);
        println!(
            "{}: largest first-step |logprob - llama.cpp's| {worst:.2e}; greedy tokens agreeing {agreed:?} of 32 (gaps where they part: {gaps:.3?})",
            s.name
        );
        assert!(worst < tol, "{}: first-step log-probabilities differ from llama.cpp's by {worst}", s.name);
    }
}

/// Every architecture at hidden 256 (heads of 64 and 128: the attention's SIMD paths) with its
/// matrices in f32 and in each quantized type, against llama.cpp on the same file: with
/// weave's exact weights (f32 at load), and packed (as weave serves by default). The bounds
/// are [`tolerance`]'s: exact for f32 files, the quantization's for the others.
#[test]
fn quantized_models_follow_llama_cpp() {
    let f = fixture();
    for precision in [Precision::F32, Precision::Quant] {
        let mut whole = 0;
        let ms = models(&f, quant_specs(), precision);
        for (s, lm) in &ms {
            let tol = tolerance(s, precision);
            let (worst, agreed, gaps) = against_llama_cpp(&f, s, lm, tol);
            println!(
                "{} ({precision:?}): largest first-step |logprob - llama.cpp's| {worst:.2e}; greedy tokens agreeing {agreed:?} of 32 (gaps where they part: {gaps:.3?})",
                s.name
            );
            assert!(
                worst < tol,
                "{} ({precision:?}): first-step log-probabilities differ from llama.cpp's by {worst}",
                s.name
            );
            whole += agreed.iter().filter(|&&n| n == 32).count();
        }
        // Partings at near ties are allowed one by one; most prompts must agree whole.
        let total = 3 * ms.len();
        assert!(2 * whole >= total, "{precision:?}: only {whole} of {total} prompts agree for all 32 tokens");
    }
}

fn log_softmax_at(logits: &[f32], i: usize) -> f64 {
    let m = logits.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    logits[i] as f64 - m - z.ln()
}

#[test]
fn batch_invariance_on_each_architecture() {
    let f = fixture();
    let mut all = models(&f, specs(), Precision::F32);
    all.extend(models(&f, quant_specs(), Precision::Quant));
    for (s, lm) in all {
        let prompts: Vec<PromptSpec> = f["models"][&s.name]["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| PromptSpec { prompt: p["text"].as_str().unwrap().into(), ..Default::default() })
            .collect();
        // All together on a small budget (chunked prefills beside decodes), then each alone.
        let together = generate(&lm, &config_for(&lm, 24), &prompts, &mut |_| {}).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let alone = generate(&lm, &config_for(&lm, 512), std::slice::from_ref(p), &mut |_| {}).unwrap();
            assert_eq!(
                together.completions[i].output_token_ids, alone.completions[0].output_token_ids,
                "{}: prompt {i} inside the batch",
                s.name
            );
        }
    }
}

/// [`config`] with the model's KV layer groups: a sliding-window model's window layers keep
/// only their window's blocks (the CLI's default, `weave::generate::sched_for_model`).
fn config_for(lm: &LoadedModel, budget: usize) -> GenerateConfig {
    let c = config(budget);
    GenerateConfig { sched: weave::generate::sched_for_model(&c.sched, &lm.model.cfg), ..c }
}

/// On each sliding-window fixture, window layers that give their old blocks back (the hybrid
/// layout) change no token: long prompts, chunked over several steps beside decodes, give the
/// greedy tokens of the layout where every layer keeps every token, in less KV memory.
#[test]
fn window_layers_release_blocks_without_changing_a_token() {
    let f = fixture();
    let mut all = models(&f, specs(), Precision::F32);
    all.extend(models(&f, quant_specs(), Precision::Quant));
    let mut checked = Vec::new();
    for (s, lm) in all {
        let layout = lm.model.cfg.kv_layout();
        if layout.groups.windowed == 0 {
            continue;
        }
        let texts: Vec<String> = f["models"][&s.name]["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["text"].as_str().unwrap().into())
            .collect();
        // Prompts several blocks past the window, and the short ones beside them.
        let long = texts.join(" ");
        let mut prompts = vec![
            PromptSpec { prompt: long.clone(), max_tokens: Some(24), ..Default::default() },
            PromptSpec { prompt: long[long.len() / 3..].into(), max_tokens: Some(24), ..Default::default() },
        ];
        prompts.extend(texts.iter().map(|t| PromptSpec { prompt: t.clone(), ..Default::default() }));
        let mut hybrid = config_for(&lm, 32);
        hybrid.sched.enable_prefix_caching = false;
        let mut single = config(32);
        single.sched.enable_prefix_caching = false;
        let h = generate(&lm, &hybrid, &prompts, &mut |_| {}).unwrap();
        let full = generate(&lm, &single, &prompts, &mut |_| {}).unwrap();
        assert!(h.rejected.is_empty() && full.rejected.is_empty(), "{}: {:?} {:?}", s.name, h.rejected, full.rejected);
        // With prefix caching, the long prompt again (and its longer cousin) reuses the first
        // one's blocks, window groups included: the same tokens.
        let mut again = prompts.clone();
        again.push(prompts[0].clone());
        again.push(PromptSpec { prompt: format!("{long} {}", texts[0]), max_tokens: Some(24), ..Default::default() });
        let cached = generate(&lm, &config_for(&lm, 32), &again, &mut |_| {}).unwrap();
        let plain = generate(&lm, &single, &again, &mut |_| {}).unwrap();
        assert!(
            cached.summary.prefix_cache_hit_rate > 0.1,
            "{}: hit rate {}",
            s.name,
            cached.summary.prefix_cache_hit_rate
        );
        for (i, (a, b)) in cached.completions.iter().zip(&plain.completions).enumerate() {
            assert_eq!(a.output_token_ids, b.output_token_ids, "{}: prompt {i} with prefix caching", s.name);
        }
        let n = h.completions[0].prompt_token_ids.len();
        assert!(n > 4 * 16 + layout.groups.window, "{}: the long prompt is {n} tokens, too short to release", s.name);
        for (i, (a, b)) in h.completions.iter().zip(&full.completions).enumerate() {
            assert_eq!(a.output_token_ids, b.output_token_ids, "{}: prompt {i}", s.name);
        }
        // Peak KV memory in layer-blocks: a hybrid block holds one group's layers, a plain one
        // every layer; both pools hold the same number of blocks.
        let peak = |r: &weave::generate::GenerateReport, layers: usize| {
            r.summary.kv_usage.max * (hybrid.sched.num_gpu_blocks - 1) as f64 * layers as f64
        };
        let (ph, pf) = (peak(&h, layout.group_size), peak(&full, lm.model.cfg.num_layers));
        assert!(ph < 0.8 * pf, "{}: peak KV {ph} layer-blocks with windows, {pf} without", s.name);
        checked.push((s.name.clone(), ph / pf));
    }
    println!("peak KV memory with window layers releasing, against every layer keeping all: {checked:?}");
    assert!(!checked.is_empty(), "no sliding-window fixture");
}

/// A batch whose KV groups are not the cache's is an error that says so, not a panic or a
/// read of the wrong blocks.
#[test]
fn a_batch_with_other_kv_groups_is_refused() {
    use weave::engine::Backend;
    let f = fixture();
    let (_, lm) = models(&f, specs(), Precision::F32)
        .into_iter()
        .find(|(_, lm)| lm.model.cfg.kv_layout().groups.windowed > 0)
        .expect("a sliding-window fixture");
    let mut sch = Scheduler::new(config(64).sched).unwrap();
    sch.add_request(NewRequest::new(0, vec![2, 3, 4], 1)).unwrap();
    let b = sch.schedule();
    let mut be = weave::backends::cpu::CpuBackend::new(lm.model.clone(), 64, 16, 1, 0);
    let e = be.execute(&b).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("KV layer group"), "{e}");
}

/// The real Gemma 3 270M (Q4_K_M: Q4_K, Q5_0 and Q6_K matrices; a 262k-token SentencePiece
/// vocabulary), where it has been fetched (`cargo xtask fetch-model gemma3-270m`): its
/// tokenization and greedy tokens against llama.cpp's on the same file, on weave's default
/// (packed) path.
#[test]
fn real_gemma3_270m_follows_llama_cpp() {
    let f = fixture();
    let Some(want) = f.get("gemma3_270m") else {
        skip("the fixture has no gemma3_270m section (tools/golden/arch_oracle.py --gemma PATH)");
        return;
    };
    let Some(p) = gemma3_270m_file() else { return };
    let lm = LoadedModel::load(&p).unwrap();
    let cases = want["tokenize"].as_array().unwrap();
    let wrong: Vec<&str> = cases
        .iter()
        .filter(|c| lm.tokenizer.encode_plain(c["text"].as_str().unwrap()) != ids(&c["ids"]))
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert!(
        wrong.is_empty(),
        "gemma3-270m: {} of {} strings differ, e.g. {:?}",
        wrong.len(),
        cases.len(),
        &wrong[..wrong.len().min(5)]
    );
    let (mut diffs, agreed, gaps) =
        prompts_against_llama_cpp("gemma3-270m", want["prompts"].as_array().unwrap(), &lm, QUANT_LOGPROB_TOL);
    diffs.sort_by(|a, b| b.total_cmp(a));
    let (worst, next) = (diffs[0], diffs[1]);
    // Where greedy tokens part, llama.cpp's gap is the quantization's (`QUANT_LOGPROB_TOL`);
    // of the prompts' first steps, one has the wider bound above.
    println!("gemma3-270m: first-step |logprob - llama.cpp's| by prompt, largest first {diffs:.2?}; greedy tokens agreeing {agreed:?} of 32 (gaps where they part: {gaps:.3?})");
    assert!(
        worst < REAL_GEMMA_LOGPROB_TOL,
        "gemma3-270m: first-step log-probabilities differ from llama.cpp's by {worst}"
    );
    assert!(
        next < QUANT_LOGPROB_TOL,
        "gemma3-270m: a second prompt's first-step log-probabilities differ from llama.cpp's by {next}"
    );
}

/// The real Gemma 3 270M with exact weights (its Q4_K_M blocks decoded to f32, an f32 KV
/// cache) against llama.cpp on the same weights widened to F32 by `llama-quantize`, where
/// neither rounds activations: the architecture on a real model, free of the quantized
/// path's rounding noise. Bound: Gemma's GELU, which ggml reads from an f16 table.
#[test]
fn real_gemma3_270m_exact_weights_equal_llama_cpps_f32() {
    let f = fixture();
    let Some(want) = f["gemma3_270m"].get("f32_weights") else {
        skip("the fixture has no gemma3_270m.f32_weights section (tools/golden/arch_oracle.py --gemma PATH)");
        return;
    };
    let Some(p) = gemma3_270m_file() else { return };
    let lm = LoadedModel::load_with(&p, Precision::F32).unwrap();
    let (diffs, agreed, gaps) =
        prompts_against_llama_cpp("gemma3-270m (f32)", want["prompts"].as_array().unwrap(), &lm, GELU_LOGPROB_TOL);
    let worst = diffs.iter().copied().fold(0.0, f64::max);
    let shown: Vec<String> = diffs.iter().map(|d| format!("{d:.1e}")).collect();
    println!("gemma3-270m, exact weights: first-step |logprob - llama.cpp's on F32| by prompt {shown:?}; greedy tokens agreeing {agreed:?} of 32 (gaps where they part: {gaps:.3?})");
    assert!(
        worst < GELU_LOGPROB_TOL,
        "gemma3-270m (f32): first-step log-probabilities differ from llama.cpp's by {worst}"
    );
}

/// The real Gemma 3 270M Q4_K_M file, or `None` having said why the test is skipped.
fn gemma3_270m_file() -> Option<PathBuf> {
    let p = weave::paths::cache_dir().join("models/gemma-3-270m-q4_k_m.gguf");
    if !p.exists() {
        skip(&format!("{} not found (run `cargo xtask fetch-model gemma3-270m`)", p.display()));
        return None;
    }
    Some(p)
}

/// Says `skipped: <reason>` where the test output shows it (stderr, past the capture).
fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}
