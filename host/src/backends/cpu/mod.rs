//! The CPU backend: the real model, one forward pass per step over the packed mixed batch,
//! with the paged KV cache addressed through the scheduler's metadata (the same metadata the
//! GPU kernels take). Attention, the KV write, RMSNorm and rotary use `weave-kernels-gpu`'s
//! portable code, so the CPU and GPU paths share one definition.

use crate::engine::steplog::Phases;
use crate::engine::{Backend, StepResult, TokenLogprobs};
use crate::model::config::ModelConfig;
use crate::model::llama::{self, Bias, Buf, LayerOps, Norm, Rotary, Weight};
use crate::model::weights::{Linear, LinearData, Weights};
use crate::sampling::{Samplers, SamplingParams};
use rayon::prelude::*;
use std::sync::Arc;
use weave_kernels_gpu::attention::{reshape_and_cache_host, AttnShape};
use weave_kernels_gpu::ops::{
    fill_cos_sin_row_scaled, gelu_and_mul_row, rms_norm_row, rms_norm_row_in_place, rope_head, silu_and_mul_row,
};
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
    /// The same for the sliding-window layers' own base (empty without them).
    cos_sin_local: Vec<f32>,
    max_pos: usize,
}

impl CpuModel {
    pub fn new(cfg: ModelConfig, w: Weights, max_pos: usize) -> CpuModel {
        let divisors = cfg.deltas.rope_freqs.as_deref().unwrap_or(&[]);
        let table = |theta: f64| {
            let mut t = vec![0f32; max_pos * cfg.rot_dim];
            for (pos, row) in t.chunks_mut(cfg.rot_dim).enumerate() {
                fill_cos_sin_row_scaled(pos, cfg.rot_dim, theta, divisors, row);
            }
            t
        };
        let cos_sin = table(cfg.rope_theta);
        let cos_sin_local = cfg.deltas.sliding.as_ref().map(|s| table(s.rope_theta)).unwrap_or_default();
        CpuModel { cfg, w, cos_sin, cos_sin_local, max_pos, kv_dtype: KvDtype::F32 }
    }

    /// The rotary table's rows for positions `0..max_pos` (`rot_dim / 2` cosines then sines
    /// a row), for a backend that keeps its own copy (the GPU's).
    pub fn cos_sin(&self, max_pos: usize) -> &[f32] {
        assert!(max_pos <= self.max_pos, "position {max_pos} beyond the rotary table");
        &self.cos_sin[..max_pos * self.cfg.rot_dim]
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
        // `make_backend` does not give such a model to the CPU (`Weights::on_device_only`).
        LinearData::Dummy { .. } => unreachable!("dummy weights left for a device reached the CPU backend"),
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
pub(crate) fn gemm_xwt(
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
    /// One K and one V array per layer of a group ([`KvLayout`]), each indexed by block.
    kv: KvCache,
    layout: crate::model::config::KvLayout,
    /// Blocks in the cache (the null block included) and tokens a block holds.
    num_blocks: usize,
    block_size: usize,
    /// Attention in AVX2/FMA, with F16C reads of an f16 cache.
    simd: bool,
    /// The threads a forward pass runs on.
    pool: Arc<rayon::ThreadPool>,
    /// The step's K and V rows in f16, for the cache write.
    kv16: (Vec<F16>, Vec<F16>),
    threads: usize,
    sampling: Samplers,
    /// The step's structured-output masks, by sampling row.
    masks: Option<Arc<crate::structured::masks::StepMasks>>,
    scratch: Scratch,
    ws: Workspace,
}

impl CpuBackend {
    /// A backend with a KV cache of `num_blocks` blocks (the null block included), each
    /// holding one layer group's K/V ([`crate::model::config::ModelConfig::kv_layout`]: every
    /// layer, for a model without sliding windows).
    pub fn new(
        model: Arc<CpuModel>,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
        base_seed: u64,
    ) -> CpuBackend {
        let layout = model.cfg.kv_layout();
        CpuBackend::with_layout(model, layout, num_blocks, block_size, threads, base_seed)
    }

    /// The backend a scheduler with `sched` drives: its blocks, block size, and the KV layout
    /// its groups need ([`crate::model::config::KvLayout::for_groups`]; an error names a
    /// grouping that is not the model's).
    pub fn for_sched(
        model: Arc<CpuModel>,
        sched: &weave_scheduler::SchedulerConfig,
        threads: usize,
        base_seed: u64,
    ) -> anyhow::Result<CpuBackend> {
        let layout =
            crate::model::config::KvLayout::for_groups(&model.cfg, sched.kv_groups).map_err(anyhow::Error::msg)?;
        Ok(CpuBackend::with_layout(model, layout, sched.num_gpu_blocks, sched.block_size, threads, base_seed))
    }

    /// [`Self::new`] with the KV layout given.
    fn with_layout(
        model: Arc<CpuModel>,
        layout: crate::model::config::KvLayout,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
        base_seed: u64,
    ) -> CpuBackend {
        let c = &model.cfg;
        let shape = c.attn_shape(block_size);
        let per_layer = num_blocks * block_size * c.kv_dim();
        let arrays = layout.group_size;
        CpuBackend {
            kv: match model.kv_dtype {
                KvDtype::F32 => KvCache::F32 {
                    k: (0..arrays).map(|_| vec![0f32; per_layer]).collect(),
                    v: (0..arrays).map(|_| vec![0f32; per_layer]).collect(),
                },
                KvDtype::F16 => KvCache::F16 {
                    k: (0..arrays).map(|_| vec![F16::default(); per_layer]).collect(),
                    v: (0..arrays).map(|_| vec![F16::default(); per_layer]).collect(),
                },
            },
            layout,
            num_blocks,
            block_size,
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
            sampling: Samplers::new(base_seed),
            masks: None,
            scratch: Scratch {
                acts: qmatmul::QActs::default(),
                isa: qmatmul::Isa::detect(),
                half_isa: hmatmul::HIsa::detect(),
            },
            ws: Workspace::default(),
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

    /// Logits of every sampling sequence (`[logits_indices.len()][vocab]`), copied out.
    /// The model the backend runs.
    pub fn model(&self) -> &CpuModel {
        &self.model
    }

    /// The KV layout the scheduler must be configured with (`SchedulerConfig::kv_groups` from
    /// [`crate::model::config::ModelConfig::kv_layout`]).
    pub fn kv_layout(&self) -> &crate::model::config::KvLayout {
        &self.layout
    }

    /// A batch must carry one table and one slot per token for each of the cache's groups, and
    /// name only blocks and slots the cache has.
    fn check_batch(&self, b: &ScheduledBatch) -> anyhow::Result<()> {
        let want = self.layout.groups.len();
        anyhow::ensure!(
            b.kv_groups() == want && b.slot_mapping.len() == b.num_tokens() * want,
            "the batch has {} KV layer group(s) and {} slots for {} tokens; {}'s cache has {want} group(s) \
             (the scheduler's kv_groups must come from the model's kv_layout)",
            b.kv_groups(),
            b.slot_mapping.len(),
            b.num_tokens(),
            self.model.cfg.arch
        );
        // Out-of-range blocks or slots would panic a worker thread mid-step (taking a server
        // down with it) or write another sequence's cache: an error instead. The scheduler
        // never makes them; a hand-built or corrupted batch might.
        let seqs = b.query_start_loc.len().saturating_sub(1);
        anyhow::ensure!(
            b.block_size == self.block_size,
            "the batch's block size is {}, the cache's {}",
            b.block_size,
            self.block_size
        );
        anyhow::ensure!(
            b.block_tables.len() == seqs * b.max_blocks_per_seq * want,
            "the batch has {} block-table entries for {seqs} sequences of {} blocks in {want} group(s)",
            b.block_tables.len(),
            b.max_blocks_per_seq
        );
        if let Some(&bad) = b.block_tables.iter().find(|&&x| x as usize >= self.num_blocks) {
            anyhow::bail!("the batch names block {bad}; the cache has {}", self.num_blocks);
        }
        let slots = self.num_blocks * self.block_size;
        // `u32::MAX` is a padding token's slot: nothing is written for it.
        if let Some(&bad) = b.slot_mapping.iter().find(|&&x| x != u32::MAX && x as usize >= slots) {
            anyhow::bail!("the batch writes slot {bad}; the cache has {slots}");
        }
        Ok(())
    }

    /// # Panics
    /// If the batch's KV groups are not the model's (see [`Self::kv_layout`]), or it names
    /// blocks or slots the cache does not have.
    pub fn forward(&mut self, b: &ScheduledBatch) -> Vec<f32> {
        if let Err(e) = self.check_batch(b) {
            panic!("{e}");
        }
        self.run_forward(b);
        self.ws.bufs[Buf::Logits as usize][..self.ws.rows[Buf::Logits as usize] * self.model.cfg.vocab_size].to_vec()
    }

    /// One forward pass; the logits stay in the workspace ([`Buf::Logits`]), whose memory is
    /// kept from step to step (a fresh buffer each step cost page faults and a memset of
    /// about a fifth of the time after the pass).
    fn run_forward(&mut self, b: &ScheduledBatch) {
        // The whole pass runs on one of the pool's threads: a parallel loop started from a
        // thread outside the pool pays a cross-thread hand-off and a blocking wait, and a step
        // starts about ten per layer.
        let (pool, model) = (self.pool.clone(), self.model.clone());
        pool.install(|| match llama::forward(self, &model.cfg, b) {
            Ok(()) => {}
            Err(never) => match never {},
        });
    }

    /// Width of a buffer's rows.
    fn width(&self, b: Buf) -> usize {
        b.width(&self.model.cfg)
    }

    /// Gives `b` `rows` rows (its memory only grows, so steady steps allocate nothing).
    fn set_rows(&mut self, b: Buf, rows: usize) {
        let n = rows * self.width(b);
        self.ws.rows[b as usize] = rows;
        self.ws.bufs[b as usize].resize(n, 0.0);
    }

    /// Takes a buffer out of the workspace (so another can be borrowed beside it); give it
    /// back with [`Self::put`].
    fn take(&mut self, b: Buf) -> Vec<f32> {
        std::mem::take(&mut self.ws.bufs[b as usize])
    }

    fn put(&mut self, b: Buf, v: Vec<f32>) {
        self.ws.bufs[b as usize] = v;
    }
}

impl CpuBackend {
    /// `out = act(gate) * up` row by row for `x = [gate | up]`, with `row` the gated row.
    fn gated(&mut self, x: Buf, out: Buf, row: fn(&[f32], &mut [f32])) {
        let (w, mut o) = (self.width(out), self.take(out));
        o.par_chunks_mut(w).zip(self.ws.bufs[x as usize].par_chunks(2 * w)).for_each(|(o, g)| row(g, o));
        self.put(out, o);
    }
}

/// The step's activations by [`Buf`], kept from step to step.
#[derive(Debug, Default)]
struct Workspace {
    bufs: [Vec<f32>; Buf::ALL.len()],
    rows: [usize; Buf::ALL.len()],
}

/// The CPU's ops: host vectors, the packed-weight products, kernels-gpu's row math, and the
/// tiled attention. None fails.
impl LayerOps for CpuBackend {
    type Error = std::convert::Infallible;

    fn begin(&mut self, b: &ScheduledBatch) -> Result<(), Self::Error> {
        assert!(b.max_seq_len as usize <= self.model.max_pos, "position beyond the rotary table");
        let (n, s) = (b.num_tokens(), b.logits_indices.len());
        for buf in Buf::ALL {
            self.set_rows(buf, if matches!(buf, Buf::Sel | Buf::Logits) { s } else { n });
        }
        Ok(())
    }

    fn embedding(&mut self, b: &ScheduledBatch, out: Buf) -> Result<(), Self::Error> {
        let (h, mut o) = (self.width(out), self.take(out));
        let embed = &self.model.w.embed;
        o.par_chunks_mut(h).zip(&b.input_ids).for_each(|(row, &id)| embed.row(id as usize, row));
        self.put(out, o);
        Ok(())
    }

    fn rms_norm(&mut self, x: Buf, w: Norm, out: Buf) -> Result<(), Self::Error> {
        let rows = self.ws.rows[x as usize];
        self.set_rows(out, rows);
        let (h, mut o) = (self.width(out), self.take(out));
        let (m, xs) = (&*self.model, &self.ws.bufs[x as usize]);
        let wv = match w {
            Norm::Attn(l) => &m.w.layers[l].attn_norm,
            Norm::Ffn(l) => &m.w.layers[l].ffn_norm,
            Norm::Final => &m.w.final_norm,
            Norm::PostAttn(l) => &m.w.layers[l].post_norms.as_ref().expect("a layer with post-norms").0,
            Norm::PostFfn(l) => &m.w.layers[l].post_norms.as_ref().expect("a layer with post-norms").1,
            Norm::Q(_) | Norm::K(_) => unreachable!("head norms run inside split_rope"),
        };
        o.par_chunks_mut(h).zip(xs.par_chunks(h)).for_each(|(o, xr)| rms_norm_row(xr, wv, m.cfg.rms_eps, o));
        self.put(out, o);
        Ok(())
    }

    fn matmul(&mut self, x: Buf, w: Weight, out: Buf, accumulate: bool) -> Result<(), Self::Error> {
        let n = self.ws.rows[x as usize];
        if !accumulate {
            self.set_rows(out, n);
        }
        debug_assert_eq!(self.ws.rows[out as usize], n);
        let mut o = self.take(out);
        // A handle of its own, so the weights stay borrowed while `scratch` is mutated.
        let model = self.model.clone();
        let lin = match w {
            Weight::Qkv(l) => &model.w.layers[l].qkv,
            Weight::Wo(l) => &model.w.layers[l].wo,
            Weight::GateUp(l) => &model.w.layers[l].gate_up,
            Weight::Down(l) => &model.w.layers[l].down,
            Weight::LmHead => model.w.lm_head.as_ref().unwrap_or(&model.w.embed),
        };
        let xs = &self.ws.bufs[x as usize][..n * lin.in_dim];
        matmul(xs, n, lin, &mut o[..n * lin.out_dim], accumulate, self.threads, &mut self.scratch);
        self.put(out, o);
        Ok(())
    }

    fn add_bias(&mut self, x: Buf, bias: Bias) -> Result<(), Self::Error> {
        let (w, rows) = (self.width(x), self.ws.rows[x as usize]);
        let m = &*self.model;
        let bv = match bias {
            Bias::Qkv(l) => m.w.layers[l].qkv_bias.as_deref().expect("a layer with a Q/K/V bias"),
        };
        debug_assert_eq!(bv.len(), w);
        self.ws.bufs[x as usize][..rows * w].par_chunks_mut(w).for_each(|row| {
            for (v, &b) in row.iter_mut().zip(bv) {
                *v += b;
            }
        });
        Ok(())
    }

    fn scale(&mut self, x: Buf, s: f32) -> Result<(), Self::Error> {
        let n = self.ws.rows[x as usize] * self.width(x);
        self.ws.bufs[x as usize][..n].par_iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn add(&mut self, x: Buf, y: Buf) -> Result<(), Self::Error> {
        let n = self.ws.rows[x as usize] * self.width(x);
        debug_assert_eq!(self.width(x), self.width(y));
        let ys = self.take(y);
        self.ws.bufs[x as usize][..n].par_iter_mut().zip(&ys[..n]).for_each(|(a, &b)| *a += b);
        self.put(y, ys);
        Ok(())
    }

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
    ) -> Result<(), Self::Error> {
        let (mut qb, mut kb, mut vb) = (self.take(q), self.take(k), self.take(v));
        let (m, src) = (&*self.model, &self.ws.bufs[qkv as usize]);
        let c = &m.cfg;
        let (qd, kvd, d) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let table = match rotary {
            Rotary::Global => &m.cos_sin,
            Rotary::Local => &m.cos_sin_local,
        };
        let norms = head_norms.map(|(nq, nk)| {
            let (Norm::Q(l), Norm::K(lk)) = (nq, nk) else { unreachable!("head norms are Q's and K's") };
            debug_assert_eq!(l, lk);
            let (wq, wk) = m.w.layers[l].qk_norm.as_ref().expect("a layer with Q/K norms");
            (wq.as_slice(), wk.as_slice())
        });
        qb.par_chunks_mut(qd)
            .zip(kb.par_chunks_mut(kvd))
            .zip(vb.par_chunks_mut(kvd))
            .zip(src.par_chunks(qd + 2 * kvd))
            .zip(&b.positions)
            .for_each(|((((qr, kr), vr), src), &pos)| {
                qr.copy_from_slice(&src[..qd]);
                kr.copy_from_slice(&src[qd..qd + kvd]);
                vr.copy_from_slice(&src[qd + kvd..]);
                if let Some((wq, wk)) = norms {
                    for head in qr.chunks_mut(d) {
                        rms_norm_row_in_place(head, wq, c.rms_eps);
                    }
                    for head in kr.chunks_mut(d) {
                        rms_norm_row_in_place(head, wk, c.rms_eps);
                    }
                }
                let cs = &table[pos as usize * c.rot_dim..(pos as usize + 1) * c.rot_dim];
                for head in qr.chunks_mut(d).chain(kr.chunks_mut(d)) {
                    rope_head(head, cs, c.rot_dim, c.rope_layout);
                }
            });
        self.put(q, qb);
        self.put(k, kb);
        self.put(v, vb);
        Ok(())
    }

    fn reshape_and_cache(&mut self, b: &ScheduledBatch, layer: usize, k: Buf, v: Buf) -> Result<(), Self::Error> {
        let shape = AttnShape { max_blocks_per_seq: b.max_blocks_per_seq as u32, ..self.shape };
        let (kr, vr) = (&self.ws.bufs[k as usize], &self.ws.bufs[v as usize]);
        let (group, j) = self.layout.layer[layer];
        let slots = b.group_slot_mapping(group);
        match &mut self.kv {
            KvCache::F32 { k: kc, v: vc } => reshape_and_cache_host(&shape, kr, vr, slots, &mut kc[j], &mut vc[j]),
            KvCache::F16 { k: kc, v: vc } => {
                let (k16, v16) = &mut self.kv16;
                k16.clear();
                k16.extend(kr.iter().map(|&x| F16::from_f32(x)));
                v16.clear();
                v16.extend(vr.iter().map(|&x| F16::from_f32(x)));
                reshape_and_cache_host(&shape, k16, v16, slots, &mut kc[j], &mut vc[j]);
            }
        }
        Ok(())
    }

    fn paged_attention(
        &mut self,
        b: &ScheduledBatch,
        layer: usize,
        q: Buf,
        out: Buf,
        window: Option<usize>,
    ) -> Result<(), Self::Error> {
        let shape = AttnShape { max_blocks_per_seq: b.max_blocks_per_seq as u32, ..self.shape };
        let mut o = self.take(out);
        let (qs, simd) = (&self.ws.bufs[q as usize], self.simd);
        let (group, j) = self.layout.layer[layer];
        match &self.kv {
            KvCache::F32 { k, v } => attention::attend(&shape, b, group, qs, &k[j], &v[j], &mut o, simd, window),
            KvCache::F16 { k, v } => attention::attend(&shape, b, group, qs, &k[j], &v[j], &mut o, simd, window),
        }
        self.put(out, o);
        Ok(())
    }

    fn silu_and_mul(&mut self, x: Buf, out: Buf) -> Result<(), Self::Error> {
        self.gated(x, out, silu_and_mul_row);
        Ok(())
    }

    fn gelu_and_mul(&mut self, x: Buf, out: Buf) -> Result<(), Self::Error> {
        self.gated(x, out, gelu_and_mul_row);
        Ok(())
    }

    fn gather_sampled(&mut self, b: &ScheduledBatch, x: Buf, out: Buf) -> Result<(), Self::Error> {
        let s = b.logits_indices.len();
        let (h, mut o) = (self.width(out), self.take(out));
        let xs = &self.ws.bufs[x as usize];
        for (row, &i) in o.chunks_mut(h).zip(&b.logits_indices) {
            row.copy_from_slice(&xs[i as usize * h..(i as usize + 1) * h]);
        }
        self.put(out, o);
        self.ws.rows[out as usize] = s;
        Ok(())
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
        self.sampling.add(id, params);
    }
    fn remove_request(&mut self, id: RequestId) {
        self.sampling.remove(id);
    }
    fn applies_masks(&self) -> bool {
        true
    }
    fn set_masks(&mut self, masks: Option<Arc<crate::structured::masks::StepMasks>>) {
        self.masks = masks;
    }
    fn execute(&mut self, batch: &ScheduledBatch) -> anyhow::Result<StepResult> {
        self.check_batch(batch)?;
        let (sampled, logprobs, phases) = self.forward_and_sample(batch);
        Ok(StepResult { output: StepOutput { sampled }, duration_s: None, logprobs, phases: Some(phases) })
    }
}

impl CpuBackend {
    /// The pass, then each sampling row's token (and logprobs), with the two phases' times.
    fn forward_and_sample(&mut self, batch: &ScheduledBatch) -> (Vec<u32>, Vec<Option<TokenLogprobs>>, Phases) {
        let t_forward = std::time::Instant::now();
        self.run_forward(batch);
        let forward = t_forward.elapsed().as_secs_f64();
        // Out of the workspace while the sampler state is borrowed; back in below.
        let mut logits = std::mem::take(&mut self.ws.bufs[Buf::Logits as usize]);
        let rows = self.ws.rows[Buf::Logits as usize];
        let t_sample = std::time::Instant::now();
        let vocab = self.model.cfg.vocab_size;
        let ids: Vec<RequestId> = batch.sampling_request_ids().collect();
        if let Some(m) = &self.masks {
            // Guided rows: what the grammar forbids cannot be sampled (nor is in the logprobs).
            for (i, row) in logits[..rows * vocab].chunks_mut(vocab).enumerate() {
                m.apply(i, row);
            }
        }
        let (sampled, logprobs) = self.sampling.sample_rows(&mut logits[..rows * vocab], vocab, &ids);
        self.ws.bufs[Buf::Logits as usize] = logits;
        let phases = Phases { forward, sample: t_sample.elapsed().as_secs_f64(), ..Default::default() };
        (sampled, logprobs, phases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Backend;

    /// A batch naming blocks or slots past the cache, or another block size, is an error
    /// that says so; the same batch in range runs.
    #[test]
    fn out_of_range_batches_are_errors_not_panics() {
        let model = Arc::new(crate::model::dummy::tiny_model(1, 3, 64));
        let mut be = CpuBackend::new(model, 4, 16, 1, 0);
        let good = crate::study::logits::one_sequence_step(&[1, 2, 3], 0, 16);
        assert!(be.execute(&good).is_ok());
        let mut far = good.clone();
        far.block_tables[0] = 4;
        let e = be.execute(&far).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("block 4") && e.contains("has 4"), "{e}");
        let mut slot = good.clone();
        slot.slot_mapping[2] = 64;
        let e = be.execute(&slot).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("slot 64"), "{e}");
        let mut bs = good;
        bs.block_size = 8;
        let e = be.execute(&bs).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("block size is 8"), "{e}");
    }
}
