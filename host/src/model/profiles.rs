//! Named model shapes (layers, widths, heads, vocabulary, rotary base): the one table the
//! simulator's roofline and the dummy-weight loader (`--load-format dummy --model-config`)
//! both read. A JSON file with the same fields names a shape of one's own.

use super::config::ModelConfig;
use serde::{Deserialize, Serialize};

/// A model's shape, enough for FLOPs and bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelProfile {
    pub name: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// Bytes per weight and per KV element (2 for bf16/f16).
    pub dtype_bytes: f64,
    /// Rotary base (10000 when a profile file leaves it out).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_eps")]
    pub rms_eps: f32,
    #[serde(default = "default_context_length")]
    pub context_length: usize,
    /// Whether the LM head is the embedding matrix.
    #[serde(default)]
    pub tied_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_eps() -> f32 {
    1e-5
}
fn default_context_length() -> usize {
    4096
}

impl ModelProfile {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        layers: usize,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
        vocab: usize,
        (rope_theta, context_length, tied_embeddings): (f64, usize, bool),
    ) -> Self {
        ModelProfile {
            name: name.into(),
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            intermediate,
            vocab,
            dtype_bytes: 2.0,
            rope_theta,
            rms_eps: 1e-5,
            context_length,
            tied_embeddings,
        }
    }
    /// Weights of the transformer layers (attention + MLP), excluding embeddings.
    pub fn layer_params(&self) -> f64 {
        let (h, q, kv, f) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate);
        (self.layers * (h * (q + 2 * kv) + q * h + 3 * h * f)) as f64
    }
    /// The executor's view of this shape (Llama layout; GGUF's interleaved rotary pairs).
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            arch: "llama".into(),
            name: self.name.clone(),
            vocab_size: self.vocab,
            hidden: self.hidden,
            intermediate: self.intermediate,
            num_layers: self.layers,
            num_q_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rope_theta: self.rope_theta,
            rot_dim: self.head_dim,
            rope_layout: weave_kernels_gpu::ops::RopeLayout::Interleaved,
            rms_eps: self.rms_eps,
            context_length: self.context_length,
            deltas: Default::default(),
        }
    }

    /// Whether the shape is one the executor can run; `Err` says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let n = &self.name;
        if self.layers == 0 || self.hidden == 0 || self.intermediate == 0 || self.vocab == 0 {
            return Err(format!("model profile {n}: layers, hidden, intermediate and vocab must be positive"));
        }
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "model profile {n}: {} query heads are not a multiple of {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        if self.heads * self.head_dim != self.hidden || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "model profile {n}: {} heads of {} do not make hidden size {}",
                self.heads, self.head_dim, self.hidden
            ));
        }
        Ok(())
    }

    /// KV-cache bytes per token.
    pub fn kv_bytes_per_token(&self) -> f64 {
        (2 * self.layers * self.kv_heads * self.head_dim) as f64 * self.dtype_bytes
    }
}

pub fn models() -> Vec<ModelProfile> {
    vec![
        ModelProfile::new("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, (500_000.0, 8192, false)),
        ModelProfile::new("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, (10_000.0, 4096, false)),
        ModelProfile::new("mistral-7b", 32, 4096, 32, 8, 14336, 32000, (10_000.0, 32768, false)),
        ModelProfile::new("smollm2-135m", 30, 576, 9, 3, 1536, 49152, (100_000.0, 8192, true)),
    ]
}

/// A named model profile, or a JSON file holding a [`ModelProfile`].
pub fn find_model(name: &str) -> Result<ModelProfile, String> {
    if let Some(m) = models().into_iter().find(|m| m.name == name.to_lowercase()) {
        return Ok(m);
    }
    if std::path::Path::new(name).exists() {
        let text = std::fs::read_to_string(name).map_err(|e| format!("{name}: {e}"))?;
        return serde_json::from_str(&text).map_err(|e| format!("{name}: not a model profile: {e}"));
    }
    Err(format!(
        "unknown model profile {name:?}; known: {} (or a JSON file with layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, dtype_bytes)",
        models().iter().map(|m| m.name.clone()).collect::<Vec<_>>().join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_profile_is_runnable_and_a_file_can_add_one() {
        for m in models() {
            m.check().unwrap();
            let c = m.config();
            assert_eq!((c.q_dim(), c.kv_dim() * (m.heads / m.kv_heads)), (m.hidden, m.hidden));
        }
        let l3 = find_model("llama-3-8b").unwrap();
        assert_eq!((l3.rope_theta, l3.tied_embeddings, l3.config().num_kv_heads), (500_000.0, false, 8));
        let dir = std::env::temp_dir().join(format!("weave-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tiny.json");
        let json = r#"{"name":"tiny","layers":2,"hidden":64,"heads":4,"kv_heads":2,"head_dim":16,"intermediate":128,"vocab":300,"dtype_bytes":2}"#;
        std::fs::write(&p, json).unwrap();
        let t = find_model(p.to_str().unwrap()).unwrap();
        assert_eq!((t.rope_theta, t.context_length, t.tied_embeddings), (10_000.0, 4096, false), "defaults");
        t.check().unwrap();
        std::fs::write(&p, json.replace("\"heads\":4", "\"heads\":3")).unwrap();
        let bad = find_model(p.to_str().unwrap()).unwrap();
        assert!(bad.check().unwrap_err().contains("not a multiple"), "{:?}", bad.check());
        assert!(find_model("gpt-5").unwrap_err().contains("smollm2-135m"));
    }
}
