//! The model's weights, dequantized to f32 once at load. Linear layers are row-major
//! `[out][in]` (GGUF's own order); Q/K/V and gate/up are fused into one matrix each so a
//! layer runs two GEMMs fewer.

use super::config::{ConfigError, ModelConfig};
use super::gguf::Gguf;

#[derive(Debug)]
pub struct Linear {
    pub w: Vec<f32>,
    pub out_dim: usize,
    pub in_dim: usize,
}

#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// `[q_dim + 2 * kv_dim][hidden]`: Q rows, then K, then V.
    pub qkv: Linear,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    /// `[2 * intermediate][hidden]`: gate rows, then up.
    pub gate_up: Linear,
    pub down: Linear,
}

#[derive(Debug)]
pub struct Weights {
    /// `[vocab][hidden]`.
    pub embed: Vec<f32>,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<Linear>,
}

impl Weights {
    pub fn load(g: &Gguf, c: &ModelConfig) -> Result<Weights, ConfigError> {
        let (h, v, f) = (c.hidden as u64, c.vocab_size as u64, c.intermediate as u64);
        let (qd, kvd) = (c.q_dim() as u64, c.kv_dim() as u64);
        let lin = |names: &[&str], outs: &[u64], inp: u64| -> Result<Linear, ConfigError> {
            let mut w = Vec::new();
            for (n, &o) in names.iter().zip(outs) {
                w.extend(g.tensor_f32(n, Some(&[inp, o]))?);
            }
            Ok(Linear { w, out_dim: outs.iter().sum::<u64>() as usize, in_dim: inp as usize })
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: g.tensor_f32(&p("attn_norm.weight"), Some(&[h]))?,
                qkv: lin(&[&p("attn_q.weight"), &p("attn_k.weight"), &p("attn_v.weight")], &[qd, kvd, kvd], h)?,
                wo: lin(&[&p("attn_output.weight")], &[h], qd)?,
                ffn_norm: g.tensor_f32(&p("ffn_norm.weight"), Some(&[h]))?,
                gate_up: lin(&[&p("ffn_gate.weight"), &p("ffn_up.weight")], &[f, f], h)?,
                down: lin(&[&p("ffn_down.weight")], &[h], f)?,
            });
        }
        let lm_head = match g.tensor("output.weight") {
            Ok(_) => Some(lin(&["output.weight"], &[v], h)?),
            Err(_) => None,
        };
        Ok(Weights {
            embed: g.tensor_f32("token_embd.weight", Some(&[h, v]))?,
            layers,
            final_norm: g.tensor_f32("output_norm.weight", Some(&[h]))?,
            lm_head,
        })
    }
}
