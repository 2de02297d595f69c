//! Random weights for a named shape (vLLM's `--load-format dummy`): benchmarking at a scale
//! people serve without downloading the weights. Values come from a seed, so two loads are
//! the same model; they are uniform in `±1/sqrt(fan_in)`, which keeps activations finite
//! through any depth (each product shrinks its input's scale, RMSNorm restores it), and the
//! norms are 1. The tokenizer is one token per byte: the text is meaningless, the work is not.

use super::config::ModelConfig;
use super::half::{HKind, HMatrix};
use super::weights::{Layer, Linear, LinearData, Weights};
use rayon::prelude::*;
use weave_kernels_gpu::sample::dummy_value;
use weave_kernels_gpu::{Bf16, Elem, F16};

/// How dummy weights are stored (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DummyDtype {
    F32,
    F16,
    Bf16,
}

impl DummyDtype {
    /// vLLM's names; `auto` is bfloat16, as for the bf16 checkpoints these shapes come from.
    pub fn parse(s: &str) -> Result<DummyDtype, String> {
        match s {
            "auto" | "bfloat16" | "bf16" => Ok(DummyDtype::Bf16),
            "float16" | "half" | "f16" => Ok(DummyDtype::F16),
            "float32" | "float" | "f32" => Ok(DummyDtype::F32),
            other => Err(format!("unknown --dtype {other:?}: use auto, bfloat16, float16 or float32")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DummyDtype::F32 => "float32",
            DummyDtype::F16 => "float16",
            DummyDtype::Bf16 => "bfloat16",
        }
    }
}

/// `n` values of the dummy stream `seed` at `scale`
/// (`weave_kernels_gpu::sample::dummy_value`, the stream the device's `fill_dummy_*` kernels
/// write), in parallel: each value depends on its index alone, not on the thread count.
fn uniform(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        for (j, x) in chunk.iter_mut().enumerate() {
            *x = dummy_value(seed, (c * CHUNK + j) as u64, scale);
        }
    });
    v
}

/// Where the values go: the host, in `dtype`, or left for the device to fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Materialize {
    Host(DummyDtype),
    Device,
}

/// A `[rows][cols]` matrix of dummy values.
fn linear(rows: usize, cols: usize, to: Materialize, seed: u64, scale: f32) -> Linear {
    let dtype = match to {
        Materialize::Device => {
            return Linear { data: LinearData::Dummy { seed, scale }, out_dim: rows, in_dim: cols };
        }
        Materialize::Host(d) => d,
    };
    let v = uniform(rows * cols, scale, seed);
    let data = match dtype {
        DummyDtype::F32 => LinearData::F32(v),
        DummyDtype::F16 | DummyDtype::Bf16 => {
            let kind = if dtype == DummyDtype::F16 { HKind::F16 } else { HKind::Bf16 };
            // The device's conversions (round to nearest even), so both hold the same bits.
            let bits = v
                .par_iter()
                .map(|&x| match kind {
                    HKind::F16 => F16::from_f32(x).0,
                    HKind::Bf16 => Bf16::from_f32(x).0,
                })
                .collect();
            LinearData::Half(HMatrix { kind, rows, cols, bits })
        }
    };
    Linear { data, out_dim: rows, in_dim: cols }
}

/// Weights of shape `cfg` from `seed`.
pub fn weights(cfg: &ModelConfig, tied: bool, dtype: Materialize, seed: u64) -> Weights {
    let (h, f, v) = (cfg.hidden, cfg.intermediate, cfg.vocab_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    // One seed per tensor, from its place in the model.
    let s = |i: u64| seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let fan = |n: usize| 1.0 / (n as f32).sqrt();
    let layers = (0..cfg.num_layers)
        .map(|l| {
            let b = 16 + 8 * l as u64;
            Layer {
                attn_norm: vec![1.0; h],
                qkv: linear(qd + 2 * kvd, h, dtype, s(b), fan(h)),
                wo: linear(h, qd, dtype, s(b + 1), fan(qd)),
                ffn_norm: vec![1.0; h],
                gate_up: linear(2 * f, h, dtype, s(b + 2), fan(h)),
                down: linear(h, f, dtype, s(b + 3), fan(f)),
                qkv_bias: None,
                qk_norm: None,
                post_norms: None,
            }
        })
        .collect();
    Weights {
        embed: linear(v, h, dtype, s(1), fan(h)),
        layers,
        final_norm: vec![1.0; h],
        lm_head: (!tied).then(|| linear(v, h, dtype, s(2), fan(h))),
    }
}

/// A model shape small enough for unit tests: hidden 64, 4 heads over 2 KV heads of 16,
/// vocabulary 300.
#[cfg(test)]
pub(crate) fn tiny_profile(layers: usize) -> crate::model::profiles::ModelProfile {
    serde_json::from_str(&format!(
        r#"{{"name":"tiny","layers":{layers},"hidden":64,"heads":4,"kv_heads":2,"head_dim":16,"intermediate":96,"vocab":300,"dtype_bytes":2}}"#
    ))
    .unwrap()
}

/// [`tiny_profile`] with f32 dummy weights from `seed`, its rotary table to `max_pos`.
#[cfg(test)]
pub(crate) fn tiny_model(layers: usize, seed: u64, max_pos: usize) -> crate::backends::cpu::CpuModel {
    let cfg = tiny_profile(layers).config();
    let w = weights(&cfg, false, Materialize::Host(DummyDtype::F32), seed);
    crate::backends::cpu::CpuModel::new(cfg, w, max_pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::{CpuBackend, CpuModel};
    use crate::model::profiles::ModelProfile;
    use std::sync::Arc;

    fn tiny() -> ModelProfile {
        tiny_profile(3)
    }

    fn logits(dtype: DummyDtype, seed: u64) -> Vec<f32> {
        let cfg = tiny().config();
        let model = CpuModel::new(cfg.clone(), weights(&cfg, false, Materialize::Host(dtype), seed), 64);
        let mut be = CpuBackend::new(Arc::new(model), 4, 16, 1, 0);
        let b = weave_scheduler::ScheduledBatch {
            input_ids: vec![5, 7, 250],
            positions: vec![0, 1, 2],
            query_start_loc: vec![0, 3],
            block_tables: vec![1],
            max_blocks_per_seq: 1,
            block_size: 16,
            slot_mapping: vec![16, 17, 18],
            logits_indices: vec![2],
            max_seq_len: 3,
            ..Default::default()
        };
        be.forward(&b)
    }

    #[test]
    fn a_seed_gives_one_model_with_finite_spread_logits() {
        for dtype in [DummyDtype::F32, DummyDtype::F16, DummyDtype::Bf16] {
            let a = logits(dtype, 7);
            assert_eq!(a.len(), 300);
            assert!(a.iter().all(|x| x.is_finite()), "{dtype:?}");
            let (lo, hi) = a.iter().fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            assert!(hi - lo > 0.1 && hi - lo < 100.0, "{dtype:?}: logits span {lo}..{hi}");
            assert_eq!(a, logits(dtype, 7), "{dtype:?}: same seed, same model");
            assert_ne!(a, logits(dtype, 8), "{dtype:?}: another seed, another model");
        }
    }

    #[test]
    fn weights_left_for_the_device_hold_the_host_values() {
        let cfg = tiny().config();
        let host = weights(&cfg, false, Materialize::Host(DummyDtype::F32), 3);
        let lazy = weights(&cfg, false, Materialize::Device, 3);
        assert!(lazy.on_device_only() && !host.on_device_only());
        let (mut a, mut b) = (vec![0f32; cfg.intermediate], vec![0f32; cfg.intermediate]);
        for (h, l) in [(&host.embed, &lazy.embed), (&host.layers[2].down, &lazy.layers[2].down)] {
            for r in [0, h.out_dim / 2, h.out_dim - 1] {
                let (a, b) = (&mut a[..h.in_dim], &mut b[..h.in_dim]);
                h.row(r, a);
                l.row(r, b);
                assert_eq!(a, b, "row {r}");
            }
        }
        assert_eq!(lazy.embed.size_bytes(), 0);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        let m = linear(1, 4, Materialize::Host(DummyDtype::Bf16), 3, 1.0);
        let LinearData::Half(h) = &m.data else { panic!("16-bit") };
        let exact = uniform(4, 1.0, 3);
        for (&b, &x) in h.bits.iter().zip(&exact) {
            let back = f32::from_bits((b as u32) << 16);
            // Within half a bf16 ulp (8 bits of mantissa).
            assert!((back - x).abs() <= x.abs() * (1.0 / 256.0), "{x} -> {back}");
        }
        assert_eq!(DummyDtype::parse("auto"), Ok(DummyDtype::Bf16));
        assert!(DummyDtype::parse("int4").unwrap_err().contains("bfloat16"));
    }
}
