//! The Llama forward pass, written once over [`LayerOps`]: the operations a backend provides
//! on its own buffers and weights (the CPU backend on host vectors, a CUDA backend on device
//! buffers with cuBLAS and the kernels-gpu PTX), in the way candle's `BackendStorage` serves
//! its CPU and CUDA storages. The pass takes the scheduler's packed mixed batch as it is:
//! one pass over every token of every sequence, with no per-sequence work outside attention.
//!
//! Buffers and weights are named ([`Buf`], [`Weight`], [`Norm`]), so a backend keeps its
//! step's activations in a workspace of its own, allocated once and reused.

use crate::model::config::{ArchDeltas, ModelConfig};
use weave_scheduler::ScheduledBatch;

/// The step's activation buffers, each `[rows][width]` with its width fixed by the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buf {
    /// The residual stream, `hidden` wide.
    X,
    /// A normalized copy of `X` (or of the sampled rows at the end), `hidden` wide.
    H,
    /// Fused Q/K/V projections, `q_dim + 2 kv_dim` wide.
    Qkv,
    Q,
    K,
    V,
    /// Attention output, `q_dim` wide.
    Attn,
    /// Fused gate/up projections, `2 intermediate` wide.
    GateUp,
    /// `silu(gate) * up`, `intermediate` wide.
    Act,
    /// The sampled rows after the final norm, `hidden` wide.
    Sel,
    /// `[sampled rows][vocab]`.
    Logits,
    /// A sub-layer's output before its post-norm (gemma3), `hidden` wide.
    O,
}

impl Buf {
    pub const ALL: [Buf; 12] = [
        Buf::X,
        Buf::H,
        Buf::Qkv,
        Buf::Q,
        Buf::K,
        Buf::V,
        Buf::Attn,
        Buf::GateUp,
        Buf::Act,
        Buf::Sel,
        Buf::Logits,
        Buf::O,
    ];

    /// Width of the buffer's rows for model `c`.
    pub fn width(self, c: &crate::model::config::ModelConfig) -> usize {
        match self {
            Buf::X | Buf::H | Buf::Sel | Buf::O => c.hidden,
            Buf::Qkv => c.q_dim() + 2 * c.kv_dim(),
            Buf::Q | Buf::Attn => c.q_dim(),
            Buf::K | Buf::V => c.kv_dim(),
            Buf::GateUp => 2 * c.intermediate,
            Buf::Act => c.intermediate,
            Buf::Logits => c.vocab_size,
        }
    }
}

/// A weight matrix of the model, by layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    Qkv(usize),
    Wo(usize),
    GateUp(usize),
    Down(usize),
    /// The output projection (the embedding when tied).
    LmHead,
}

/// An RMSNorm weight vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    Attn(usize),
    Ffn(usize),
    Final,
    /// Per-head norms of Q and of K, `head_dim` wide (qwen3).
    Q(usize),
    K(usize),
    /// The norms of the attention's and the MLP's outputs (gemma3).
    PostAttn(usize),
    PostFfn(usize),
}

/// Which rotary table a layer turns Q and K with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotary {
    Global,
    /// Gemma 3's sliding-window layers: their own base.
    Local,
}

/// A bias vector, added to every row of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// `q_dim + 2 kv_dim` wide, for [`Buf::Qkv`] (qwen2).
    Qkv(usize),
}

/// What a backend provides for [`forward`]. Each op reads and writes named buffers; `b` is the
/// step's batch for the ops that need its metadata (a device backend may instead use what
/// [`LayerOps::begin`] uploaded).
pub trait LayerOps {
    type Error;
    /// Whether each layer gets an NVTX range (`--profile-layers`).
    fn profile_layers(&self) -> bool {
        false
    }
    /// Prepares the step: buffers sized for `b`'s tokens, metadata where the ops can read it.
    fn begin(&mut self, b: &ScheduledBatch) -> Result<(), Self::Error>;
    /// `out[t] = embedding[input_ids[t]]`.
    fn embedding(&mut self, b: &ScheduledBatch, out: Buf) -> Result<(), Self::Error>;
    /// `out = rms_norm(x) * w`, over the rows `x` holds.
    fn rms_norm(&mut self, x: Buf, w: Norm, out: Buf) -> Result<(), Self::Error>;
    /// `out (+)= x * w^T`.
    fn matmul(&mut self, x: Buf, w: Weight, out: Buf, accumulate: bool) -> Result<(), Self::Error>;
    /// `x[t] += bias` for every row `t`.
    fn add_bias(&mut self, x: Buf, bias: Bias) -> Result<(), Self::Error>;
    /// `x *= s`.
    fn scale(&mut self, x: Buf, s: f32) -> Result<(), Self::Error>;
    /// `x += y`, over the rows `x` holds.
    fn add(&mut self, x: Buf, y: Buf) -> Result<(), Self::Error>;
    /// Splits fused rows into Q, K and V, RMS-normalizes each head of Q and of K with
    /// `head_norms` where given, and rotates Q and K at each token's position with `rotary`'s
    /// table.
    #[allow(clippy::too_many_arguments)]
    fn split_rope(
        &mut self,
        b: &ScheduledBatch,
        qkv: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        head_norms: Option<(Norm, Norm)>,
        rotary: Rotary,
    ) -> Result<(), Self::Error>;
    /// Writes this step's K and V rows into the paged cache of `layer` (`slot_mapping`).
    fn reshape_and_cache(&mut self, b: &ScheduledBatch, layer: usize, k: Buf, v: Buf) -> Result<(), Self::Error>;
    /// Paged attention of every token over its sequence's visible keys in `layer`'s cache:
    /// all before it, or with `window`, the last `window` up to itself.
    fn paged_attention(
        &mut self,
        b: &ScheduledBatch,
        layer: usize,
        q: Buf,
        out: Buf,
        window: Option<usize>,
    ) -> Result<(), Self::Error>;
    /// `out = silu(gate) * up` for `x = [gate | up]`.
    fn silu_and_mul(&mut self, x: Buf, out: Buf) -> Result<(), Self::Error>;
    /// `out = gelu(gate) * up` (GELU's tanh form) for `x = [gate | up]`.
    fn gelu_and_mul(&mut self, x: Buf, out: Buf) -> Result<(), Self::Error>;
    /// `out` = the rows of `x` that sample (`logits_indices`), in order.
    fn gather_sampled(&mut self, b: &ScheduledBatch, x: Buf, out: Buf) -> Result<(), Self::Error>;
}

/// One forward pass over the packed batch: the logits of every sampling row end in
/// [`Buf::Logits`]. The final norm and the LM head run on the sampled rows only. Llama's
/// layer, with the architecture's departures from it ([`ArchDeltas`]) as extra ops or
/// arguments where they fall, so every architecture shares this one loop.
pub fn forward<O: LayerOps>(ops: &mut O, c: &ModelConfig, b: &ScheduledBatch) -> Result<(), O::Error> {
    let d: &ArchDeltas = &c.deltas;
    ops.begin(b)?;
    ops.embedding(b, Buf::X)?;
    if let Some(s) = d.embed_scale {
        ops.scale(Buf::X, s)?;
    }
    for l in 0..c.num_layers {
        let _range = ops.profile_layers().then(|| crate::engine::nvtx::range(crate::engine::nvtx::layer_name(l)));
        ops.rms_norm(Buf::X, Norm::Attn(l), Buf::H)?;
        ops.matmul(Buf::H, Weight::Qkv(l), Buf::Qkv, false)?;
        if d.qkv_bias {
            ops.add_bias(Buf::Qkv, Bias::Qkv(l))?;
        }
        let window = d.window(l);
        let rotary = if window.is_some() { Rotary::Local } else { Rotary::Global };
        let head_norms = d.qk_norm.then_some((Norm::Q(l), Norm::K(l)));
        ops.split_rope(b, Buf::Qkv, Buf::Q, Buf::K, Buf::V, head_norms, rotary)?;
        ops.reshape_and_cache(b, l, Buf::K, Buf::V)?;
        ops.paged_attention(b, l, Buf::Q, Buf::Attn, window)?;
        residual(ops, Buf::Attn, Weight::Wo(l), d.post_norms.then_some(Norm::PostAttn(l)))?;
        ops.rms_norm(Buf::X, Norm::Ffn(l), Buf::H)?;
        ops.matmul(Buf::H, Weight::GateUp(l), Buf::GateUp, false)?;
        if d.gelu {
            ops.gelu_and_mul(Buf::GateUp, Buf::Act)?;
        } else {
            ops.silu_and_mul(Buf::GateUp, Buf::Act)?;
        }
        residual(ops, Buf::Act, Weight::Down(l), d.post_norms.then_some(Norm::PostFfn(l)))?;
    }
    ops.gather_sampled(b, Buf::X, Buf::H)?;
    ops.rms_norm(Buf::H, Norm::Final, Buf::Sel)?;
    ops.matmul(Buf::Sel, Weight::LmHead, Buf::Logits, false)
}

/// `X += x * w^T`, in place; with a post-norm (gemma3), `X += rms_norm(x * w^T)`.
fn residual<O: LayerOps>(ops: &mut O, x: Buf, w: Weight, post: Option<Norm>) -> Result<(), O::Error> {
    match post {
        None => ops.matmul(x, w, Buf::X, true),
        Some(n) => {
            ops.matmul(x, w, Buf::O, false)?;
            ops.rms_norm(Buf::O, n, Buf::H)?;
            ops.add(Buf::X, Buf::H)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the ops in order: the pass's shape is the contract a device backend relies on.
    #[derive(Default)]
    struct Trace(Vec<String>);

    impl LayerOps for Trace {
        type Error = ();
        fn begin(&mut self, b: &ScheduledBatch) -> Result<(), ()> {
            self.0.push(format!("begin {}", b.num_tokens()));
            Ok(())
        }
        fn embedding(&mut self, _: &ScheduledBatch, out: Buf) -> Result<(), ()> {
            self.0.push(format!("embedding {out:?}"));
            Ok(())
        }
        fn rms_norm(&mut self, x: Buf, w: Norm, out: Buf) -> Result<(), ()> {
            self.0.push(format!("rms_norm {x:?} {w:?} {out:?}"));
            Ok(())
        }
        fn matmul(&mut self, x: Buf, w: Weight, out: Buf, acc: bool) -> Result<(), ()> {
            self.0.push(format!("matmul {x:?} {w:?} {out:?} {acc}"));
            Ok(())
        }
        fn add_bias(&mut self, x: Buf, bias: Bias) -> Result<(), ()> {
            self.0.push(format!("add_bias {x:?} {bias:?}"));
            Ok(())
        }
        fn scale(&mut self, x: Buf, s: f32) -> Result<(), ()> {
            self.0.push(format!("scale {x:?} {s}"));
            Ok(())
        }
        fn add(&mut self, x: Buf, y: Buf) -> Result<(), ()> {
            self.0.push(format!("add {x:?} {y:?}"));
            Ok(())
        }
        fn split_rope(
            &mut self,
            _: &ScheduledBatch,
            _: Buf,
            _: Buf,
            _: Buf,
            _: Buf,
            norms: Option<(Norm, Norm)>,
            rotary: Rotary,
        ) -> Result<(), ()> {
            self.0.push(format!("split_rope {norms:?} {rotary:?}"));
            Ok(())
        }
        fn gelu_and_mul(&mut self, _: Buf, _: Buf) -> Result<(), ()> {
            self.0.push("gelu_and_mul".into());
            Ok(())
        }
        fn reshape_and_cache(&mut self, _: &ScheduledBatch, l: usize, _: Buf, _: Buf) -> Result<(), ()> {
            self.0.push(format!("cache {l}"));
            Ok(())
        }
        fn paged_attention(
            &mut self,
            _: &ScheduledBatch,
            l: usize,
            _: Buf,
            _: Buf,
            w: Option<usize>,
        ) -> Result<(), ()> {
            self.0.push(format!("attention {l} {w:?}"));
            Ok(())
        }
        fn silu_and_mul(&mut self, _: Buf, _: Buf) -> Result<(), ()> {
            self.0.push("silu_and_mul".into());
            Ok(())
        }
        fn gather_sampled(&mut self, _: &ScheduledBatch, x: Buf, out: Buf) -> Result<(), ()> {
            self.0.push(format!("gather {x:?} {out:?}"));
            Ok(())
        }
    }

    #[test]
    fn a_pass_is_ten_ops_a_layer_then_the_sampled_head() {
        let mut t = Trace::default();
        let b = ScheduledBatch { input_ids: vec![1, 2, 3], ..Default::default() };
        let llama = crate::model::dummy::tiny_profile(2).config();
        forward(&mut t, &llama, &b).unwrap();
        assert_eq!(t.0.len(), 2 + 10 * 2 + 3);
        assert_eq!(t.0[0], "begin 3");
        assert_eq!(t.0[4], "split_rope None Global", "Llama has no bias and no head norms");
        assert_eq!(t.0[12], "rms_norm X Attn(1) H", "the second layer starts after ten ops");
        assert_eq!(t.0[7], "matmul Attn Wo(0) X true", "the residual adds in place");
        assert_eq!(&t.0[22..], ["gather X H", "rms_norm H Final Sel", "matmul Sel LmHead Logits false"]);
        // An error stops the pass where it happened.
        struct Fails(usize);
        impl LayerOps for Fails {
            type Error = usize;
            fn begin(&mut self, _: &ScheduledBatch) -> Result<(), usize> {
                Ok(())
            }
            fn embedding(&mut self, _: &ScheduledBatch, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn rms_norm(&mut self, _: Buf, _: Norm, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn matmul(&mut self, _: Buf, w: Weight, _: Buf, _: bool) -> Result<(), usize> {
                self.0 += 1;
                if w == Weight::Down(0) {
                    Err(self.0)
                } else {
                    Ok(())
                }
            }
            fn add_bias(&mut self, _: Buf, _: Bias) -> Result<(), usize> {
                Ok(())
            }
            fn scale(&mut self, _: Buf, _: f32) -> Result<(), usize> {
                Ok(())
            }
            fn add(&mut self, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn split_rope(
                &mut self,
                _: &ScheduledBatch,
                _: Buf,
                _: Buf,
                _: Buf,
                _: Buf,
                _: Option<(Norm, Norm)>,
                _: Rotary,
            ) -> Result<(), usize> {
                Ok(())
            }
            fn gelu_and_mul(&mut self, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn reshape_and_cache(&mut self, _: &ScheduledBatch, _: usize, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn paged_attention(
                &mut self,
                _: &ScheduledBatch,
                _: usize,
                _: Buf,
                _: Buf,
                _: Option<usize>,
            ) -> Result<(), usize> {
                Ok(())
            }
            fn silu_and_mul(&mut self, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn gather_sampled(&mut self, _: &ScheduledBatch, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
        }
        let three = crate::model::dummy::tiny_profile(3).config();
        assert_eq!(forward(&mut Fails(0), &three, &b), Err(4), "stopped at the fourth product");
    }

    /// The deltas fall where their architectures put them: qwen2's bias right after the fused
    /// Q/K/V product, qwen3's head norms in the split, before rotary.
    #[test]
    fn deltas_add_ops_where_they_belong() {
        let b = ScheduledBatch { input_ids: vec![1], ..Default::default() };
        let mut c = crate::model::dummy::tiny_profile(2).config();
        c.deltas.qkv_bias = true;
        let mut t = Trace::default();
        forward(&mut t, &c, &b).unwrap();
        assert_eq!(t.0.len(), 2 + 11 * 2 + 3);
        assert_eq!(t.0[3..6], ["matmul H Qkv(0) Qkv false", "add_bias Qkv Qkv(0)", "split_rope None Global"]);
        assert_eq!(t.0[15], "add_bias Qkv Qkv(1)");
        c.deltas = ArchDeltas { qk_norm: true, ..Default::default() };
        let mut t = Trace::default();
        forward(&mut t, &c, &b).unwrap();
        assert_eq!(t.0.len(), 2 + 10 * 2 + 3);
        assert_eq!(t.0[14], "split_rope Some((Q(1), K(1))) Global");
        // gemma3: scaled embeddings, post-norms around both residual adds, GELU, and a
        // window (with the local rotary table) on the layers the pattern names.
        c.deltas = ArchDeltas {
            qk_norm: true,
            embed_scale: Some(8.0),
            post_norms: true,
            gelu: true,
            sliding: Some(crate::model::config::Sliding { window: 4, layers: vec![true, false], rope_theta: 1e4 }),
            ..Default::default()
        };
        let mut t = Trace::default();
        forward(&mut t, &c, &b).unwrap();
        assert_eq!(t.0[1..3], ["embedding X", "scale X 8"]);
        let layer0 = [
            "rms_norm X Attn(0) H",
            "matmul H Qkv(0) Qkv false",
            "split_rope Some((Q(0), K(0))) Local",
            "cache 0",
            "attention 0 Some(4)",
            "matmul Attn Wo(0) O false",
            "rms_norm O PostAttn(0) H",
            "add X H",
            "rms_norm X Ffn(0) H",
            "matmul H GateUp(0) GateUp false",
            "gelu_and_mul",
            "matmul Act Down(0) O false",
            "rms_norm O PostFfn(0) H",
            "add X H",
        ];
        assert_eq!(t.0[3..3 + layer0.len()], layer0);
        assert_eq!(t.0[3 + layer0.len() + 2], "split_rope Some((Q(1), K(1))) Global", "layer 1 is global");
        assert_eq!(t.0[3 + layer0.len() + 4], "attention 1 None");
    }
}
