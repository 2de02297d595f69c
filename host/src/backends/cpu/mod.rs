//! The CPU backend: the real model, one forward pass per step over the packed mixed batch,
//! with the paged KV cache addressed through the scheduler's metadata (the same metadata the
//! GPU kernels take). Attention, the KV write, RMSNorm and rotary use `weave-kernels-gpu`'s
//! portable code, so the CPU and GPU paths share one definition.

use crate::engine::{Backend, StepResult};
use crate::model::config::ModelConfig;
use crate::model::weights::{Linear, LinearData, Weights};
use crate::sampling::{sample, Rng, SamplingParams};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use weave_kernels_gpu::attention::{reshape_and_cache_host, AttnShape};
use weave_kernels_gpu::ops::{fill_cos_sin_row, rms_norm_row, rope_head, silu_and_mul_row};
use weave_kernels_gpu::{Elem, F16};
use weave_scheduler::{RequestId, ScheduledBatch, StepOutput};

/// How the CPU backend stores the KV cache (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    /// Half the memory; read with F16C where the CPU has it.
    F16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// `auto` (vLLM's word): f16, except f32 beside f32 weights so that path stays exact.
    pub fn parse(s: &str, precision: crate::model::weights::Precision) -> Result<KvDtype, String> {
        match s {
            "auto" if precision == crate::model::weights::Precision::F32 => Ok(KvDtype::F32),
            "auto" | "f16" | "float16" | "half" => Ok(KvDtype::F16),
            "f32" | "float32" | "float" => Ok(KvDtype::F32),
            other => Err(format!("unknown --kv-cache-dtype {other:?}: use auto, f16 or f32")),
        }
    }
}

/// Weights and derived tables, shareable between backends.
#[derive(Debug)]
pub struct CpuModel {
    pub cfg: ModelConfig,
    pub w: Weights,
    /// The KV cache's element type for backends made from this model.
    pub kv_dtype: KvDtype,
    /// Row `pos`: `rot_dim / 2` cosines then sines.
    cos_sin: Vec<f32>,
    max_pos: usize,
}

impl CpuModel {
    pub fn new(cfg: ModelConfig, w: Weights, max_pos: usize) -> CpuModel {
        let mut cos_sin = vec![0f32; max_pos * cfg.rot_dim];
        for (pos, row) in cos_sin.chunks_mut(cfg.rot_dim).enumerate() {
            fill_cos_sin_row(pos, cfg.rot_dim, cfg.rope_theta, row);
        }
        CpuModel { cfg, w, cos_sin, max_pos, kv_dtype: KvDtype::F32 }
    }

    /// Bytes of KV cache per token slot.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_layers * self.cfg.kv_dim() * self.kv_dtype.bytes()
    }
}

/// The paged KV cache, one buffer per layer for K and for V.
#[derive(Debug)]
enum KvCache {
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    F16 { k: Vec<Vec<F16>>, v: Vec<Vec<F16>> },
}

pub mod attention;
pub mod hmatmul;
pub mod qmatmul;

/// `out[n][w.out_dim] (+)= x[n][w.in_dim] * w^T`: through the gemm crate for f32 weights; for
/// packed ones, `x` is quantized into `scratch` first; 16-bit ones take `x` as it is.
fn matmul(x: &[f32], n: usize, w: &Linear, out: &mut [f32], accumulate: bool, threads: usize, scratch: &mut Scratch) {
    match &w.data {
        LinearData::F32(wf) => gemm_xwt(x, n, wf, w.out_dim, w.in_dim, out, accumulate, threads),
        LinearData::Quant(q) => {
            scratch.acts.quantize(scratch.isa, x, n, w.in_dim);
            qmatmul::qmatmul(scratch.isa, q, &scratch.acts, out, accumulate, threads);
        }
        LinearData::Half(h) => hmatmul::hmatmul(scratch.half_isa, h, x, n, out, accumulate, threads),
    }
}

/// Buffers a step reuses: the quantized activations.
#[derive(Debug)]
struct Scratch {
    acts: qmatmul::QActs,
    isa: qmatmul::Isa,
    half_isa: hmatmul::HIsa,
}

/// `out[n][out_dim] (+)= x[n][in_dim] * w^T` for a row-major `w[out_dim][in_dim]`, through
/// the gemm crate.
#[allow(clippy::too_many_arguments)]
fn gemm_xwt(
    x: &[f32],
    n: usize,
    w: &[f32],
    out_dim: usize,
    in_dim: usize,
    out: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    assert_eq!(x.len(), n * in_dim);
    assert_eq!(w.len(), out_dim * in_dim);
    assert_eq!(out.len(), n * out_dim);
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the slices are sized for these strides (asserted above), and `out` does not
    // alias `x` or `w`.
    unsafe {
        gemm::gemm(
            n,
            out_dim,
            in_dim,
            out.as_mut_ptr(),
            1,
            out_dim as isize,
            accumulate,
            x.as_ptr(),
            1,
            in_dim as isize,
            w.as_ptr(),
            in_dim as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

#[derive(Debug)]
pub struct CpuBackend {
    model: Arc<CpuModel>,
    shape: AttnShape,
    kv: KvCache,
    /// Attention in AVX2/FMA, with F16C reads of an f16 cache.
    simd: bool,
    /// The threads a forward pass runs on.
    pool: Arc<rayon::ThreadPool>,
    /// The step's K and V rows in f16, for the cache write.
    kv16: (Vec<F16>, Vec<F16>),
    threads: usize,
    sampling: HashMap<RequestId, (SamplingParams, Rng)>,
    /// Seed for requests that bring none.
    base_seed: u64,
    scratch: Scratch,
}

impl CpuBackend {
    /// A backend with a KV cache of `num_blocks` blocks (the null block included).
    pub fn new(
        model: Arc<CpuModel>,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
        base_seed: u64,
    ) -> CpuBackend {
        let c = &model.cfg;
        let shape = AttnShape {
            num_q_heads: c.num_q_heads as u32,
            num_kv_heads: c.num_kv_heads as u32,
            head_dim: c.head_dim as u32,
            block_size: block_size as u32,
            max_blocks_per_seq: 0,
            blocks_per_split: 0,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let per_layer = num_blocks * block_size * c.kv_dim();
        CpuBackend {
            kv: match model.kv_dtype {
                KvDtype::F32 => KvCache::F32 {
                    k: (0..c.num_layers).map(|_| vec![0f32; per_layer]).collect(),
                    v: (0..c.num_layers).map(|_| vec![0f32; per_layer]).collect(),
                },
                KvDtype::F16 => KvCache::F16 {
                    k: (0..c.num_layers).map(|_| vec![F16::default(); per_layer]).collect(),
                    v: (0..c.num_layers).map(|_| vec![F16::default(); per_layer]).collect(),
                },
            },
            simd: attention::has_simd(),
            kv16: (Vec::new(), Vec::new()),
            model,
            shape,
            threads: threads.max(1),
            pool: Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads.max(1))
                    .thread_name(|i| format!("weave-cpu-{i}"))
                    .build()
                    .expect("a thread pool"),
            ),
            sampling: HashMap::new(),
            base_seed,
            scratch: Scratch {
                acts: qmatmul::QActs::default(),
                isa: qmatmul::Isa::detect(),
                half_isa: hmatmul::HIsa::detect(),
            },
        }
    }

    /// Fills the whole KV cache with small pseudo-random values. A fresh cache is untouched
    /// zero pages that the kernel maps to one shared page, so reading "cached" context there
    /// costs next to nothing; profiling (timing attention over context no step wrote) needs
    /// real memory behind it.
    pub fn scribble_kv_cache(&mut self) {
        // xorshift32: cheap, and values in [-0.5, 0.5) keep the softmax ordinary.
        fn fill<T: Elem>(i: usize, layer: &mut [T]) {
            let mut x = 0x9e37_79b9u32.wrapping_mul(i as u32 + 1) | 1;
            for v in layer.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *v = T::from_f32((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5);
            }
        }
        match &mut self.kv {
            KvCache::F32 { k, v } => k.par_iter_mut().chain(v.par_iter_mut()).enumerate().for_each(|(i, l)| fill(i, l)),
            KvCache::F16 { k, v } => k.par_iter_mut().chain(v.par_iter_mut()).enumerate().for_each(|(i, l)| fill(i, l)),
        }
    }

    /// Logits of every sampling sequence (`[logits_indices.len()][vocab]`).
    pub fn forward(&mut self, b: &ScheduledBatch) -> Vec<f32> {
        // The whole pass runs on one of the pool's threads: a parallel loop started from a
        // thread outside the pool pays a cross-thread hand-off and a blocking wait, and a step
        // starts about ten per layer.
        let pool = self.pool.clone();
        pool.install(|| self.forward_in_pool(b))
    }

    fn forward_in_pool(&mut self, b: &ScheduledBatch) -> Vec<f32> {
        let m = &*self.model;
        let c = &m.cfg;
        let (n, h, qd, kvd, d) = (b.num_tokens(), c.hidden, c.q_dim(), c.kv_dim(), c.head_dim);
        let t = self.threads;
        assert!(b.max_seq_len as usize <= m.max_pos, "position beyond the rotary table");
        let shape = AttnShape { max_blocks_per_seq: b.max_blocks_per_seq as u32, ..self.shape };
        // Sequence of every token row.
        let mut tok_seq = Vec::with_capacity(n);
        for (s, w) in b.query_start_loc.windows(2).enumerate() {
            tok_seq.extend(std::iter::repeat_n(s, (w[1] - w[0]) as usize));
        }
        let mut x = vec![0f32; n * h];
        x.par_chunks_mut(h).zip(&b.input_ids).for_each(|(row, &id)| m.w.embed.row(id as usize, row));
        let sc = &mut self.scratch;
        let mut hbuf = vec![0f32; n * h];
        let mut qkv = vec![0f32; n * (qd + 2 * kvd)];
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut attn = vec![0f32; n * qd];
        let mut gu = vec![0f32; n * 2 * c.intermediate];
        let mut act = vec![0f32; n * c.intermediate];
        for (li, layer) in m.w.layers.iter().enumerate() {
            hbuf.par_chunks_mut(h)
                .zip(x.par_chunks(h))
                .for_each(|(o, xr)| rms_norm_row(xr, &layer.attn_norm, c.rms_eps, o));
            matmul(&hbuf, n, &layer.qkv, &mut qkv, false, t, sc);
            // Split Q/K/V and rotate Q and K at each token's position.
            q.par_chunks_mut(qd)
                .zip(k.par_chunks_mut(kvd))
                .zip(v.par_chunks_mut(kvd))
                .zip(qkv.par_chunks(qd + 2 * kvd))
                .zip(&b.positions)
                .for_each(|((((qr, kr), vr), src), &pos)| {
                    qr.copy_from_slice(&src[..qd]);
                    kr.copy_from_slice(&src[qd..qd + kvd]);
                    vr.copy_from_slice(&src[qd + kvd..]);
                    let cs = &m.cos_sin[pos as usize * c.rot_dim..(pos as usize + 1) * c.rot_dim];
                    for head in qr.chunks_mut(d).chain(kr.chunks_mut(d)) {
                        rope_head(head, cs, c.rot_dim, c.rope_layout);
                    }
                });
            let simd = self.simd;
            match &mut self.kv {
                KvCache::F32 { k: kc, v: vc } => {
                    reshape_and_cache_host(&shape, &k, &v, &b.slot_mapping, &mut kc[li], &mut vc[li]);
                    attention::attend(&shape, b, &q, &kc[li], &vc[li], &mut attn, simd);
                }
                KvCache::F16 { k: kc, v: vc } => {
                    let (k16, v16) = &mut self.kv16;
                    k16.clear();
                    k16.extend(k.iter().map(|&x| F16::from_f32(x)));
                    v16.clear();
                    v16.extend(v.iter().map(|&x| F16::from_f32(x)));
                    reshape_and_cache_host(&shape, k16, v16, &b.slot_mapping, &mut kc[li], &mut vc[li]);
                    attention::attend(&shape, b, &q, &kc[li], &vc[li], &mut attn, simd);
                }
            }
            matmul(&attn, n, &layer.wo, &mut x, true, t, sc);
            hbuf.par_chunks_mut(h)
                .zip(x.par_chunks(h))
                .for_each(|(o, xr)| rms_norm_row(xr, &layer.ffn_norm, c.rms_eps, o));
            matmul(&hbuf, n, &layer.gate_up, &mut gu, false, t, sc);
            act.par_chunks_mut(c.intermediate)
                .zip(gu.par_chunks(2 * c.intermediate))
                .for_each(|(o, g)| silu_and_mul_row(g, o));
            matmul(&act, n, &layer.down, &mut x, true, t, sc);
        }
        // Final norm and LM head for the sampled rows only.
        let s = b.logits_indices.len();
        let mut sel = vec![0f32; s * h];
        for (o, &row) in sel.chunks_mut(h).zip(&b.logits_indices) {
            rms_norm_row(&x[row as usize * h..(row as usize + 1) * h], &m.w.final_norm, c.rms_eps, o);
        }
        let mut logits = vec![0f32; s * c.vocab_size];
        let head = m.w.lm_head.as_ref().unwrap_or(&m.w.embed);
        matmul(&sel, s, head, &mut logits, false, t, sc);
        logits
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn wall_clock(&self) -> bool {
        true
    }
    fn add_request(&mut self, id: RequestId, params: &SamplingParams) {
        let seed = params.seed.unwrap_or(self.base_seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.sampling.insert(id, (params.clone(), Rng::new(seed)));
    }
    fn remove_request(&mut self, id: RequestId) {
        self.sampling.remove(&id);
    }
    fn execute(&mut self, batch: &ScheduledBatch) -> anyhow::Result<StepResult> {
        let mut logits = self.forward(batch);
        let vocab = self.model.cfg.vocab_size;
        let ids: Vec<RequestId> = batch.sampling_request_ids().collect();
        let mut sampled = Vec::with_capacity(ids.len());
        let mut logprobs = Vec::new();
        for (i, (row, id)) in logits.chunks_mut(vocab).zip(ids).enumerate() {
            let (p, rng) = self.sampling.entry(id).or_insert_with(|| (SamplingParams::default(), Rng::new(0)));
            // Logprobs are of the raw logits: taken before sampling may touch the row.
            let raw = p.logprobs.map(|top| (top, row.to_vec()));
            let tok = sample(row, p, rng);
            if let Some((top, raw)) = raw {
                logprobs.resize(i, None);
                logprobs.push(Some(crate::sampling::logprobs(&raw, tok, top)));
            }
            sampled.push(tok);
        }
        if !logprobs.is_empty() {
            logprobs.resize(sampled.len(), None);
        }
        Ok(StepResult { output: StepOutput { sampled }, duration_s: None, logprobs })
    }
}
