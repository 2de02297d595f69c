//! The Llama forward pass, written once over [`LayerOps`]: the operations a backend provides
//! on its own buffers and weights (the CPU backend on host vectors, a CUDA backend on device
//! buffers with cuBLAS and the kernels-gpu PTX), in the way candle's `BackendStorage` serves
//! its CPU and CUDA storages. The pass takes the scheduler's packed mixed batch as it is:
//! one pass over every token of every sequence, with no per-sequence work outside attention.
//!
//! Buffers and weights are named ([`Buf`], [`Weight`], [`Norm`]), so a backend keeps its
//! step's activations in a workspace of its own, allocated once and reused.

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
}

impl Buf {
    pub const ALL: [Buf; 11] =
        [Buf::X, Buf::H, Buf::Qkv, Buf::Q, Buf::K, Buf::V, Buf::Attn, Buf::GateUp, Buf::Act, Buf::Sel, Buf::Logits];

    /// Width of the buffer's rows for model `c`.
    pub fn width(self, c: &crate::model::config::ModelConfig) -> usize {
        match self {
            Buf::X | Buf::H | Buf::Sel => c.hidden,
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
    /// Splits fused rows into Q, K and V, and rotates Q and K at each token's position.
    fn split_rope(&mut self, b: &ScheduledBatch, qkv: Buf, q: Buf, k: Buf, v: Buf) -> Result<(), Self::Error>;
    /// Writes this step's K and V rows into the paged cache of `layer` (`slot_mapping`).
    fn reshape_and_cache(&mut self, b: &ScheduledBatch, layer: usize, k: Buf, v: Buf) -> Result<(), Self::Error>;
    /// Paged attention of every token over its sequence's visible keys in `layer`'s cache.
    fn paged_attention(&mut self, b: &ScheduledBatch, layer: usize, q: Buf, out: Buf) -> Result<(), Self::Error>;
    /// `out = silu(gate) * up` for `x = [gate | up]`.
    fn silu_and_mul(&mut self, x: Buf, out: Buf) -> Result<(), Self::Error>;
    /// `out` = the rows of `x` that sample (`logits_indices`), in order.
    fn gather_sampled(&mut self, b: &ScheduledBatch, x: Buf, out: Buf) -> Result<(), Self::Error>;
}

/// One forward pass over the packed batch: the logits of every sampling row end in
/// [`Buf::Logits`]. The final norm and the LM head run on the sampled rows only.
pub fn forward<O: LayerOps>(ops: &mut O, num_layers: usize, b: &ScheduledBatch) -> Result<(), O::Error> {
    ops.begin(b)?;
    ops.embedding(b, Buf::X)?;
    for l in 0..num_layers {
        let _range = ops.profile_layers().then(|| crate::engine::nvtx::range(crate::engine::nvtx::layer_name(l)));
        ops.rms_norm(Buf::X, Norm::Attn(l), Buf::H)?;
        ops.matmul(Buf::H, Weight::Qkv(l), Buf::Qkv, false)?;
        ops.split_rope(b, Buf::Qkv, Buf::Q, Buf::K, Buf::V)?;
        ops.reshape_and_cache(b, l, Buf::K, Buf::V)?;
        ops.paged_attention(b, l, Buf::Q, Buf::Attn)?;
        ops.matmul(Buf::Attn, Weight::Wo(l), Buf::X, true)?;
        ops.rms_norm(Buf::X, Norm::Ffn(l), Buf::H)?;
        ops.matmul(Buf::H, Weight::GateUp(l), Buf::GateUp, false)?;
        ops.silu_and_mul(Buf::GateUp, Buf::Act)?;
        ops.matmul(Buf::Act, Weight::Down(l), Buf::X, true)?;
    }
    ops.gather_sampled(b, Buf::X, Buf::H)?;
    ops.rms_norm(Buf::H, Norm::Final, Buf::Sel)?;
    ops.matmul(Buf::Sel, Weight::LmHead, Buf::Logits, false)
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
        fn split_rope(&mut self, _: &ScheduledBatch, _: Buf, _: Buf, _: Buf, _: Buf) -> Result<(), ()> {
            self.0.push("split_rope".into());
            Ok(())
        }
        fn reshape_and_cache(&mut self, _: &ScheduledBatch, l: usize, _: Buf, _: Buf) -> Result<(), ()> {
            self.0.push(format!("cache {l}"));
            Ok(())
        }
        fn paged_attention(&mut self, _: &ScheduledBatch, l: usize, _: Buf, _: Buf) -> Result<(), ()> {
            self.0.push(format!("attention {l}"));
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
        forward(&mut t, 2, &b).unwrap();
        assert_eq!(t.0.len(), 2 + 10 * 2 + 3);
        assert_eq!(t.0[0], "begin 3");
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
            fn split_rope(&mut self, _: &ScheduledBatch, _: Buf, _: Buf, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn reshape_and_cache(&mut self, _: &ScheduledBatch, _: usize, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn paged_attention(&mut self, _: &ScheduledBatch, _: usize, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn silu_and_mul(&mut self, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
            fn gather_sampled(&mut self, _: &ScheduledBatch, _: Buf, _: Buf) -> Result<(), usize> {
                Ok(())
            }
        }
        assert_eq!(forward(&mut Fails(0), 3, &b), Err(4), "stopped at the fourth product");
    }
}
