//! Architecture facts, read from GGUF metadata (never assumed).

use super::gguf::{Gguf, GgufError};
use weave_kernels_gpu::ops::RopeLayout;

/// Architectures read, each as Llama's layer with [`ArchDeltas`]: the GGUF layout (token_embd,
/// blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm/ffn_norm, output_norm, optional
/// output) is shared, and what differs is read from the file's keys and tensors.
pub const SUPPORTED_ARCHS: &[&str] = &["llama", "qwen2", "qwen3", "gemma3"];

/// How an architecture's layer departs from Llama's, read from the file as llama.cpp reads it:
/// what the architecture may have (Q/K/V biases, `rope_freqs`) is used where its tensor is
/// there; what it must have (qwen3's Q/K norms) is expected, so a file that lacks it is
/// refused by the tensor's name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ArchDeltas {
    /// Q, K and V projections carry biases (`blk.N.attn_q.bias` ...: qwen2).
    pub qkv_bias: bool,
    /// Each Q and K head is RMS-normalized before rotary (`blk.N.attn_q_norm.weight`: qwen3).
    pub qk_norm: bool,
    /// Divisors of the rotary frequencies, one per rotating pair (`rope_freqs.weight`: Llama
    /// 3.1 and 3.2's long-context scaling, folded into a tensor by llama.cpp's converter).
    pub rope_freqs: Option<Vec<f32>>,
    /// The embeddings are multiplied by this (gemma3: `sqrt(hidden)`).
    pub embed_scale: Option<f32>,
    /// Each sub-layer's output is RMS-normalized before the residual add
    /// (`post_attention_norm`, `post_ffw_norm`: gemma3).
    pub post_norms: bool,
    /// The MLP's gate goes through GELU (tanh form) rather than SiLU (gemma3).
    pub gelu: bool,
    /// Sliding-window attention: the window (keys a token sees, itself included) and which
    /// layers use it; those layers rotate with their own base (gemma3: 5 local to 1 global).
    pub sliding: Option<Sliding>,
}

/// Gemma 3's local layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Sliding {
    pub window: usize,
    /// One per layer: whether it attends through the window.
    pub layers: Vec<bool>,
    /// The local layers' rotary base (`rope.freq_base_swa`, 10000 when absent).
    pub rope_theta: f64,
}

impl ArchDeltas {
    /// The window layer `l` attends through, if it is a local layer.
    pub fn window(&self, l: usize) -> Option<usize> {
        self.sliding.as_ref().filter(|s| s.layers.get(l) == Some(&true)).map(|s| s.window)
    }

    /// Whether the CUDA backend has kernels for every departure (it has for `rope_freqs`,
    /// which lives in the host's rotary table).
    pub fn cuda_ready(&self) -> bool {
        !self.qkv_bias
            && !self.qk_norm
            && self.embed_scale.is_none()
            && !self.post_norms
            && !self.gelu
            && self.sliding.is_none()
    }
}

impl ArchDeltas {
    /// The deltas in a short phrase for the load line, e.g. `qkv bias, q/k norm`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if self.qkv_bias {
            parts.push("qkv bias".into());
        }
        if self.qk_norm {
            parts.push("q/k norm".into());
        }
        if self.rope_freqs.is_some() {
            parts.push("rope_freqs".to_string());
        }
        if let Some(x) = self.embed_scale {
            parts.push(format!("embeddings x{x:.1}"));
        }
        if self.post_norms {
            parts.push("post-norms".into());
        }
        if self.gelu {
            parts.push("GELU".into());
        }
        if let Some(s) = &self.sliding {
            let n = s.layers.iter().filter(|&&l| l).count();
            parts.push(format!("window {} on {n} of {} layers", s.window, s.layers.len()));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub name: String,
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub num_layers: usize,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rot_dim: usize,
    pub rope_layout: RopeLayout,
    pub rms_eps: f32,
    pub context_length: usize,
    /// How the layer departs from Llama's.
    pub deltas: ArchDeltas,
}

/// Where each layer's keys and values live in a KV pool shared by layer groups (the block
/// manager's `KvGroups`, vLLM's hybrid allocator). A model without windows is one group of
/// all its layers: a block holds every layer's K/V for `block_size` tokens, as always. A
/// sliding-window model splits its full layers and its window layers into groups of equal size
/// (the greatest common divisor of the two counts: Gemma 3 270M's 3 full and 15 window layers
/// make 1 + 5 groups of 3), so a block holds one group's layers and a window layer's old
/// blocks can go back to the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayout {
    pub groups: weave_scheduler::KvGroups,
    /// Layers per group: the cache holds this many per-layer arrays, indexed by block.
    pub group_size: usize,
    /// Per layer: its group, and its index within the group (its array).
    pub layer: Vec<(usize, usize)>,
}

impl KvLayout {
    /// The layout a scheduler configured with `groups` needs for `model`: the model's own
    /// ([`ModelConfig::kv_layout`]), or one group of every layer (a model without windows, or
    /// a sliding-window model run without the hybrid layout: every layer keeps every token).
    pub fn for_groups(model: &ModelConfig, groups: weave_scheduler::KvGroups) -> Result<KvLayout, String> {
        let own = model.kv_layout();
        if groups == own.groups {
            Ok(own)
        } else if groups == weave_scheduler::KvGroups::default() {
            Ok(KvLayout::single(model.num_layers))
        } else {
            Err(format!(
                "the scheduler's KV groups ({} full, {} windowed of window {}) are not {}'s ({} full, {} windowed of window {})",
                groups.full, groups.windowed, groups.window, model.arch, own.groups.full, own.groups.windowed, own.groups.window
            ))
        }
    }

    /// One group of all `num_layers` layers (no windows).
    pub fn single(num_layers: usize) -> KvLayout {
        KvLayout {
            groups: weave_scheduler::KvGroups::default(),
            group_size: num_layers.max(1),
            layer: (0..num_layers).map(|l| (0, l)).collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: architecture {arch:?} is not supported (supported: {supported})")]
    Arch { path: String, arch: String, supported: String },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

impl ModelConfig {
    /// How this model's layers share the KV pool (see [`KvLayout`]).
    pub fn kv_layout(&self) -> KvLayout {
        let n = self.num_layers;
        let Some(sl) = self.deltas.sliding.as_ref() else {
            return KvLayout::single(n);
        };
        let windowed: Vec<usize> = (0..n).filter(|&l| sl.layers.get(l) == Some(&true)).collect();
        let full: Vec<usize> = (0..n).filter(|&l| sl.layers.get(l) != Some(&true)).collect();
        if windowed.is_empty() {
            return KvLayout::single(n);
        }
        fn gcd(a: usize, b: usize) -> usize {
            if b == 0 {
                a
            } else {
                gcd(b, a % b)
            }
        }
        let size = gcd(full.len(), windowed.len());
        let mut layer = vec![(0, 0); n];
        for (k, &l) in full.iter().enumerate() {
            layer[l] = (k / size, k % size);
        }
        let nf = full.len() / size;
        for (k, &l) in windowed.iter().enumerate() {
            layer[l] = (nf + k / size, k % size);
        }
        KvLayout {
            groups: weave_scheduler::KvGroups { full: nf, windowed: windowed.len() / size, window: sl.window },
            group_size: size,
            layer,
        }
    }

    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig, ConfigError> {
        let path = g.path.display().to_string();
        let arch = g.get_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
            return Err(ConfigError::Arch { path, arch, supported: SUPPORTED_ARCHS.join(", ") });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = g.get_u64(&k("embedding_length"))? as usize;
        let num_q_heads = g.get_u64(&k("attention.head_count"))? as usize;
        let num_kv_heads = g.get_u64(&k("attention.head_count_kv")).map(|v| v as usize).unwrap_or(num_q_heads);
        let invalid = |what: String| ConfigError::Invalid { path: path.clone(), what };
        if num_q_heads == 0
            || num_kv_heads == 0
            || !num_q_heads.is_multiple_of(num_kv_heads)
            || !hidden.is_multiple_of(num_q_heads)
        {
            return Err(invalid(format!(
                "{num_q_heads} query heads, {num_kv_heads} KV heads and hidden size {hidden} do not fit"
            )));
        }
        let head_dim = g.get_u64(&k("attention.key_length")).map(|v| v as usize).unwrap_or(hidden / num_q_heads);
        let rot_dim = g.get_u64(&k("rope.dimension_count")).map(|v| v as usize).unwrap_or(head_dim);
        if rot_dim == 0 || rot_dim > head_dim || !rot_dim.is_multiple_of(2) {
            return Err(invalid(format!("rotary dimension {rot_dim} does not fit head dimension {head_dim}")));
        }
        // Context extension by scaling the positions (linear, YaRN, LongRoPE) is not
        // implemented: refused by its key, rather than run with the wrong angles.
        if let Ok(kind) = g.get_str(&k("rope.scaling.type")) {
            let factor = g.get_f64(&k("rope.scaling.factor")).unwrap_or(1.0);
            if kind != "none" && factor != 1.0 {
                return Err(invalid(format!(
                    "{} is {kind:?} with factor {factor}: rotary scaling is not supported (only Llama 3's rope_freqs)",
                    k("rope.scaling.type")
                )));
            }
        }
        let num_layers = g.get_u64(&k("block_count"))? as usize;
        let gemma = arch == "gemma3";
        if let Ok(cap) = g.get_f64(&k("final_logit_softcapping")) {
            if cap != 0.0 {
                return Err(invalid(format!(
                    "{} is {cap}: logit soft-capping is not supported",
                    k("final_logit_softcapping")
                )));
            }
        }
        let sliding = match g.get_u64(&k("attention.sliding_window")) {
            Ok(w) if gemma && w > 0 => {
                // llama.cpp's reading: a per-layer array, else a period (6 for Gemma 3: five
                // local layers, then a global one).
                let layers = match g.get(&k("attention.sliding_window_pattern")) {
                    Ok(super::gguf::Value::Array(a)) => {
                        let v: Vec<bool> = a
                            .iter()
                            .map(|x| x.as_u64().map_or(matches!(x, super::gguf::Value::Bool(true)), |n| n != 0))
                            .collect();
                        if v.len() != num_layers {
                            return Err(invalid(format!(
                                "{} has {} entries for {num_layers} layers",
                                k("attention.sliding_window_pattern"),
                                v.len()
                            )));
                        }
                        v
                    }
                    other => {
                        let n = other.ok().and_then(super::gguf::Value::as_u64).unwrap_or(6) as usize;
                        (0..num_layers).map(|l| n == 0 || l % n < n - 1).collect()
                    }
                };
                Some(Sliding {
                    window: w as usize,
                    layers,
                    rope_theta: g.get_f64(&k("rope.freq_base_swa")).unwrap_or(10_000.0),
                })
            }
            _ => None,
        };
        let deltas = ArchDeltas {
            qkv_bias: g.tensor("blk.0.attn_q.bias").is_ok(),
            qk_norm: arch == "qwen3" || gemma || g.tensor("blk.0.attn_q_norm.weight").is_ok(),
            embed_scale: gemma.then(|| (hidden as f32).sqrt()),
            post_norms: gemma,
            gelu: gemma,
            sliding,
            rope_freqs: match g.tensor("rope_freqs.weight") {
                Ok(_) => {
                    let f = g.tensor_f32("rope_freqs.weight", Some(&[rot_dim as u64 / 2]))?;
                    if let Some(bad) = f.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                        return Err(invalid(format!("rope_freqs.weight holds {bad}: divisors must be positive")));
                    }
                    Some(f)
                }
                Err(_) => None,
            },
        };
        // Which rotary pairs a file's Q/K rows hold is the architecture's convention (llama.cpp
        // `llama_model_rope_type`): Llama's converter permutes its rows so that pairs are
        // adjacent; Qwen's keeps the checkpoint's half-split order. A wrong guess fails
        // silently (plausible text, wrong tokens), so each architecture names its own.
        let rope_layout = match arch.as_str() {
            "llama" => RopeLayout::Interleaved,
            _ => RopeLayout::Neox,
        };
        let vocab_size = match g.get_u64(&k("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => g.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(ModelConfig {
            name: g.get_str("general.name").unwrap_or("unnamed").to_string(),
            vocab_size,
            hidden,
            intermediate: g.get_u64(&k("feed_forward_length"))? as usize,
            num_layers,
            num_q_heads,
            num_kv_heads,
            head_dim,
            rope_theta: g.get_f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            rot_dim,
            rope_layout,
            rms_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32,
            context_length: g.get_u64(&k("context_length")).map(|v| v as usize).unwrap_or(2048),
            deltas,
            arch,
        })
    }

    /// The attention kernels' shape for this model and a KV block size (no batch yet:
    /// `max_blocks_per_seq` is set per step, and one split).
    pub fn attn_shape(&self, block_size: usize) -> weave_kernels_gpu::attention::AttnShape {
        weave_kernels_gpu::attention::AttnShape {
            num_q_heads: self.num_q_heads as u32,
            num_kv_heads: self.num_kv_heads as u32,
            head_dim: self.head_dim as u32,
            block_size: block_size as u32,
            max_blocks_per_seq: 0,
            blocks_per_split: 0,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_q_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod kv_layout_tests {
    use super::*;

    fn with_layers(num_layers: usize, sliding: Option<Sliding>) -> ModelConfig {
        let mut c = crate::model::profiles::find_model("smollm2-135m").unwrap().config();
        c.num_layers = num_layers;
        c.deltas.sliding = sliding;
        c
    }

    #[test]
    fn gemma_270m_makes_one_full_and_five_window_groups_of_three() {
        // 18 layers, every sixth one global (5, 11, 17).
        let layers: Vec<bool> = (0..18).map(|l| l % 6 != 5).collect();
        let c = with_layers(18, Some(Sliding { window: 512, layers, rope_theta: 1e4 }));
        let k = c.kv_layout();
        assert_eq!(k.groups, weave_scheduler::KvGroups { full: 1, windowed: 5, window: 512 });
        assert_eq!(k.group_size, 3);
        assert_eq!(k.layer[5], (0, 0));
        assert_eq!(k.layer[11], (0, 1));
        assert_eq!(k.layer[17], (0, 2));
        assert_eq!(k.layer[0], (1, 0));
        assert_eq!(k.layer[4], (2, 1));
        assert_eq!(k.layer[16], (5, 2));
        // Every (group, array) pair is one layer's.
        let mut seen: Vec<(usize, usize)> = k.layer.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 18);
        assert!(k.layer.iter().all(|&(g, j)| g < 6 && j < 3));
    }

    #[test]
    fn uneven_counts_use_their_common_divisor_and_plain_models_one_group() {
        // 26 layers with 4 global (Gemma 3 1B's pattern): groups of 2.
        let layers: Vec<bool> = (0..26).map(|l| l % 6 != 5).collect();
        let c = with_layers(26, Some(Sliding { window: 512, layers, rope_theta: 1e4 }));
        let k = c.kv_layout();
        assert_eq!((k.groups.full, k.groups.windowed, k.group_size), (2, 11, 2));
        let plain = with_layers(30, None);
        assert_eq!(plain.kv_layout(), KvLayout::single(30));
        // A scheduler left at one group runs a windowed model with every layer in it; any
        // other grouping is refused by name.
        assert_eq!(KvLayout::for_groups(&c, Default::default()).unwrap(), KvLayout::single(26));
        assert_eq!(KvLayout::for_groups(&c, k.groups).unwrap(), k);
        let e = KvLayout::for_groups(&c, weave_scheduler::KvGroups { full: 1, windowed: 1, window: 512 }).unwrap_err();
        assert!(e.contains("not llama's"), "{e}");
    }
}
