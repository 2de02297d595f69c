//! The CPU backend on the real reference model against golden fixtures made by an independent
//! implementation (tools/golden/make_golden.py: llama.cpp's tokenizer, a numpy float64 Llama
//! forward), and batch invariance.
//!
//! Needs the reference model (`cargo xtask fetch-model`; CI fetches it first). Without it,
//! each test prints `skipped: ...`.

use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;
use weave::generate::{generate, GenerateConfig, LoadedModel, PromptSpec};
use weave::model::weights::Precision;
use weave::sampling::SamplingParams;
use weave_scheduler::{NewRequest, Scheduler, SchedulerConfig};

/// The reference model at `precision`, or `None` after saying `skipped: ...` (once per test).
fn model_at(precision: Precision) -> Option<&'static LoadedModel> {
    static M: [OnceLock<Result<LoadedModel, String>>; 2] = [OnceLock::new(), OnceLock::new()];
    let m = M[precision as usize].get_or_init(|| {
        let p = std::env::var_os("WEAVE_MODEL").map(PathBuf::from).unwrap_or_else(weave::paths::default_model_path);
        if !p.exists() {
            return Err(format!("reference model not found at {} (run `cargo xtask fetch-model`)", p.display()));
        }
        Ok(LoadedModel::load_with(&p, precision).expect("reference model loads"))
    });
    match m {
        Ok(lm) => Some(lm),
        Err(why) => {
            skip(why);
            None
        }
    }
}

/// The exact path (f32 weights), which the golden tolerances are for.
fn model() -> Option<&'static LoadedModel> {
    model_at(Precision::F32)
}

fn golden() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden_smollm2.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn config(budget: usize, chunked: bool, caching: bool) -> GenerateConfig {
    GenerateConfig {
        sched: SchedulerConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: 64,
            max_model_len: 2048,
            block_size: 16,
            num_gpu_blocks: 1024,
            enable_chunked_prefill: chunked,
            enable_prefix_caching: caching,
            ..Default::default()
        },
        default_max_tokens: 24,
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

/// Greedy output tokens of each prompt, by prompt index.
fn run(lm: &LoadedModel, cfg: &GenerateConfig, prompts: &[PromptSpec]) -> Vec<Vec<u32>> {
    let r = generate(lm, cfg, prompts, &mut |_| {}).unwrap();
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    let mut out = vec![Vec::new(); prompts.len()];
    for c in r.completions {
        out[c.id.as_u64().unwrap() as usize] = c.output_token_ids;
    }
    out
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let Some(lm) = model() else { return };
    let g = golden();
    for p in g["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let full = if p["chat"].as_bool().unwrap() {
            lm.chat.as_ref().unwrap().render_user(text).unwrap()
        } else {
            text.into()
        };
        assert_eq!(lm.tokenizer.encode(&full).unwrap(), ids(&p["prompt_ids"]), "{}", p["name"]);
        // Decoding gives the text back.
        assert_eq!(lm.tokenizer.decode(&ids(&p["prompt_ids"])), full, "{}", p["name"]);
    }
}

#[test]
fn first_step_logits_match_reference() {
    let Some(lm) = model() else { return };
    let g = golden();
    let mut worst = 0.0f64;
    for p in g["prompts"].as_array().unwrap() {
        let prompt = ids(&p["prompt_ids"]);
        let mut s = Scheduler::new(config(4096, true, false).sched).unwrap();
        s.add_request(NewRequest::new(0, prompt, 1)).unwrap();
        let b = s.schedule();
        let mut be = weave::backends::cpu::CpuBackend::new(lm.model.clone(), 1024, 16, 2, 0);
        let logits = be.forward(&b);
        for (id, want) in ids(&p["top_ids"]).iter().zip(p["top_logits"].as_array().unwrap()) {
            let err = (logits[*id as usize] as f64 - want.as_f64().unwrap()).abs();
            worst = worst.max(err);
        }
        let ours = weave_kernels_gpu::ops::argmax_row(&logits);
        assert_eq!(ours, ids(&p["top_ids"])[0], "{}: top token", p["name"]);
    }
    println!("largest |logit - reference| over the top-32 tokens of 5 prompts: {worst:.2e}");
    // f32 weights and activations over 30 layers against a float64 reference.
    assert!(worst < 1e-3, "logits differ from the reference by up to {worst}");
}

#[test]
fn greedy_continuations_match_reference() {
    let Some(lm) = model() else { return };
    let g = golden();
    let prompts: Vec<PromptSpec> = g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PromptSpec { prompt: p["text"].as_str().unwrap().into(), ..Default::default() })
        .collect();
    for (chat, want_chat) in [(false, false), (true, true)] {
        let mut cfg = config(2048, true, true);
        cfg.chat = chat;
        let sel: Vec<usize> =
            (0..prompts.len()).filter(|&i| g["prompts"][i]["chat"].as_bool().unwrap() == want_chat).collect();
        let ps: Vec<PromptSpec> = sel.iter().map(|&i| prompts[i].clone()).collect();
        let outs = run(lm, &cfg, &ps);
        for (k, &i) in sel.iter().enumerate() {
            let want = ids(&g["prompts"][i]["greedy"]);
            let same = outs[k].iter().zip(&want).take_while(|(a, b)| a == b).count();
            assert!(
                same >= 20,
                "{}: first {same} of 24 tokens agree\n ours {:?}\n want {:?}",
                g["prompts"][i]["name"],
                outs[k],
                want
            );
        }
    }
}

#[test]
fn batch_invariance() {
    for precision in [Precision::F32, Precision::Quant] {
        let Some(lm) = model_at(precision) else { return };
        batch_invariance_at(lm, precision);
    }
}

fn batch_invariance_at(lm: &LoadedModel, precision: Precision) {
    let target =
        PromptSpec { prompt: "The quick brown fox jumps over the lazy dog. Then the fox".into(), ..Default::default() };
    let alone = run(lm, &config(2048, true, true), std::slice::from_ref(&target))[0].clone();
    assert_eq!(alone.len(), 24);
    // A busy mixed batch: a long prompt being chunked, short prompts decoding, and a copy of the
    // target that shares its prefix (a prefix-cache hit for the later one).
    let long = "In the beginning there was a long document about many things. ".repeat(20);
    let mut busy: Vec<PromptSpec> = vec![
        PromptSpec { prompt: long, max_tokens: Some(8), ..Default::default() },
        PromptSpec { prompt: "Hello".into(), max_tokens: Some(30), ..Default::default() },
        target.clone(),
        PromptSpec { prompt: "1 2 3 4".into(), max_tokens: Some(5), ..Default::default() },
        target.clone(),
    ];
    busy[1].seed = Some(3);
    for (name, cfg) in [
        ("chunked, small budget", config(48, true, true)),
        ("chunked, large budget", config(4096, true, true)),
        ("no chunking", config(2048, false, true)),
        ("no prefix caching", config(64, true, false)),
    ] {
        let outs = run(lm, &cfg, &busy);
        assert_eq!(outs[2], alone, "{precision:?}, {name}: target inside the batch");
        assert_eq!(outs[4], alone, "{precision:?}, {name}: target again (prefix-cache hit when caching)");
    }
}

/// Says `skipped: <reason>` where the test output shows it: straight to stderr, since the test
/// harness captures `println!`/`eprintln!` of passing tests.
fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

#[test]
fn stop_strings_cut_the_text_whatever_the_request_ids() {
    let Some(lm) = model() else { return };
    let ps = vec![
        PromptSpec {
            id: Some(serde_json::json!("colors")),
            prompt: "List of primary colors: red,".into(),
            stop: vec!["\n".into()],
            max_tokens: Some(40),
            ..Default::default()
        },
        PromptSpec {
            id: Some(serde_json::json!("other")),
            prompt: "The capital of France is".into(),
            max_tokens: Some(8),
            ..Default::default()
        },
    ];
    let r = generate(lm, &config(2048, true, true), &ps, &mut |_| {}).unwrap();
    let ids: Vec<&str> = r.completions.iter().map(|c| c.id.as_str().unwrap()).collect();
    assert_eq!(ids, ["colors", "other"], "completions come back in the order given");
    let c = &r.completions[0];
    assert_eq!(c.finish_reason, "stop");
    assert!(!c.text.contains('\n') && !c.text.is_empty(), "text not cut at the stop string: {:?}", c.text);
    assert!(c.output_token_ids.len() < 40);
}

/// The profiler's synthetic batches on the real model: each sequence's logits inside a
/// designed mixed batch equal its logits run alone (so the batches the profile times are
/// real, well-formed work), and a small profile yields a sane model.
#[test]
fn profile_batches_are_real_work_and_the_model_is_sane() {
    use weave::study::profile::{profile_cpu, synthetic_batch, ProfileSpec, SynthSeq};
    let Some(lm) = model() else { return };
    let vocab = lm.model.cfg.vocab_size;
    let mut backend = weave::backends::cpu::CpuBackend::new(lm.model.clone(), 64, 16, 2, 0);
    // First a 40-token prefill alone, filling its blocks; then the same sequence's next
    // token as a decode row inside a batch with two other sequences, against it alone.
    let prefill = [SynthSeq { query: 40, context: 0, samples: true }];
    backend.forward(&synthetic_batch(&prefill, 16, 1000));
    let alone = backend.forward(&synthetic_batch(&[SynthSeq { query: 1, context: 40, samples: true }], 16, 1000));
    let mixed = [
        SynthSeq { query: 1, context: 40, samples: true },
        SynthSeq { query: 7, context: 0, samples: true },
        SynthSeq { query: 3, context: 0, samples: false },
    ];
    let batch = synthetic_batch(&mixed, 16, 1000);
    assert_eq!(batch.num_tokens(), 11);
    let logits = backend.forward(&batch);
    assert_eq!(logits.len(), 2 * vocab);
    let max_diff = alone.iter().zip(&logits[..vocab]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    // The GEMMs take another path at one row than at eleven (about 1e-4 apart); a wrong block
    // table or slot would put the row over other keys, orders of magnitude further.
    assert!(max_diff < 1e-3, "decode row's logits differ inside the mixed batch by {max_diff}");

    let spec = ProfileSpec { max_tokens: 16, max_seqs: 4, max_context: 64, block_size: 16, repeats: 1, threads: 2 };
    // No spread limit: a test machine's speed is whatever it is.
    let (m, report) = profile_cpu(lm, &spec, f64::INFINITY, &mut |_, _| {}).unwrap();
    assert_eq!(m.tokens, [1.0, 2.0, 4.0, 8.0, 12.0, 16.0]);
    assert_eq!(m.base_s.len(), m.tokens.len());
    assert!(m.base_s.iter().all(|&x| x > 0.0 && x.is_finite()), "{:?}", m.base_s);
    assert!(m.sampled_extra_s.windows(2).all(|w| 0.0 <= w[0] && w[0] <= w[1]), "{:?}", m.sampled_extra_s);
    assert!(m.decode_pair_s.is_finite() && m.decode_pair_s >= 0.0);
    assert!(m.decode_pair_alone_s.is_finite() && m.decode_pair_alone_s >= 0.0);
    assert!(m.prefill_row_s.windows(2).all(|w| w[0] <= w[1]), "prefill curve not monotone: {:?}", m.prefill_row_s);
    assert_eq!(report.points.len(), spec.designs().len());
    assert!(report.points.iter().all(|p| p.measured_s > 0.0 && p.predicted_s > 0.0));
}

/// First-step logits of `prompt` on `lm` (a fresh backend, one prefill).
fn first_logits(lm: &LoadedModel, prompt: &[u32]) -> Vec<f32> {
    let mut s = Scheduler::new(config(4096, true, false).sched).unwrap();
    s.add_request(NewRequest::new(0, prompt.to_vec(), 1)).unwrap();
    let b = s.schedule();
    weave::backends::cpu::CpuBackend::new(lm.model.clone(), 1024, 16, 2, 0).forward(&b)
}

/// The quantized default (packed weights, 8-bit activations per block of 32, as llama.cpp
/// computes Q4_1) states its bound: over the reference's top-10 tokens of each golden prompt,
/// logit differences to the top token (what sampling sees) within 0.6 of the reference, and
/// logits within 0.5. On this file llama.cpp's own first step is within 0.15-0.41 of the
/// reference by the first measure (`llama-server` `n_probs`, docs/PERFORMANCE.md).
#[test]
fn quantized_first_step_logits_within_stated_bound() {
    let Some(lm) = model_at(Precision::Quant) else { return };
    let g = golden();
    let (mut worst_rel, mut worst_abs) = (0f64, 0f64);
    for p in g["prompts"].as_array().unwrap() {
        let logits = first_logits(lm, &ids(&p["prompt_ids"]));
        let top = ids(&p["top_ids"]);
        let want: Vec<f64> = p["top_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let l0 = logits[top[0] as usize] as f64;
        for (k, id) in top.iter().enumerate().take(10) {
            let l = logits[*id as usize] as f64;
            worst_rel = worst_rel.max(((l - l0) - (want[k] - want[0])).abs());
            worst_abs = worst_abs.max((l - want[k]).abs());
        }
    }
    println!("quantized: top-10 relative logits within {worst_rel:.3}, logits within {worst_abs:.3} of the reference");
    assert!(worst_rel < 0.6, "relative logits differ from the reference by up to {worst_rel}");
    assert!(worst_abs < 0.5, "logits differ from the reference by up to {worst_abs}");
}

/// Greedy decoding on the quantized path against the reference: where the two part, the
/// reference's own top-2 gap at that step (measured on the exact path, which matches the
/// reference to 1e-3) is within the stated bound, i.e. the step was a near-tie that 8-bit
/// activations may flip. llama.cpp parts from the same reference too (after 5 and 12 tokens
/// on "short" and "code").
#[test]
fn quantized_greedy_parts_only_at_near_ties() {
    let (Some(lq), Some(lf)) = (model_at(Precision::Quant), model_at(Precision::F32)) else { return };
    let g = golden();
    let mut report = Vec::new();
    for p in g["prompts"].as_array().unwrap() {
        let prompt = ids(&p["prompt_ids"]);
        let want = ids(&p["greedy"]);
        let spec = PromptSpec { prompt: lq.tokenizer.decode(&prompt), ..Default::default() };
        let mut cfg = config(2048, true, false);
        cfg.default_max_tokens = want.len();
        let r = generate(lq, &cfg, std::slice::from_ref(&spec), &mut |_| {}).unwrap();
        assert_eq!(r.completions[0].prompt_token_ids, prompt, "{}: re-encoding", p["name"]);
        let ours = &r.completions[0].output_token_ids;
        let same = ours.iter().zip(&want).take_while(|(a, b)| a == b).count();
        if same == want.len() {
            report.push(format!("{}: 24/24", p["name"]));
            continue;
        }
        let mut ctx = prompt.clone();
        ctx.extend(&want[..same]);
        let logits = first_logits(lf, &ctx);
        let (a, b) = (logits[want[same] as usize], logits[ours[same] as usize]);
        let gap = (a - b) as f64;
        report.push(format!("{}: {same}/24, parted where the reference's margin was {gap:.3}", p["name"]));
        assert!(
            gap < 0.6,
            "{}: parted after {same} tokens where the reference preferred {} over {} by {gap}, more than the stated bound",
            p["name"],
            want[same],
            ours[same]
        );
    }
    println!("quantized greedy vs reference: {}", report.join("; "));
}

/// The f16 KV cache (the default beside quantized weights) against the f32 one, both with f32
/// weights so that only the cache differs: first-step logits over the golden prompts within
/// 0.05 of each other, and the same greedy tokens on the first of them.
#[test]
fn f16_kv_cache_stays_close_to_f32() {
    let Some(lf) = model() else { return };
    let p = std::env::var_os("WEAVE_MODEL").map(PathBuf::from).unwrap_or_else(weave::paths::default_model_path);
    let l16 = LoadedModel::load_opts(&p, Precision::F32, weave::backends::cpu::KvDtype::F16).unwrap();
    let g = golden();
    let mut worst = 0f32;
    for pr in g["prompts"].as_array().unwrap() {
        let prompt = ids(&pr["prompt_ids"]);
        let (a, b) = (first_logits(lf, &prompt), first_logits(&l16, &prompt));
        worst = worst.max(a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max));
    }
    println!("f16 KV cache: first-step logits within {worst:.4} of the f32 cache's");
    assert!(worst < 0.05, "f16 KV cache moves logits by {worst}");
    let spec = PromptSpec { prompt: g["prompts"][1]["text"].as_str().unwrap().into(), ..Default::default() };
    let cfg = config(2048, true, true);
    let a = run(lf, &cfg, std::slice::from_ref(&spec));
    let b = run(&l16, &cfg, std::slice::from_ref(&spec));
    assert_eq!(a, b, "greedy tokens with the f16 cache");
}

/// `weave logits`' hand-built steps (one sequence, no scheduler) give the engine's greedy
/// tokens: the driver that compares backends runs the model as generation does.
#[test]
fn hand_built_steps_give_the_engines_greedy_tokens() {
    let Some(lm) = model() else { return };
    let prompt = "The capital of France is";
    let spec = PromptSpec { prompt: prompt.into(), max_tokens: Some(24), ..Default::default() };
    let want = run(lm, &config(2048, true, false), &[spec]).remove(0);
    let ids = lm.tokenizer.encode(prompt).unwrap();
    let mut be = weave::backends::cpu::CpuBackend::new(lm.model.clone(), 64, 16, 2, 0);
    let t = weave::study::logits::greedy_trace(&mut be, "cpu", &ids, 24, 16).unwrap();
    assert_eq!(t.tokens, want);
    assert_eq!(t.first_logits.len(), lm.model.cfg.vocab_size);
}

/// Guided requests (structured outputs) in a KV cache too small for all of them: they are
/// preempted and recomputed, and each output still matches its own schema. Weave's
/// preemption keeps a request's output tokens, so its matcher needs no rewinding; a bug that
/// advanced or masked a request with another's state would break the outputs.
#[test]
fn guided_outputs_survive_preemption() {
    let Some(lm) = model_at(Precision::Quant) else { return };
    let mut cfg = config(256, true, false);
    // 8 requests of ~80 tokens (5 blocks) in 24 blocks: some must be preempted.
    cfg.sched.num_gpu_blocks = 24;
    cfg.sched.max_num_seqs = 8;
    cfg.ignore_eos = false;
    let schema = |n: usize| serde_json::json!({"type": "array", "items": {"type": "integer", "minimum": 10, "maximum": 99}, "minItems": n, "maxItems": n});
    let prompts: Vec<PromptSpec> = (0..8)
        .map(|i| PromptSpec {
            id: Some(serde_json::json!(i)),
            prompt: format!("List {} numbers for request {i}:", 10 + i),
            max_tokens: Some(80),
            temperature: Some(1.0),
            seed: Some(i as u64),
            structured_outputs: Some(
                serde_json::json!({"json": schema(10 + i as usize), "disable_any_whitespace": true}),
            ),
            ..Default::default()
        })
        .collect();
    let r = generate(lm, &cfg, &prompts, &mut |_| {}).unwrap();
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    let preempted: u32 = r.run.outcomes.iter().map(|o| o.num_preemptions).sum();
    assert!(preempted > 0, "the cache was meant to force preemption");
    for c in &r.completions {
        let i = c.id.as_u64().unwrap() as usize;
        let v: Value = serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("request {i}: {:?}: {e}", c.text));
        let items = v.as_array().unwrap_or_else(|| panic!("request {i}: {v}"));
        assert_eq!(items.len(), 10 + i, "request {i}: {v}");
        assert!(items.iter().all(|x| (10..=99).contains(&x.as_i64().unwrap())), "request {i}: {v}");
        assert_eq!(c.finish_reason, "stop", "request {i} ends when its grammar does");
    }
    // A bad schema in a prompts file is that prompt's error, naming the field.
    let bad = PromptSpec {
        prompt: "x".into(),
        response_format: Some(serde_json::json!({"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}})),
        ..Default::default()
    };
    let r = generate(lm, &cfg, &[bad, prompts[0].clone()], &mut |_| {}).unwrap();
    assert_eq!(r.rejected.len(), 1);
    assert!(r.rejected[0].1.contains("response_format"), "{:?}", r.rejected);
    assert_eq!(r.completions.len(), 1);
}
