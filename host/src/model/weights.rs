//! The model's weights. Linear layers are row-major `[out][in]` (GGUF's own order); Q/K/V and
//! gate/up are fused into one matrix each so a layer runs two GEMMs fewer.
//!
//! Two precisions: [`Precision::Quant`] keeps Q4_0, Q4_1, Q4_K (4-bit), Q5_0, Q5_1, Q5_K
//! (5-bit values a byte each), Q8_0 (8-bit) and Q6_K (6-bit values a byte each, scales per 16) tensors packed (`super::packed`, multiplied by `backends::cpu::qmatmul`) and F16/BF16
//! ones in 16 bits (`super::half`, `backends::cpu::hmatmul`);
//! [`Precision::F32`] dequantizes every tensor to f32 once at load (the exact path, checked
//! against the f64 reference). Tensors of other types are f32 in both.

use super::config::{ConfigError, ModelConfig};
use super::gguf::Gguf;
use super::half::{HKind, HMatrix};
use super::packed::{QKind, QMatrix, QMatrixBuilder};

/// How the CPU backend holds and multiplies weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Quantized weights kept packed; activations quantized to 8 bits per block of 32.
    #[default]
    Quant,
    /// Every weight dequantized to f32: exact products, four or more times the memory.
    F32,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quant" | "auto" => Ok(Precision::Quant),
            "f32" => Ok(Precision::F32),
            other => Err(format!("unknown CPU precision {other:?}: use quant or f32")),
        }
    }
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Quant => "quant",
            Precision::F32 => "f32",
        }
    }
}

/// A weight matrix, `[out_dim][in_dim]`.
#[derive(Debug)]
pub enum LinearData {
    F32(Vec<f32>),
    /// Packed parts stacked along rows, consecutive tensors of one kind in one part (a Q4_K_M
    /// file's Q/K/V: Q and K in 4 bits, a Q6_K V in its own part).
    Quant(Vec<QMatrix>),
    /// F16 or BF16, kept in 16 bits.
    Half(HMatrix),
    /// Dummy weights left unmaterialized for a device that fills them itself
    /// (`weave_kernels_gpu::sample::dummy_value(seed, i, scale)` for element `i`), so that an
    /// 8B-scale model never crosses the host. The CPU backend refuses such weights.
    Dummy {
        seed: u64,
        scale: f32,
    },
}

#[derive(Debug)]
pub struct Linear {
    pub data: LinearData,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl Linear {
    /// Row `r` in f32 (the embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        match &self.data {
            LinearData::F32(w) => out.copy_from_slice(&w[r * self.in_dim..(r + 1) * self.in_dim]),
            LinearData::Quant(parts) => {
                let mut r = r;
                for q in parts {
                    if r < q.rows {
                        return q.dequant_row(r, out);
                    }
                    r -= q.rows;
                }
                panic!("row past the matrix's {} rows", self.out_dim);
            }
            LinearData::Half(h) => h.row(r, out),
            LinearData::Dummy { seed, scale } => {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = weave_kernels_gpu::sample::dummy_value(*seed, (r * self.in_dim + j) as u64, *scale);
                }
            }
        }
    }

    /// Bytes the weights take in memory.
    pub fn size_bytes(&self) -> usize {
        match &self.data {
            LinearData::F32(w) => 4 * w.len(),
            LinearData::Quant(parts) => parts.iter().map(QMatrix::size_bytes).sum(),
            LinearData::Half(h) => h.size_bytes(),
            LinearData::Dummy { .. } => 0,
        }
    }

    /// Stacks `names` (each `[outs[i]][inp]`) into one matrix: packed when every part packs
    /// and `precision` allows it, in 16 bits when all are F16 (or all BF16), f32 otherwise.
    fn load(g: &Gguf, names: &[&str], outs: &[u64], inp: u64, precision: Precision) -> Result<Linear, ConfigError> {
        let out_dim = outs.iter().sum::<u64>() as usize;
        if precision == Precision::Quant {
            if let Some(m) = Self::load_packed(g, names, outs, inp)? {
                return Ok(Linear { data: LinearData::Quant(m), out_dim, in_dim: inp as usize });
            }
            if let Some(h) = Self::load_half(g, names, outs, inp)? {
                return Ok(Linear { data: LinearData::Half(h), out_dim, in_dim: inp as usize });
            }
        }
        let mut w = Vec::new();
        for (n, &o) in names.iter().zip(outs) {
            w.extend(g.tensor_f32(n, Some(&[inp, o]))?);
        }
        Ok(Linear { data: LinearData::F32(w), out_dim, in_dim: inp as usize })
    }

    /// The parts packed, consecutive tensors of one kind ([`QKind::of`]) into one matrix, so a
    /// Q4_K_M file's Q/K/V (Q4_K Q and K, a Q6_K V) is a 4-bit part and a 6-bit one rather
    /// than one matrix of the wider kind; `None` when some part does not pack.
    fn load_packed(g: &Gguf, names: &[&str], outs: &[u64], inp: u64) -> Result<Option<Vec<QMatrix>>, ConfigError> {
        let mut parts: Vec<(QKind, QMatrixBuilder)> = Vec::new();
        for (n, &o) in names.iter().zip(outs) {
            let t = g.tensor(n)?;
            let Some(kind) = QKind::of(t.ty) else { return Ok(None) };
            if t.dims != [inp, o] {
                return Ok(None);
            }
            if parts.last().is_none_or(|(k, _)| *k != kind) {
                parts.push((kind, QMatrixBuilder::new(kind, inp as usize)));
            }
            let (_, b) = parts.last_mut().expect("pushed above");
            if b.push_ggml(t.ty, o as usize, g.tensor_bytes(t)).is_none() {
                return Ok(None);
            }
        }
        Ok(Some(parts.into_iter().map(|(_, b)| b.finish()).collect()))
    }

    /// The parts stacked in 16 bits, or `None` when they are not all F16 (or all BF16).
    fn load_half(g: &Gguf, names: &[&str], outs: &[u64], inp: u64) -> Result<Option<HMatrix>, ConfigError> {
        let Some(kind) = HKind::of(g.tensor(names[0])?.ty) else { return Ok(None) };
        let mut h = HMatrix::new(kind, inp as usize);
        for (n, &o) in names.iter().zip(outs) {
            let t = g.tensor(n)?;
            if t.dims != [inp, o] || h.push_ggml(t.ty, o as usize, g.tensor_bytes(t)).is_none() {
                return Ok(None);
            }
        }
        Ok(Some(h))
    }
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
    /// `[q_dim + 2 * kv_dim]`, added to the fused Q/K/V rows ([`crate::model::config::ArchDeltas::qkv_bias`]).
    pub qkv_bias: Option<Vec<f32>>,
    /// `[head_dim]` each: the per-head RMSNorm weights of Q and of K
    /// ([`crate::model::config::ArchDeltas::qk_norm`]).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// `[hidden]` each: the norms of the attention's and the MLP's outputs, before the
    /// residual add ([`crate::model::config::ArchDeltas::post_norms`]).
    pub post_norms: Option<(Vec<f32>, Vec<f32>)>,
}

#[derive(Debug)]
pub struct Weights {
    /// `[vocab][hidden]`; the LM head too when tied.
    pub embed: Linear,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<Linear>,
}

impl Weights {
    pub fn load(g: &Gguf, c: &ModelConfig, precision: Precision) -> Result<Weights, ConfigError> {
        let (h, v, f) = (c.hidden as u64, c.vocab_size as u64, c.intermediate as u64);
        let (qd, kvd) = (c.q_dim() as u64, c.kv_dim() as u64);
        let lin = |names: &[&str], outs: &[u64], inp: u64| Linear::load(g, names, outs, inp, precision);
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
                qkv_bias: if c.deltas.qkv_bias {
                    let mut b = g.tensor_f32(&p("attn_q.bias"), Some(&[qd]))?;
                    b.extend(g.tensor_f32(&p("attn_k.bias"), Some(&[kvd]))?);
                    b.extend(g.tensor_f32(&p("attn_v.bias"), Some(&[kvd]))?);
                    Some(b)
                } else {
                    None
                },
                qk_norm: if c.deltas.qk_norm {
                    let d = c.head_dim as u64;
                    Some((
                        g.tensor_f32(&p("attn_q_norm.weight"), Some(&[d]))?,
                        g.tensor_f32(&p("attn_k_norm.weight"), Some(&[d]))?,
                    ))
                } else {
                    None
                },
                post_norms: if c.deltas.post_norms {
                    Some((
                        g.tensor_f32(&p("post_attention_norm.weight"), Some(&[h]))?,
                        g.tensor_f32(&p("post_ffw_norm.weight"), Some(&[h]))?,
                    ))
                } else {
                    None
                },
            });
        }
        let lm_head = match g.tensor("output.weight") {
            Ok(_) => Some(lin(&["output.weight"], &[v], h)?),
            Err(_) => None,
        };
        Ok(Weights {
            embed: lin(&["token_embd.weight"], &[v], h)?,
            layers,
            final_norm: g.tensor_f32("output_norm.weight", Some(&[h]))?,
            lm_head,
        })
    }

    /// Whether some matrix is left for a device to fill ([`LinearData::Dummy`]).
    pub fn on_device_only(&self) -> bool {
        let all = self.layers.iter().flat_map(|l| [&l.qkv, &l.wo, &l.gate_up, &l.down]);
        all.chain([&self.embed]).chain(self.lm_head.as_ref()).any(|l| matches!(l.data, LinearData::Dummy { .. }))
    }

    /// How the matrices are stored, e.g. `u4+u8` (packed 4- and 8-bit) or `bf16`.
    pub fn storage(&self) -> String {
        let mut kinds: Vec<&str> = Vec::new();
        let all = self.layers.iter().flat_map(|l| [&l.qkv, &l.wo, &l.gate_up, &l.down]);
        for lin in all.chain([&self.embed]).chain(self.lm_head.as_ref()) {
            let ks: Vec<&str> = match &lin.data {
                LinearData::F32(_) => vec!["f32"],
                LinearData::Quant(parts) => parts
                    .iter()
                    .map(|q| match q.kind {
                        QKind::U4 => "u4",
                        QKind::U5 => "u5",
                        QKind::S8 => "s8",
                        QKind::U8 => "u8",
                        QKind::U6 => "u6",
                    })
                    .collect(),
                LinearData::Half(h) => vec![match h.kind {
                    HKind::F16 => "f16",
                    HKind::Bf16 => "bf16",
                }],
                LinearData::Dummy { .. } => vec!["dummy (on the device)"],
            };
            for k in ks {
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        kinds.join("+")
    }

    /// Bytes the weights take in memory.
    pub fn size_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.size_bytes()
                    + l.wo.size_bytes()
                    + l.gate_up.size_bytes()
                    + l.down.size_bytes()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
                    + 4 * l.qkv_bias.as_ref().map_or(0, Vec::len)
                    + 4 * l.qk_norm.as_ref().map_or(0, |(q, k)| q.len() + k.len())
                    + 4 * l.post_norms.as_ref().map_or(0, |(a, f)| a.len() + f.len())
            })
            .sum();
        l + self.embed.size_bytes() + self.lm_head.as_ref().map_or(0, Linear::size_bytes) + 4 * self.final_norm.len()
    }
}
