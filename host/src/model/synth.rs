//! Small random-weight models of each architecture weave reads, written as GGUF files with a
//! real (cut-down) BPE vocabulary: the fixtures that check each architecture against
//! llama.cpp. The weights come from a seed, so a test rebuilds the very file the oracle's
//! outputs were recorded on (`tools/golden/arch_oracle.py`) and nothing large is committed.
//!
//! Each spec turns on its architecture's departures from Llama (see
//! [`super::config::ArchDeltas`]) at sizes where a wrong one changes the tokens: biases and
//! norm weights far from zero and one, rotary divisors on fast-turning pairs, a small rotary
//! base so that positions turn far.

use super::gguf::GgmlType;
use super::gguf_writer::{GgufWriter, Meta};

/// A vocabulary for a synthetic model (`tokenizer.ggml.*`): byte-level BPE with merges, or
/// SentencePiece pieces with scores.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct SynthVocab {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: String,
    pub tokens: Vec<String>,
    /// llama.cpp's token types (1 normal, 3 control, 6 byte, ...), one per token.
    pub types: Vec<i32>,
    /// BPE merges (`gpt2`).
    #[serde(default)]
    pub merges: Vec<String>,
    /// Piece scores (`llama`).
    #[serde(default)]
    pub scores: Vec<f32>,
    pub bos: u32,
    pub eos: u32,
}

/// One synthetic model's shape and departures from Llama.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// File stem and fixture key, e.g. `qwen3` or `qwen3-q4_k`.
    pub name: String,
    /// `general.architecture`.
    pub arch: &'static str,
    /// `tokenizer.ggml.pre`, or `spm` for a SentencePiece vocabulary (which has none).
    pub pre: &'static str,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Written as `attention.key_length` (qwen3's may differ from `hidden / heads`).
    pub head_dim: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub rope_theta: f32,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    /// `rope_freqs.weight`, `head_dim / 2` divisors.
    pub rope_freqs: Option<Vec<f32>>,
    pub add_bos: bool,
    /// Gemma 3's departures: post-norms, GELU, scaled embeddings (all implied by the
    /// architecture), and a sliding window on every `sliding.1`-th layer but the last of
    /// each period, with its own rotary base `sliding.2`.
    pub sliding: Option<(usize, usize, f32)>,
    /// The matrices' storage type. Where a matrix's rows are not whole blocks of it, the
    /// type llama.cpp's quantizer falls back to (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0).
    pub ty: GgmlType,
    pub seed: u64,
}

impl SynthSpec {
    /// Whether this model's vocabulary is SentencePiece's.
    pub fn spm(&self) -> bool {
        self.pre == "spm"
    }
}

/// The synthetic models: Llama 3 (rotary divisors, llama-bpe), Qwen2 (Q/K/V biases, qwen2
/// pre-tokenizer), Qwen3 (per-head Q/K norms, a head dimension that is not `hidden / heads`)
/// and Gemma 3 (SentencePiece; post-norms, GELU, scaled embeddings, sliding windows with
/// their own rotary base).
pub fn specs() -> Vec<SynthSpec> {
    let base = SynthSpec {
        name: String::new(),
        arch: "",
        pre: "",
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        intermediate: 96,
        layers: 2,
        rope_theta: 500.0,
        qkv_bias: false,
        qk_norm: false,
        rope_freqs: None,
        add_bos: false,
        sliding: None,
        ty: GgmlType::F32,
        seed: 0,
    };
    vec![
        SynthSpec {
            name: "llama3".into(),
            arch: "llama",
            pre: "llama-bpe",
            rope_freqs: Some(vec![1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 8.0]),
            add_bos: true,
            seed: 3,
            ..base.clone()
        },
        SynthSpec { name: "qwen2".into(), arch: "qwen2", pre: "qwen2", qkv_bias: true, seed: 2, ..base.clone() },
        SynthSpec {
            name: "qwen3".into(),
            arch: "qwen3",
            pre: "qwen2",
            qk_norm: true,
            head_dim: 32,
            seed: 33,
            ..base.clone()
        },
        // Three layers with a period of 2: local, global, local; a window of 6 keys.
        SynthSpec {
            name: "gemma3".into(),
            arch: "gemma3",
            pre: "spm",
            qk_norm: true,
            layers: 3,
            rope_theta: 1000.0,
            sliding: Some((6, 2, 50.0)),
            add_bos: true,
            seed: 7,
            ..base
        },
    ]
}

/// The wider models: each architecture at a width whose rows are whole K-quant super-blocks
/// (hidden 256, heads of 64, Qwen3's of 128: the CPU attention's SIMD widths), its matrices
/// in f32 and in each quantized type weave reads.
pub fn quant_specs() -> Vec<SynthSpec> {
    let types =
        [GgmlType::F32, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];
    let mut out = Vec::new();
    for s in specs() {
        for ty in types {
            let head_dim = if s.arch == "qwen3" { 128 } else { 64 };
            out.push(SynthSpec {
                name: format!("{}-{}", s.name, ty.name().to_lowercase()),
                hidden: 256,
                head_dim,
                intermediate: 512,
                rope_freqs: s.rope_freqs.as_ref().map(|_| (0..head_dim / 2).map(|i| 1.0 + (i % 8) as f32).collect()),
                ty,
                seed: s.seed + 100,
                ..s.clone()
            });
        }
    }
    out
}

/// Every synthetic model: [`specs`], then [`quant_specs`].
pub fn all_specs() -> Vec<SynthSpec> {
    let mut v = specs();
    v.extend(quant_specs());
    v
}

/// The type a `[rows][row_len]` matrix is stored in under `ty`: `ty`, or its fallback where
/// `row_len` is not whole blocks of it.
pub fn matrix_type(ty: GgmlType, row_len: usize) -> GgmlType {
    let fits = |t: GgmlType| t.block().is_some_and(|(be, _)| row_len.is_multiple_of(be));
    let t = if fits(ty) {
        ty
    } else {
        match ty {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            other => other,
        }
    };
    if fits(t) {
        t
    } else {
        GgmlType::F32
    }
}

/// SplitMix64: a seeded stream of uniform values in `[-1, 1)` (the seed is the state).
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` values `centre + spread * u`.
    pub fn vec(&mut self, n: usize, centre: f32, spread: f32) -> Vec<f32> {
        (0..n).map(|_| centre + spread * self.next()).collect()
    }
}

/// The GGUF file of `spec` with `vocab`.
pub fn gguf(spec: &SynthSpec, vocab: &SynthVocab) -> Vec<u8> {
    let s = spec;
    let (h, f, v, d) = (s.hidden, s.intermediate, vocab.tokens.len(), s.head_dim);
    let (qd, kvd) = (s.heads * d, s.kv_heads * d);
    let mut w = GgufWriter::new();
    let k = |key: &str| format!("{}.{key}", s.arch);
    w.meta("general.architecture", Meta::Str(s.arch.into()))
        .meta("general.name", Meta::Str(format!("weave synthetic {}", s.name)))
        .meta(&k("context_length"), Meta::U32(256))
        .meta(&k("embedding_length"), Meta::U32(h as u32))
        .meta(&k("block_count"), Meta::U32(s.layers as u32))
        .meta(&k("feed_forward_length"), Meta::U32(f as u32))
        .meta(&k("attention.head_count"), Meta::U32(s.heads as u32))
        .meta(&k("attention.head_count_kv"), Meta::U32(s.kv_heads as u32))
        .meta(&k("attention.key_length"), Meta::U32(d as u32))
        .meta(&k("attention.value_length"), Meta::U32(d as u32))
        .meta(&k("attention.layer_norm_rms_epsilon"), Meta::F32(1e-6))
        .meta(&k("rope.freq_base"), Meta::F32(s.rope_theta))
        .meta(&k("rope.dimension_count"), Meta::U32(d as u32))
        .meta("tokenizer.ggml.model", Meta::Str(vocab.model.clone()))
        .meta("tokenizer.ggml.tokens", Meta::StrArray(vocab.tokens.clone()))
        .meta("tokenizer.ggml.token_type", Meta::I32Array(vocab.types.clone()));
    if s.spm() {
        w.meta("tokenizer.ggml.scores", Meta::F32Array(vocab.scores.clone()))
            .meta("tokenizer.ggml.add_space_prefix", Meta::Bool(true));
    } else {
        w.meta("tokenizer.ggml.pre", Meta::Str(s.pre.into()))
            .meta("tokenizer.ggml.merges", Meta::StrArray(vocab.merges.clone()));
    }
    if let Some((window, period, base)) = s.sliding {
        w.meta(&k("attention.sliding_window"), Meta::U32(window as u32))
            .meta(&k("attention.sliding_window_pattern"), Meta::U32(period as u32))
            .meta(&k("rope.freq_base_swa"), Meta::F32(base));
    }
    w.meta("tokenizer.ggml.bos_token_id", Meta::U32(vocab.bos))
        .meta("tokenizer.ggml.eos_token_id", Meta::U32(vocab.eos))
        .meta("tokenizer.ggml.add_bos_token", Meta::Bool(s.add_bos));
    let mut r = Rng(s.seed);
    let fan = |n: usize| 1.0 / (n as f32).sqrt();
    // Matrices are `[out][in]`, written with ggml's dimensions `[in, out]`, in `s.ty`.
    let mat = |w: &mut GgufWriter, name: &str, out: usize, inp: usize, data: &[f32]| {
        let ty = matrix_type(s.ty, inp);
        let bytes = super::blocks::quantize(ty, data).expect("whole blocks (matrix_type)");
        w.tensor_raw(name, &[inp as u64, out as u64], ty.id(), bytes);
    };
    // LM head rows of RMS 2/sqrt(hidden) give logits of about two units' spread, so the next
    // token is a real choice (wider, one token takes all the probability and greedy decoding
    // repeats it). Gemma multiplies its embeddings by sqrt(hidden), and a tied head would
    // then mostly predict the token it was given: its head is its own, its embeddings small.
    let head_spread = (12.0 / h as f32).sqrt();
    let tied = s.arch != "gemma3";
    let embed_spread = if tied { head_spread } else { head_spread / 4.0 };
    mat(&mut w, "token_embd.weight", v, h, &r.vec(v * h, 0.0, embed_spread));
    if let Some(div) = &s.rope_freqs {
        assert_eq!(div.len(), d / 2, "{}: one rotary divisor per pair", s.name);
        w.tensor_f32("rope_freqs.weight", &[div.len() as u64], div);
    }
    for l in 0..s.layers {
        let p = |t: &str| format!("blk.{l}.{t}");
        let m = |w: &mut GgufWriter, r: &mut Rng, name: &str, out: usize, inp: usize| {
            let data = r.vec(out * inp, 0.0, 1.7 * fan(inp));
            mat(w, &p(name), out, inp, &data)
        };
        let norm = |w: &mut GgufWriter, r: &mut Rng, name: &str, n: usize, spread: f32| {
            w.tensor_f32(&p(name), &[n as u64], &r.vec(n, 1.0, spread));
        };
        norm(&mut w, &mut r, "attn_norm.weight", h, 0.5);
        m(&mut w, &mut r, "attn_q.weight", qd, h);
        m(&mut w, &mut r, "attn_k.weight", kvd, h);
        m(&mut w, &mut r, "attn_v.weight", kvd, h);
        if s.qkv_bias {
            w.tensor_f32(&p("attn_q.bias"), &[qd as u64], &r.vec(qd, 0.0, 1.0));
            w.tensor_f32(&p("attn_k.bias"), &[kvd as u64], &r.vec(kvd, 0.0, 1.0));
            w.tensor_f32(&p("attn_v.bias"), &[kvd as u64], &r.vec(kvd, 0.0, 1.0));
        }
        if s.qk_norm {
            norm(&mut w, &mut r, "attn_q_norm.weight", d, 0.8);
            norm(&mut w, &mut r, "attn_k_norm.weight", d, 0.8);
        }
        m(&mut w, &mut r, "attn_output.weight", h, qd);
        norm(&mut w, &mut r, "ffn_norm.weight", h, 0.5);
        m(&mut w, &mut r, "ffn_gate.weight", f, h);
        m(&mut w, &mut r, "ffn_up.weight", f, h);
        m(&mut w, &mut r, "ffn_down.weight", h, f);
        if s.arch == "gemma3" {
            norm(&mut w, &mut r, "post_attention_norm.weight", h, 0.5);
            norm(&mut w, &mut r, "post_ffw_norm.weight", h, 0.5);
        }
    }
    w.tensor_f32("output_norm.weight", &[h as u64], &r.vec(h, 1.0, 0.5));
    if !tied {
        mat(&mut w, "output.weight", v, h, &r.vec(v * h, 0.0, head_spread));
    }
    w.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::model::gguf::Gguf;
    use std::path::Path;

    fn vocab(spm: bool) -> SynthVocab {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
        tokens.extend((b'a'..=b'z').map(|c| (c as char).to_string()));
        tokens.push("ab".into());
        let mut types = vec![3];
        types.extend(std::iter::repeat_n(1, tokens.len() - 1));
        let n = tokens.len();
        SynthVocab {
            model: if spm { "llama" } else { "gpt2" }.into(),
            tokens,
            types,
            merges: vec!["a b".into()],
            scores: (0..n).map(|i| -(i as f32)).collect(),
            bos: 0,
            eos: 0,
        }
    }

    /// Each spec's file loads with the departures it was written with, found in the file.
    #[test]
    fn each_spec_loads_with_its_deltas() {
        for s in all_specs() {
            let g = Gguf::parse(Path::new(&s.name), gguf(&s, &vocab(s.spm()))).unwrap();
            assert_eq!(g.tensor("blk.1.ffn_down.weight").unwrap().ty, s.ty, "{}", s.name);
            let c = ModelConfig::from_gguf(&g).unwrap();
            assert_eq!((c.arch.as_str(), c.head_dim, c.vocab_size), (s.arch, s.head_dim, 28), "{}", s.name);
            assert_eq!(c.deltas.qkv_bias, s.qkv_bias, "{}", s.name);
            assert_eq!(c.deltas.qk_norm, s.qk_norm, "{}", s.name);
            assert_eq!(c.deltas.rope_freqs, s.rope_freqs, "{}", s.name);
            let w = crate::model::weights::Weights::load(&g, &c, crate::model::weights::Precision::F32).unwrap();
            assert_eq!(w.layers[1].qkv_bias.is_some(), s.qkv_bias);
            assert_eq!(w.layers[1].qk_norm.as_ref().map(|(q, _)| q.len()), s.qk_norm.then_some(s.head_dim));
            let gemma = s.arch == "gemma3";
            assert_eq!((w.layers[1].post_norms.is_some(), c.deltas.gelu), (gemma, gemma), "{}", s.name);
            if let Some((window, period, base)) = s.sliding {
                let sl = c.deltas.sliding.as_ref().expect("a sliding window");
                assert_eq!((sl.window, sl.rope_theta), (window, base as f64));
                assert_eq!(sl.layers, (0..s.layers).map(|l| l % period < period - 1).collect::<Vec<_>>());
                assert_eq!(c.deltas.embed_scale, Some((s.hidden as f32).sqrt()));
            }
            crate::model::tokenizer::WeaveTokenizer::from_gguf(&g).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        }
    }

    /// Rows that are not whole blocks fall back as llama.cpp's quantizer does, down to f32.
    #[test]
    fn matrix_types_fall_back_for_odd_rows() {
        assert_eq!(matrix_type(GgmlType::Q4_K, 512), GgmlType::Q4_K);
        assert_eq!(matrix_type(GgmlType::Q4_K, 576), GgmlType::Q5_0);
        assert_eq!(matrix_type(GgmlType::Q5_K, 64), GgmlType::Q5_1);
        assert_eq!(matrix_type(GgmlType::Q6_K, 96), GgmlType::Q8_0);
        assert_eq!(matrix_type(GgmlType::Q8_0, 48), GgmlType::F32);
        assert_eq!(quant_specs().len(), 7 * specs().len());
    }

    /// The same seed gives the same file; another seed, other weights.
    #[test]
    fn files_are_a_function_of_the_seed() {
        let s = &specs()[0];
        assert_eq!(gguf(s, &vocab(false)), gguf(s, &vocab(false)));
        let other = SynthSpec { seed: s.seed + 1, ..s.clone() };
        assert_ne!(gguf(s, &vocab(false)), gguf(&other, &vocab(false)));
    }
}
