//! Architecture facts, read from GGUF metadata (never assumed).

use super::gguf::{Gguf, GgufError};
use weave_kernels_gpu::ops::RopeLayout;

/// Architectures whose GGUF layout is the Llama one (token_embd, blk.N.attn_q/k/v/output,
/// ffn_gate/up/down, attn_norm/ffn_norm, output_norm, optional output).
pub const SUPPORTED_ARCHS: &[&str] = &["llama"];

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
        let vocab_size = match g.get_u64(&k("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => g.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(ModelConfig {
            name: g.get_str("general.name").unwrap_or("unnamed").to_string(),
            vocab_size,
            hidden,
            intermediate: g.get_u64(&k("feed_forward_length"))? as usize,
            num_layers: g.get_u64(&k("block_count"))? as usize,
            num_q_heads,
            num_kv_heads,
            head_dim,
            rope_theta: g.get_f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            rot_dim: g.get_u64(&k("rope.dimension_count")).map(|v| v as usize).unwrap_or(head_dim),
            // llama.cpp's converter permutes Llama's Q/K rows so that rotary pairs are
            // adjacent: GGUF Llama weights use the interleaved layout.
            rope_layout: RopeLayout::Interleaved,
            rms_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32,
            context_length: g.get_u64(&k("context_length")).map(|v| v as usize).unwrap_or(2048),
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
