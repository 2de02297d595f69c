//! The CUDA model backend: `model::llama`'s pass on device buffers.
//!
//! - Weights in bf16 (or f16, `--dtype float16`) on the device, uploaded once: each matrix is
//!   widened on the host from whatever the CPU model holds (GGUF quantized, f32, 16-bit) and
//!   narrowed; dummy weights are filled on the device itself.
//! - Everything runs on a [`super::Device`]: a GPU (cudarc), or the SIMT emulator
//!   (`--device emu`), which runs this same code.
//! - GEMMs through the device's GEMM (cuBLAS's `cublasGemmEx` on a GPU: bf16 in, f32
//!   accumulate; the LM head writes f32 logits). The fused Q/K/V matrix is three GEMMs over its row blocks, straight into Q, K
//!   and V, so no split kernel is needed.
//! - Everything else through weave's PTX kernels: embedding (also the gather of the sampled
//!   rows), RMSNorm, rotary, the KV write, the mixed paged attention, SiLU-and-mul, argmax.
//! - A workspace allocated once for `max_num_batched_tokens` rows; the step's metadata goes up
//!   in one copy (every array packed into one host buffer, then one device buffer), and
//!   only the sampled ids come back:
//!   greedy steps take the argmax kernel; temperature, top-k, top-p and per-request seeds the
//!   `sample_f32` kernel (`weave_kernels_gpu::sample`), which also gives each token's logprob.
//!   Only a request that asks for top alternatives has its logits row copied to the host.
//!
//! - Decode-only steps are padded to a few sizes and replayed from CUDA graphs captured on
//!   first use (`--enforce-eager` turns them off); other steps run eagerly.
//! - Per step: CUDA events give the device's busy time and the idle gap before the step;
//!   NVTX ranges mark the phases when asked for.
//!
//! Status: builds and is type-checked on machines without a GPU; it has not run on one yet
//! (issue 10's GPU proof).

use super::dev::{DBuf, DView, Event, Gemm, Graph};
use super::{AttnMeta, CudaError, Kernels};
use crate::backends::cpu::CpuModel;
use crate::engine::steplog::Phases;
use crate::engine::{Backend, StepResult};
use crate::model::config::ModelConfig;
use crate::model::llama::{self, Bias, Buf, LayerOps, Norm, Rotary, Weight};
use crate::model::weights::Linear;
use crate::sampling::{Samplers, SamplingParams};
use weave_kernels_gpu::attention::AttnShape;
use weave_kernels_gpu::{Bf16, Dtype, Elem};
use weave_scheduler::{RequestId, ScheduledBatch, StepOutput};

/// A 16-bit value as the device stores it: bf16 or f16 bits, by the backend's [`Dtype`].
type B16 = u16;

/// Runs `$body` with `$T` the kernel type of the 16-bit `$dtype` (bf16 or f16).
macro_rules! typed {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            Dtype::F16 => {
                type $T = weave_kernels_gpu::F16;
                $body
            }
            _ => {
                type $T = Bf16;
                $body
            }
        }
    };
}

fn to_16(dtype: Dtype, x: &[f32]) -> Vec<B16> {
    match dtype {
        Dtype::F16 => x.iter().map(|&v| weave_kernels_gpu::F16::from_f32(v).0).collect(),
        _ => x.iter().map(|&v| Bf16::from_f32(v).0).collect(),
    }
}

/// A weight matrix `[out_dim][in_dim]` in bf16 on the device.
#[derive(Debug)]
struct DevLinear {
    w: DBuf<B16>,
    out_dim: usize,
    in_dim: usize,
}

impl DevLinear {
    fn upload(k: &Kernels, l: &Linear, dtype: Dtype) -> Result<DevLinear, CudaError> {
        use crate::model::half::HKind;
        use crate::model::weights::LinearData;
        match &l.data {
            // In the device's type already: the bits as they are.
            LinearData::Half(h) if matches!((h.kind, dtype), (HKind::Bf16, Dtype::Bf16) | (HKind::F16, Dtype::F16)) => {
                return Ok(DevLinear { w: k.upload(&h.bits)?, out_dim: l.out_dim, in_dim: l.in_dim });
            }
            // Dummy weights: filled on the device, the same values the host would make.
            LinearData::Dummy { seed, scale } => {
                let mut w = k.zeros::<B16>(l.out_dim * l.in_dim)?;
                typed!(dtype, T => k.fill_dummy::<T>(&mut w, *seed, *scale))?;
                return Ok(DevLinear { w, out_dim: l.out_dim, in_dim: l.in_dim });
            }
            _ => {}
        }
        let mut row = vec![0f32; l.in_dim];
        let mut bits = Vec::with_capacity(l.out_dim * l.in_dim);
        for r in 0..l.out_dim {
            l.row(r, &mut row);
            bits.extend(to_16(dtype, &row));
        }
        Ok(DevLinear { w: k.upload(&bits)?, out_dim: l.out_dim, in_dim: l.in_dim })
    }

    fn bytes(&self) -> usize {
        2 * self.out_dim * self.in_dim
    }
}

#[derive(Debug)]
struct DevLayer {
    attn_norm: DBuf<f32>,
    qkv: DevLinear,
    wo: DevLinear,
    ffn_norm: DBuf<f32>,
    gate_up: DevLinear,
    down: DevLinear,
}

/// Sizes the backend is built for.
#[derive(Debug, Clone, Copy)]
pub struct CudaLimits {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    /// Fraction of the device's memory weave may use (vLLM's `--gpu-memory-utilization`).
    pub gpu_memory_utilization: f64,
    /// Run every step eagerly: no CUDA graphs (vLLM's `--enforce-eager`).
    pub enforce_eager: bool,
    /// An NVTX range around each layer of eager steps (`--profile-layers`).
    pub profile_layers: bool,
    /// Weights' and activations' type: bf16 (vLLM's `auto` for these models) or f16.
    pub dtype: Dtype,
}

/// The padded batch sizes decode steps are captured for: 1, 2, 4, 8, then steps of 8 up to
/// `max` (vLLM's list), and `max` itself.
pub fn graph_sizes(max: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [1, 2, 4].into_iter().chain((1..).map(|i| 8 * i)).take_while(|&n| n <= max).collect();
    if max > 0 && v.last() != Some(&max) {
        v.push(max);
    }
    v
}

/// Whether every sequence of `b` brings one token and every token is sampled: a decode-only
/// step, whose shape a CUDA graph captures once per padded size.
pub fn is_decode_only(b: &ScheduledBatch) -> bool {
    let n = b.num_tokens();
    n > 0
        && b.query_start_loc.len() == n + 1
        && b.query_start_loc.windows(2).all(|w| w[1] == w[0] + 1)
        && b.logits_indices.len() == n
        && b.logits_indices.iter().enumerate().all(|(i, &x)| x as usize == i)
}

/// `b` (decode-only) padded to `size` rows for a graph: block tables at the fixed `stride`,
/// and padding rows that read the null block and write nothing (slot `u32::MAX`).
pub fn pad_decode(b: &ScheduledBatch, size: usize, stride: usize) -> ScheduledBatch {
    let n = b.num_tokens();
    assert!(n <= size && b.max_blocks_per_seq <= stride, "a graph is padded up, never down");
    let pad = |v: &[u32], fill: u32| v.iter().copied().chain(std::iter::repeat(fill)).take(size).collect::<Vec<_>>();
    let mut tables = vec![0u32; size * stride];
    for (i, row) in b.block_tables.chunks(b.max_blocks_per_seq.max(1)).take(n).enumerate() {
        tables[i * stride..i * stride + row.len()].copy_from_slice(row);
    }
    ScheduledBatch {
        step: b.step,
        input_ids: pad(&b.input_ids, 0),
        positions: pad(&b.positions, 0),
        query_start_loc: (0..=size as u32).collect(),
        seq_lens: pad(&b.seq_lens, 1),
        context_lens: pad(&b.context_lens, 0),
        block_tables: tables,
        max_blocks_per_seq: stride,
        block_size: b.block_size,
        slot_mapping: pad(&b.slot_mapping, u32::MAX),
        logits_indices: (0..size as u32).collect(),
        num_decode_tokens: size,
        max_query_len: 1,
        max_seq_len: (stride * b.block_size) as u32,
        ..Default::default()
    }
}

/// The step's metadata on the device, each array sized for the largest step.
#[derive(Debug)]
struct Meta {
    /// Every metadata array of the step, packed in the order of [`MetaArray`], written by one
    /// copy a step. A graph's padded steps of one size have one layout, so its kernels'
    /// pointers stay valid from replay to replay.
    all: DBuf<u32>,
    /// The host side of that copy, kept from step to step.
    staging: Vec<u32>,
    /// `(offset, len)` of each array in `all` for the current step.
    at: [(usize, usize); MetaArray::COUNT],
    /// The sampled token of each row (argmax or the device sampler's draw).
    argmax: DBuf<u32>,
    /// The sampler's parameters, `PARAM_WORDS` a row, and the sampled tokens' logprobs.
    sample_params: DBuf<u32>,
    logprob: DBuf<f32>,
    /// Structured outputs: each sampling row's place among the step's token masks, and the
    /// masks (made at the first step with a guided row: most servers never need them).
    mask_rows: DBuf<u32>,
    masks: Option<DBuf<u32>>,
}

/// A step's metadata arrays, in their order in `Meta::all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaArray {
    Ids,
    Positions,
    Slots,
    Tables,
    ContextLens,
    Qsl,
    Tiles,
    /// The tensor-core kernel's tiles (prefill chunks), when it runs.
    TilesMma,
    LogitsIndices,
}

impl MetaArray {
    const COUNT: usize = 9;
}

/// Packs `arrays` back to back into `host` (an empty one keeps one slot, so that each has an
/// address), writing each one's `(offset, len)` into `at`; returns the words used.
fn pack_meta(
    arrays: &[&[u32]; MetaArray::COUNT],
    host: &mut [u32],
    at: &mut [(usize, usize); MetaArray::COUNT],
) -> Result<usize, CudaError> {
    let mut off = 0;
    for (i, a) in arrays.iter().enumerate() {
        if off + a.len().max(1) > host.len() {
            return Err(CudaError::Shape("step metadata larger than the backend was built for"));
        }
        host[off..off + a.len()].copy_from_slice(a);
        at[i] = (off, a.len());
        off += a.len().max(1);
    }
    Ok(off)
}

impl Meta {
    /// Array `a` of the current step on the device.
    fn view(&self, a: MetaArray) -> DView<'_, u32> {
        let (off, len) = self.at[a as usize];
        self.all.slice(off..off + len.max(1))
    }
}

/// The model on one GPU.
#[derive(Debug)]
pub struct CudaBackend {
    k: Kernels,
    /// Shared so that a pass can borrow it beside the backend (`llama::forward`).
    cfg: std::sync::Arc<ModelConfig>,
    limits: CudaLimits,
    embed: DBuf<B16>,
    layers: Vec<DevLayer>,
    final_norm: DBuf<f32>,
    /// `None` when tied to the embedding.
    lm_head: Option<DevLinear>,
    cos_sin: DBuf<f32>,
    kv: Vec<(DBuf<B16>, DBuf<B16>)>,
    num_blocks: usize,
    shape: AttnShape,
    /// Activations by [`Buf`] (all but the logits), bf16.
    ws: Vec<DBuf<B16>>,
    logits: DBuf<f32>,
    partials: DBuf<f32>,
    rows: [usize; Buf::ALL.len()],
    meta: Meta,
    num_tiles: usize,
    num_tiles_mma: usize,
    max_seq_len: u32,
    weight_bytes: usize,
    sampling: Samplers,
    /// Rows (split x token) of attention partials `partials` holds.
    partial_rows: usize,
    /// Captured decode steps by padded size; `graph_sizes` is empty when eager.
    graphs: Graphs,
    graph_sizes: Vec<usize>,
    /// The previous step's last event, for the idle gap before the next step.
    last_end: Option<Event>,
    /// The step's structured-output masks, by sampling row.
    masks: Option<std::sync::Arc<crate::structured::masks::StepMasks>>,
    /// The attention kernel the steps use (`WEAVE_ATTN_KERNEL`).
    attn_kernel: super::AttnKernel,
}

/// Captured graphs by padded batch size.
#[derive(Default)]
struct Graphs(std::collections::HashMap<usize, Box<dyn Graph>>);

// SAFETY: a graph is launched only through `&mut CudaBackend`, so from one thread at a time,
// and `CudaGraph::launch` binds the context to the calling thread first. The backend moves to
// a server's engine thread once, before any launch.
unsafe impl Send for Graphs {}

impl std::fmt::Debug for Graphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Two distinct elements of `v`: `(&mut v[a], &v[b])`.
fn pair<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &T) {
    assert_ne!(a, b, "an op's input and output are distinct buffers");
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &lo[b])
    }
}

impl CudaBackend {
    /// Uploads `model`'s weights, allocates the workspace, and gives the KV cache what is left
    /// of `gpu_memory_utilization` of the device's memory. The number of KV blocks it holds
    /// (the null block included) is [`Self::num_blocks`].
    pub fn new(k: Kernels, model: &CpuModel, limits: CudaLimits, base_seed: u64) -> Result<CudaBackend, CudaError> {
        let c = model.cfg.clone();
        // Biases, head norms, post-norms, GELU and windows have no kernels yet: refused here
        // by name, not run wrong. (Rotary divisors need none: they are in the host's table,
        // uploaded below.)
        if !c.deltas.cuda_ready() {
            return Err(CudaError::UnsupportedModel(format!(
                "architecture {} ({}) runs on the CPU backend only for now (--device cpu)",
                c.arch,
                c.deltas.describe()
            )));
        }
        let shape = c.attn_shape(limits.block_size);
        shape.check().map_err(CudaError::Shape)?;
        let w = &model.w;
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(c.num_layers);
        // The upload's progress (stderr, and only on a terminal): an 8B model's 16 GB take a
        // while to widen and narrow on the host, or to fill on the device.
        let bar = indicatif::ProgressBar::new(c.num_layers as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("weights to the device: {bar:30} {pos}/{len} layers {msg}")
                .expect("valid template"),
        );
        for l in &w.layers {
            let layer = DevLayer {
                attn_norm: k.upload(&l.attn_norm)?,
                qkv: DevLinear::upload(&k, &l.qkv, limits.dtype)?,
                wo: DevLinear::upload(&k, &l.wo, limits.dtype)?,
                ffn_norm: k.upload(&l.ffn_norm)?,
                gate_up: DevLinear::upload(&k, &l.gate_up, limits.dtype)?,
                down: DevLinear::upload(&k, &l.down, limits.dtype)?,
            };
            weight_bytes += layer.qkv.bytes() + layer.wo.bytes() + layer.gate_up.bytes() + layer.down.bytes();
            layers.push(layer);
            bar.inc(1);
            bar.set_message(format!("{:.2} GiB", weight_bytes as f64 / (1u64 << 30) as f64));
        }
        bar.finish_and_clear();
        let embed = DevLinear::upload(&k, &w.embed, limits.dtype)?;
        weight_bytes += embed.bytes();
        let lm_head = w.lm_head.as_ref().map(|l| DevLinear::upload(&k, l, limits.dtype)).transpose()?;
        weight_bytes += lm_head.as_ref().map_or(0, DevLinear::bytes);
        let cos_sin = model.cos_sin(limits.max_model_len.min(c.context_length));
        let n = limits.max_num_batched_tokens;
        let s = limits.max_num_seqs;
        let width = |b: Buf| b.width(&c);
        let ws = Buf::ALL
            .iter()
            // Logits have their own f32 buffer; `O` serves post-norms, which this backend
            // refuses (`new`'s check above).
            .map(|&b| k.zeros::<B16>(if matches!(b, Buf::Logits | Buf::O) { 1 } else { n.max(s) * width(b) }))
            .collect::<Result<Vec<_>, _>>()?;
        let max_blocks_per_seq = limits.max_model_len.div_ceil(limits.block_size);
        let rows = n.max(s);
        // The largest each array gets, plus one slot each (an empty array keeps one).
        let meta_cap = 3 * rows
            + s * max_blocks_per_seq
            + s
            + (s + 1)
            + 2 * (rows + s)
            + 2 * (rows / weave_kernels_gpu::attention::MMA_TILE_TOKENS as usize + s + 1)
            + s
            + MetaArray::COUNT;
        let meta = Meta {
            all: k.zeros(meta_cap)?,
            staging: vec![0; meta_cap],
            at: [(0, 0); MetaArray::COUNT],
            argmax: k.zeros(s)?,
            sample_params: k.zeros(s * weave_kernels_gpu::sample::PARAM_WORDS)?,
            logprob: k.zeros(s)?,
            mask_rows: k.zeros(s)?,
            masks: None,
        };
        let logits = k.zeros::<f32>(s * c.vocab_size)?;
        // Split-KV decode's partial rows, for the largest split the choice can make.
        let partial_rows =
            weave_kernels_gpu::attention::split_rows_bound(s as u32, shape.num_kv_heads, k.num_sms) as usize;
        let partials = k.zeros::<f32>(partial_rows * shape.num_q_heads as usize * shape.partial_stride())?;
        // One block a layer for the profiling pass below; the real cache replaces it.
        let one_block = limits.block_size * c.kv_dim();
        let kv = (0..c.num_layers)
            .map(|_| Ok((k.zeros::<B16>(one_block)?, k.zeros::<B16>(one_block)?)))
            .collect::<Result<Vec<_>, CudaError>>()?;
        let num_blocks = 1;
        let mut be = CudaBackend {
            cos_sin: k.upload(cos_sin)?,
            final_norm: k.upload(&w.final_norm)?,
            embed: embed.w,
            k,
            cfg: std::sync::Arc::new(c),
            limits,
            layers,
            lm_head,
            kv,
            num_blocks,
            shape,
            ws,
            logits,
            partials,
            rows: [0; Buf::ALL.len()],
            meta,
            num_tiles: 0,
            num_tiles_mma: 0,
            max_seq_len: 0,
            weight_bytes,
            sampling: Samplers::new(base_seed),
            partial_rows,
            graphs: Default::default(),
            graph_sizes: if limits.enforce_eager {
                Vec::new()
            } else {
                graph_sizes(limits.max_num_seqs.min(limits.max_num_batched_tokens).min(512))
            },
            last_end: None,
            masks: None,
            attn_kernel: super::AttnKernel::from_env(),
        };
        // vLLM's rule: one forward pass at the largest step first, so that whatever the
        // step's launches allocate (cuBLAS's workspaces) is counted; then the KV cache gets
        // what `gpu_memory_utilization` leaves. A failed pass is reported, not fatal: the
        // workspace above is most of the peak, as no op of weave's allocates.
        if let Err(e) = be.profile_pass() {
            eprintln!("weave: the memory profiling pass failed ({e}); sizing the KV cache from the allocations alone");
        }
        be.kv.clear();
        be.k.sync()?;
        let (free, total) = be.k.dev.mem_info()?;
        let used = total - free;
        let budget = (total as f64 * limits.gpu_memory_utilization) as usize;
        let per_block = limits.block_size * kv_bytes_per_token(&be.cfg);
        let num_blocks = budget.saturating_sub(used) / per_block;
        if num_blocks < 2 {
            return Err(CudaError::Memory(format!(
                "no room for the KV cache: weights and workspace use {:.1} GiB of {:.1} GiB, and --gpu-memory-utilization {} allows {:.1} GiB",
                used as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64,
                limits.gpu_memory_utilization,
                budget as f64 / (1u64 << 30) as f64
            )));
        }
        let per_layer = num_blocks * limits.block_size * be.cfg.kv_dim();
        be.kv = (0..be.cfg.num_layers)
            .map(|_| Ok((be.k.zeros::<B16>(per_layer)?, be.k.zeros::<B16>(per_layer)?)))
            .collect::<Result<Vec<_>, CudaError>>()?;
        be.num_blocks = num_blocks;
        Ok(be)
    }

    /// One eager forward pass at `max_num_batched_tokens` tokens (sequences of up to 256
    /// tokens from position 0, as many as `max_num_seqs` allows, each sampled): the largest
    /// step's launches, so that their allocations show in the free memory after it. The KV
    /// cache is one block a layer then: every table entry is the null block, and no token is
    /// written (slot `u32::MAX`).
    fn profile_pass(&mut self) -> Result<(), CudaError> {
        let b = profile_batch(&self.limits, self.cfg.context_length)?;
        self.forward_eager(&b)?;
        self.k.sync()
    }

    /// The device's copy bandwidth and GEMM rate, measured now.
    pub fn ceilings(&self) -> Result<super::roofline::Ceilings, CudaError> {
        super::roofline::measure(&self.k)
    }

    /// The attention kernel the steps use from now on (`WEAVE_ATTN_KERNEL` picks the first).
    pub fn set_attn_kernel(&mut self, kind: super::AttnKernel) {
        self.attn_kernel = kind;
    }

    /// The longest request (prompt and output) the backend was built for.
    pub fn max_model_len(&self) -> usize {
        self.limits.max_model_len
    }

    /// Bytes of KV cache a token takes (16-bit K and V in every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        kv_bytes_per_token(&self.cfg)
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// KV blocks in the device cache, the null block included.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// One line like vLLM's: the device, the bytes of weights, and the KV cache's size and
    /// what it holds.
    pub fn describe(&self) -> String {
        let tokens = (self.num_blocks - 1) * self.limits.block_size;
        let kv_bytes = self.num_blocks * self.limits.block_size * self.kv_bytes_per_token();
        format!(
            "{} ({}): weights {:.2} GiB in {}; KV cache {} blocks, {:.2} GiB, {} tokens: {:.1}x concurrency at {} tokens a request",
            self.k.name,
            self.k.arch,
            self.weight_bytes as f64 / (1u64 << 30) as f64,
            self.limits.dtype.name(),
            self.num_blocks - 1,
            kv_bytes as f64 / (1u64 << 30) as f64,
            tokens,
            tokens as f64 / self.limits.max_model_len as f64,
            self.limits.max_model_len
        )
    }

    /// `out (+)= x * w^T` for `n` rows (the device's GEMM: cuBLAS on a GPU). The pointers
    /// are device addresses (an offset into `w` picks a block of its rows); `c_f32` writes f32
    /// (the logits).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: u64,
        w: u64,
        c: u64,
        n: usize,
        out_dim: usize,
        in_dim: usize,
        accumulate: bool,
        c_f32: bool,
    ) -> Result<(), CudaError> {
        let dtype = self.limits.dtype;
        self.k.dev.gemm(&Gemm { x, w, c, n, out_dim, in_dim, accumulate, c_f32, dtype })
    }
}

impl CudaBackend {
    /// Checks `b` against the backend's limits and sends its metadata to the device in one
    /// copy from the staging buffer, before the step's kernels (and outside a
    /// graph capture). Picks the attention tiles, and the split-KV choice for a decode-only
    /// step.
    fn upload_meta(&mut self, b: &ScheduledBatch) -> Result<(), CudaError> {
        let (n, s) = (b.num_tokens(), b.logits_indices.len());
        let l = &self.limits;
        if n > l.max_num_batched_tokens.max(l.max_num_seqs) || b.seqs.len() > l.max_num_seqs || s > l.max_num_seqs {
            return Err(CudaError::Shape("step larger than the backend was built for"));
        }
        let tq = self.shape.tokens_per_tile();
        // With the tensor-core kernel, it takes the chunks' rows and a CUDA-core one the rest.
        let (tiles, tiles_mma) =
            self.attn_kernel.tiles(self.limits.dtype, self.shape.block_size, &b.query_start_loc, tq);
        self.num_tiles = tiles.len() / 2;
        self.num_tiles_mma = tiles_mma.len() / 2;
        self.max_seq_len = b.max_seq_len;
        self.shape.max_blocks_per_seq = b.max_blocks_per_seq as u32;
        // Flash-decoding: a decode-only step too small to fill the device splits its rows'
        // KV; a step with prefill rows has tiles enough.
        self.shape.blocks_per_split = 0;
        if is_decode_only(b) {
            let max_blocks = b.max_seq_len.div_ceil(self.shape.block_size);
            // The decode kernel's thread blocks are per query head, the others' per KV head.
            let heads =
                if self.attn_kernel.decode_rows(self.limits.dtype, self.shape.block_size) == super::AttnKernel::Fast {
                    self.shape.num_q_heads
                } else {
                    self.shape.num_kv_heads
                };
            let bps =
                weave_kernels_gpu::attention::choose_blocks_per_split(n as u32, heads, max_blocks, self.k.num_sms);
            let trial = AttnShape { blocks_per_split: bps, ..self.shape };
            if trial.num_splits(b.max_seq_len) as usize * n <= self.partial_rows {
                self.shape.blocks_per_split = bps;
            }
        }
        // One copy: the arrays packed into the staging buffer, in `MetaArray` order.
        let m = &mut self.meta;
        let arrays: [&[u32]; MetaArray::COUNT] = [
            &b.input_ids,
            &b.positions,
            &b.slot_mapping,
            &b.block_tables,
            &b.context_lens,
            &b.query_start_loc,
            &tiles,
            &tiles_mma,
            &b.logits_indices,
        ];
        let off = pack_meta(&arrays, &mut m.staging, &mut m.at)?;
        self.k.dev.write(&m.staging[..off], &m.all, 0)?;
        for buf in Buf::ALL {
            self.rows[buf as usize] = if matches!(buf, Buf::Sel | Buf::Logits) { s } else { n };
        }
        Ok(())
    }

    /// Block-table stride of graph steps: every request's longest table.
    fn max_blocks_fixed(&self) -> usize {
        self.limits.max_model_len.div_ceil(self.limits.block_size)
    }

    /// The padded size a graph runs `b` at, when `b` is a decode-only step graphs cover.
    fn graph_size(&self, b: &ScheduledBatch) -> Option<usize> {
        if self.graph_sizes.is_empty() || !is_decode_only(b) || b.max_blocks_per_seq > self.max_blocks_fixed() {
            return None;
        }
        self.graph_sizes.iter().copied().find(|&g| g >= b.num_tokens())
    }

    /// The forward pass of `b`: replayed from a graph for a decode-only step (captured the
    /// first time its padded size comes), eagerly otherwise. The logits of `b`'s sampled rows
    /// are rows `0..` of `self.logits` either way. Returns the time the metadata upload took.
    fn run_forward(&mut self, b: &ScheduledBatch) -> Result<f64, CudaError> {
        self.check_positions(b)?;
        let t = std::time::Instant::now();
        let Some(size) = self.graph_size(b) else {
            let range = crate::engine::nvtx::range(c"prepare");
            self.upload_meta(b)?;
            drop(range);
            let prepare = t.elapsed().as_secs_f64();
            return self.pass(b).map(|_| prepare);
        };
        let padded = pad_decode(b, size, self.max_blocks_fixed());
        let range = crate::engine::nvtx::range(c"prepare");
        self.upload_meta(&padded)?;
        drop(range);
        let prepare = t.elapsed().as_secs_f64();
        if !self.k.dev.graphs() {
            // The emulator: the padded step a graph would replay, run eagerly.
            return self.pass(&padded).map(|_| prepare);
        }
        if !self.graphs.0.contains_key(&size) {
            match self.capture(&padded) {
                Ok(g) => {
                    self.graphs.0.insert(size, g);
                }
                Err(e) => {
                    // A capture that fails leaves the step to run eagerly, and every later
                    // one: graphs are an optimisation, never a reason to fail a request.
                    eprintln!("weave: CUDA graphs off after a failed capture at batch size {size}: {e}");
                    self.graph_sizes.clear();
                    self.graphs.0.clear();
                    return self.pass(&padded).map(|_| prepare);
                }
            }
        }
        self.graphs.0[&size].launch()?;
        Ok(prepare)
    }

    /// Records the forward pass of the (padded, uploaded) `b` into a graph.
    fn capture(&mut self, b: &ScheduledBatch) -> Result<Box<dyn Graph>, CudaError> {
        self.k.dev.begin_capture()?;
        let r = self.pass(b);
        // End the capture whatever happened, so that the stream is usable again.
        let g = self.k.dev.end_capture();
        r?;
        g?.ok_or_else(|| CudaError::Graph("the capture recorded nothing".into()))
    }

    /// The device's name and arch, e.g. `NVIDIA H200 (sm_90)`.
    pub fn device_name(&self) -> String {
        format!("{} ({})", self.k.name, self.k.arch)
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The logits of `b`'s sampled rows (`[rows][vocab]`), from an eager pass: for comparing
    /// backends (`weave logits`), not for serving, which never copies logits back.
    pub fn logits_of(&mut self, b: &ScheduledBatch) -> Result<Vec<f32>, CudaError> {
        self.forward_eager(b)?;
        let n = b.logits_indices.len() * self.cfg.vocab_size;
        self.k.dev.read(self.logits.slice(0..n))
    }

    /// The model's pass over `b` through this backend's ops.
    fn pass(&mut self, b: &ScheduledBatch) -> Result<(), CudaError> {
        let c = self.cfg.clone();
        llama::forward(self, &c, b)
    }

    /// An eager pass of `b` (no graph), its logits left on the device.
    fn forward_eager(&mut self, b: &ScheduledBatch) -> Result<(), CudaError> {
        self.k.dev.bind_to_thread()?;
        self.check_positions(b)?;
        self.upload_meta(b)?;
        self.pass(b)
    }

    /// Whether `b`'s positions are inside the rotary table. Checked on the real batch: a
    /// padded one's `max_seq_len` is its tables' reach, and its padding rows sit at position 0.
    fn check_positions(&self, b: &ScheduledBatch) -> Result<(), CudaError> {
        if b.max_seq_len as usize > self.limits.max_model_len.min(self.cfg.context_length) {
            return Err(CudaError::Shape("position beyond the rotary table"));
        }
        Ok(())
    }

    /// Graphs captured so far, by padded batch size.
    pub fn captured_graphs(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.graphs.0.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Samples the step's rows on the device (`weave_kernels_gpu::sample`): only the tokens
    /// and their logprobs come back. Rows whose request wants top alternatives are drawn on
    /// the host from a copy of their logits row (see `Samplers::needs_host`).
    #[allow(clippy::type_complexity)]
    fn sample_on_device(
        &mut self,
        ids: &[RequestId],
    ) -> Result<(Vec<u32>, Vec<Option<crate::engine::TokenLogprobs>>), CudaError> {
        let (s, vocab) = (ids.len(), self.cfg.vocab_size);
        let words: Vec<u32> = ids.iter().flat_map(|&id| self.sampling.device_row(id).to_words()).collect();
        self.k.dev.write(&words, &self.meta.sample_params, 0)?;
        self.k.sample(
            &mut self.meta.argmax,
            &mut self.meta.logprob,
            &self.logits,
            &self.meta.sample_params,
            s,
            vocab as u32,
        )?;
        let mut sampled = self.k.dev.read(self.meta.argmax.slice(0..s))?;
        let lp = self.k.dev.read(self.meta.logprob.slice(0..s))?;
        let mut logprobs: Vec<Option<crate::engine::TokenLogprobs>> = ids
            .iter()
            .zip(&lp)
            .map(|(&id, &logprob)| {
                self.sampling.logprobs_of(id).map(|_| crate::engine::TokenLogprobs { logprob, top: Vec::new() })
            })
            .collect();
        for (i, &id) in ids.iter().enumerate() {
            if self.sampling.needs_host(id) {
                let mut row = self.k.dev.read(self.logits.slice(i * vocab..(i + 1) * vocab))?;
                let (t, mut l) = self.sampling.sample_rows(&mut row, vocab, &[id]);
                sampled[i] = t[0];
                logprobs[i] = l.pop().flatten();
            }
        }
        if logprobs.iter().all(Option::is_none) {
            logprobs.clear();
        }
        Ok((sampled, logprobs))
    }
}

/// The profiling pass's step for `l` (see `CudaBackend::profile_pass`).
pub fn profile_batch(l: &CudaLimits, context_length: usize) -> Result<ScheduledBatch, CudaError> {
    let n = l.max_num_batched_tokens.max(1);
    let per = 256.min(l.max_model_len).max(n.div_ceil(l.max_num_seqs.max(1)));
    if per > l.max_model_len.min(context_length) {
        return Err(CudaError::Shape("max_num_batched_tokens over max_num_seqs sequences of max_model_len"));
    }
    let seqs = n.div_ceil(per);
    let mut qsl = vec![0u32];
    for i in 0..seqs {
        qsl.push(((i + 1) * per).min(n) as u32);
    }
    let lens: Vec<u32> = qsl.windows(2).map(|w| w[1] - w[0]).collect();
    let mbps = per.div_ceil(l.block_size);
    Ok(ScheduledBatch {
        input_ids: vec![0; n],
        positions: lens.iter().flat_map(|&m| 0..m).collect(),
        query_start_loc: qsl.clone(),
        seq_lens: lens.clone(),
        context_lens: vec![0; seqs],
        block_tables: vec![0; seqs * mbps],
        max_blocks_per_seq: mbps,
        block_size: l.block_size,
        slot_mapping: vec![u32::MAX; n],
        logits_indices: qsl[1..].iter().map(|&e| e - 1).collect(),
        num_prefill_tokens: n,
        max_query_len: per as u32,
        max_seq_len: per as u32,
        ..Default::default()
    })
}

/// Bytes of bf16 K and V a token takes over all of `c`'s layers.
fn kv_bytes_per_token(c: &ModelConfig) -> usize {
    2 * c.num_layers * c.kv_dim() * 2
}

impl LayerOps for CudaBackend {
    type Error = CudaError;

    fn profile_layers(&self) -> bool {
        self.limits.profile_layers
    }

    fn begin(&mut self, _b: &ScheduledBatch) -> Result<(), CudaError> {
        // Every caller of the pass has uploaded the step's metadata already (`upload_meta`):
        // a graph capture must not record the copy, so it never happens here.
        Ok(())
    }

    fn embedding(&mut self, b: &ScheduledBatch, out: Buf) -> Result<(), CudaError> {
        let n = b.num_tokens();
        typed!(self.limits.dtype, T => self.k.embedding::<T>(&mut self.ws[out as usize], &self.embed, self.meta.view(MetaArray::Ids), n, self.cfg.hidden as u32))
    }

    fn rms_norm(&mut self, x: Buf, w: Norm, out: Buf) -> Result<(), CudaError> {
        let rows = self.rows[x as usize];
        self.rows[out as usize] = rows;
        let wv = match w {
            Norm::Attn(l) => &self.layers[l].attn_norm,
            Norm::Ffn(l) => &self.layers[l].ffn_norm,
            Norm::Final => &self.final_norm,
            Norm::Q(_) | Norm::K(_) => return Err(CudaError::Unsupported("per-head Q/K norms")),
            Norm::PostAttn(_) | Norm::PostFfn(_) => return Err(CudaError::Unsupported("post-norms")),
        };
        let (o, xs) = pair(&mut self.ws, out as usize, x as usize);
        typed!(self.limits.dtype, T => self.k.rms_norm::<T>(o, xs, wv, rows, self.cfg.hidden as u32, self.cfg.rms_eps))
    }

    fn matmul(&mut self, x: Buf, w: Weight, out: Buf, accumulate: bool) -> Result<(), CudaError> {
        let n = self.rows[x as usize];
        let xp = self.ws[x as usize].addr();
        let lin = match w {
            Weight::Qkv(l) => &self.layers[l].qkv,
            Weight::Wo(l) => &self.layers[l].wo,
            Weight::GateUp(l) => &self.layers[l].gate_up,
            Weight::Down(l) => &self.layers[l].down,
            Weight::LmHead => {
                let wp = match &self.lm_head {
                    Some(l) => l.w.addr(),
                    None => self.embed.addr(),
                };
                let cp = self.logits.addr();
                self.rows[Buf::Logits as usize] = n;
                return self.gemm(xp, wp, cp, n, self.cfg.vocab_size, self.cfg.hidden, false, true);
            }
        };
        let wp = lin.w.addr();
        if let Weight::Qkv(_) = w {
            // Straight into Q, K and V: three GEMMs over the fused matrix's row blocks.
            let (qd, kvd, h) = (self.cfg.q_dim(), self.cfg.kv_dim(), self.cfg.hidden);
            let mut row0 = 0;
            for (dst, rows) in [(Buf::Q, qd), (Buf::K, kvd), (Buf::V, kvd)] {
                let cp = self.ws[dst as usize].addr();
                self.gemm(xp, wp + (row0 * h * 2) as u64, cp, n, rows, h, false, false)?;
                self.rows[dst as usize] = n;
                row0 += rows;
            }
            return Ok(());
        }
        let cp = self.ws[out as usize].addr();
        self.rows[out as usize] = n;
        self.gemm(xp, wp, cp, n, lin.out_dim, lin.in_dim, accumulate, false)
    }

    // `new` refuses the models that need these (`ArchDeltas::cuda_ready`).
    fn add_bias(&mut self, _x: Buf, _bias: Bias) -> Result<(), CudaError> {
        Err(CudaError::Unsupported("Q/K/V biases"))
    }

    fn scale(&mut self, _x: Buf, _s: f32) -> Result<(), CudaError> {
        Err(CudaError::Unsupported("scaled embeddings"))
    }

    fn add(&mut self, _x: Buf, _y: Buf) -> Result<(), CudaError> {
        Err(CudaError::Unsupported("post-norm residual adds"))
    }

    fn gelu_and_mul(&mut self, _x: Buf, _out: Buf) -> Result<(), CudaError> {
        Err(CudaError::Unsupported("GELU"))
    }

    #[allow(clippy::too_many_arguments)]
    fn split_rope(
        &mut self,
        b: &ScheduledBatch,
        _qkv: Buf,
        q: Buf,
        k: Buf,
        _v: Buf,
        head_norms: Option<(Norm, Norm)>,
        rotary: Rotary,
    ) -> Result<(), CudaError> {
        if head_norms.is_some() {
            return Err(CudaError::Unsupported("per-head Q/K norms"));
        }
        if rotary == Rotary::Local {
            return Err(CudaError::Unsupported("sliding-window layers' rotary table"));
        }
        // Q, K and V are already apart (see `matmul`); rotate Q and K in place.
        let c = &self.cfg;
        let dims = (c.num_q_heads as u32, c.num_kv_heads as u32, c.head_dim as u32, c.rot_dim as u32);
        let (qi, ki) = (q as usize, k as usize);
        let (lo, hi) = self.ws.split_at_mut(ki.max(qi));
        let (qb, kb) = if qi < ki { (&mut lo[qi], &mut hi[0]) } else { (&mut hi[0], &mut lo[ki]) };
        typed!(self.limits.dtype, T => self.k.rotary_embedding::<T>(
            qb,
            kb,
            self.meta.view(MetaArray::Positions),
            &self.cos_sin,
            b.num_tokens(),
            dims,
            c.rope_layout,
        ))
    }

    fn reshape_and_cache(&mut self, b: &ScheduledBatch, layer: usize, k: Buf, v: Buf) -> Result<(), CudaError> {
        let (kc, vc) = &mut self.kv[layer];
        let row = self.cfg.kv_dim() as u32;
        typed!(self.limits.dtype, T => self.k.reshape_and_cache::<T>(
            &self.ws[k as usize],
            &self.ws[v as usize],
            kc,
            vc,
            self.meta.view(MetaArray::Slots),
            b.num_tokens(),
            row,
        ))
    }

    fn paged_attention(
        &mut self,
        b: &ScheduledBatch,
        layer: usize,
        q: Buf,
        out: Buf,
        window: Option<usize>,
    ) -> Result<(), CudaError> {
        if window.is_some() {
            return Err(CudaError::Unsupported("sliding-window attention"));
        }
        let m = &self.meta;
        let (tiles, tiles_mma) = (m.view(MetaArray::Tiles), m.view(MetaArray::TilesMma));
        let (qsl, ctx, tables) = (m.view(MetaArray::Qsl), m.view(MetaArray::ContextLens), m.view(MetaArray::Tables));
        let meta = AttnMeta {
            tiles,
            num_tiles: self.num_tiles,
            query_start_loc: qsl,
            num_tokens: b.num_tokens() as u32,
            context_lens: ctx,
            block_tables: tables,
        };
        let meta_mma = AttnMeta { tiles: tiles_mma, num_tiles: self.num_tiles_mma, ..meta };
        let (kc, vc) = &self.kv[layer];
        let (o, qs) = pair(&mut self.ws, out as usize, q as usize);
        let (kind, shape, p) = (self.attn_kernel, &self.shape, &mut self.partials);
        typed!(self.limits.dtype, T => self.k.paged_attention_split::<T>(kind, shape, meta, meta_mma, self.max_seq_len, qs, kc, vc, o, p))
    }

    fn silu_and_mul(&mut self, x: Buf, out: Buf) -> Result<(), CudaError> {
        let rows = self.rows[x as usize];
        self.rows[out as usize] = rows;
        let (o, xs) = pair(&mut self.ws, out as usize, x as usize);
        typed!(self.limits.dtype, T => self.k.silu_and_mul::<T>(o, xs, rows, self.cfg.intermediate as u32))
    }

    fn gather_sampled(&mut self, b: &ScheduledBatch, x: Buf, out: Buf) -> Result<(), CudaError> {
        // The embedding kernel is a row gather: the sampled rows of `x` by `logits_indices`.
        let s = b.logits_indices.len();
        self.rows[out as usize] = s;
        let (o, xs) = pair(&mut self.ws, out as usize, x as usize);
        typed!(self.limits.dtype, T => self.k.embedding::<T>(o, xs, self.meta.view(MetaArray::LogitsIndices), s, self.cfg.hidden as u32))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
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
    fn set_masks(&mut self, masks: Option<std::sync::Arc<crate::structured::masks::StepMasks>>) {
        self.masks = masks;
    }
    fn execute(&mut self, batch: &ScheduledBatch) -> anyhow::Result<StepResult> {
        // The GPU cache is one group of every layer (sliding-window models are refused at load).
        anyhow::ensure!(
            batch.kv_groups() == 1,
            "the batch has {} KV layer groups; the CUDA backend's cache has one (run the scheduler with the default kv_groups)",
            batch.kv_groups()
        );
        // cuBLAS calls take the thread's current context: a server steps on a thread of its
        // own, not the one that made the backend.
        self.k.dev.bind_to_thread()?;
        let start = self.k.dev.record()?;
        let t = std::time::Instant::now();
        let range = crate::engine::nvtx::range(c"forward");
        let prepare = self.run_forward(batch)?;
        self.k.sync()?;
        drop(range);
        let forward = t.elapsed().as_secs_f64() - prepare;
        let t = std::time::Instant::now();
        let _range = crate::engine::nvtx::range(c"sample");
        let ids: Vec<RequestId> = batch.sampling_request_ids().collect();
        let s = ids.len();
        let vocab = self.cfg.vocab_size;
        if let Some(m) = self.masks.clone() {
            // Structured outputs: the guided rows' masks go up (beside the step's metadata)
            // and the kernel clears what they forbid before the token is chosen, on whichever
            // path below.
            let (rows, words) = m.packed();
            let w = m.words();
            let need = self.meta.argmax.len() * w;
            if self.meta.masks.as_ref().is_none_or(|b| b.len() < need) {
                self.meta.masks = Some(self.k.zeros(need)?);
            }
            let masks = self.meta.masks.as_ref().expect("just made");
            self.k.dev.write(&rows, &self.meta.mask_rows, 0)?;
            self.k.dev.write(&words, masks, 0)?;
            self.k.mask_logits(&mut self.logits, masks, &self.meta.mask_rows, s, w as u32, vocab as u32)?;
        }
        let (sampled, logprobs) = if self.sampling.all_greedy(&ids) {
            // Only the ids come back.
            self.k.argmax(&mut self.meta.argmax, &self.logits, s, vocab as u32)?;
            (self.k.dev.read(self.meta.argmax.slice(0..s))?, Vec::new())
        } else {
            self.sample_on_device(&ids)?
        };
        let end = self.k.dev.record()?;
        let gpu_busy = self.k.dev.elapsed(&start, &end)?;
        let gpu_gap = match &self.last_end {
            Some(prev) => self.k.dev.elapsed(prev, &start)?,
            None => 0.0,
        };
        self.last_end = Some(end);
        let phases =
            Phases { prepare, forward, sample: t.elapsed().as_secs_f64(), gpu_busy, gpu_gap, ..Default::default() };
        Ok(StepResult { output: StepOutput { sampled }, duration_s: None, logprobs, phases: Some(phases) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::CpuBackend;
    use std::sync::Arc;

    fn decode_batch() -> ScheduledBatch {
        ScheduledBatch {
            input_ids: vec![11, 22, 33],
            positions: vec![5, 9, 17],
            query_start_loc: vec![0, 1, 2, 3],
            seq_lens: vec![6, 10, 18],
            context_lens: vec![5, 9, 17],
            block_tables: vec![1, 0, 2, 0, 3, 4],
            max_blocks_per_seq: 2,
            block_size: 16,
            slot_mapping: vec![16 + 5, 32 + 9, 64 + 1],
            logits_indices: vec![0, 1, 2],
            num_decode_tokens: 3,
            max_query_len: 1,
            max_seq_len: 18,
            ..Default::default()
        }
    }

    #[test]
    fn metadata_packs_back_to_back_in_one_buffer() {
        let ids = [5u32, 6, 7];
        let tables = [1u32, 2, 3, 4];
        let arrays: [&[u32]; MetaArray::COUNT] =
            [&ids, &[0, 1, 2], &[9, 9, 9], &tables, &[1, 2], &[0, 1, 3], &[0, 0], &[], &[0]];
        let mut host = vec![u32::MAX; 32];
        let mut at = [(0, 0); MetaArray::COUNT];
        let used = pack_meta(&arrays, &mut host, &mut at).unwrap();
        // The empty tensor-core tile list keeps one slot.
        assert_eq!(used, 3 + 3 + 3 + 4 + 2 + 3 + 2 + 1 + 1);
        for (a, &(off, len)) in arrays.iter().zip(&at) {
            assert_eq!(&host[off..off + len], *a);
        }
        assert_eq!(at[MetaArray::Tables as usize], (9, 4));
        // The same shapes give the same layout (what a replayed graph relies on).
        let mut at2 = [(0, 0); MetaArray::COUNT];
        pack_meta(&arrays, &mut host, &mut at2).unwrap();
        assert_eq!(at, at2);
        assert!(pack_meta(&arrays, &mut host[..10], &mut at2).is_err());
    }

    #[test]
    fn graph_sizes_follow_vllm() {
        assert_eq!(graph_sizes(1), [1]);
        assert_eq!(graph_sizes(6), [1, 2, 4, 6]);
        assert_eq!(graph_sizes(24), [1, 2, 4, 8, 16, 24]);
        assert_eq!(graph_sizes(30), [1, 2, 4, 8, 16, 24, 30]);
        assert!(graph_sizes(0).is_empty());
    }

    /// The memory profiling pass's step is a valid batch at the largest size: the CPU backend
    /// runs it (one block of KV, every read from the null block, nothing written).
    #[test]
    fn the_profiling_step_runs_at_the_largest_size() {
        let limits = CudaLimits {
            max_num_batched_tokens: 600,
            max_num_seqs: 4,
            max_model_len: 60,
            block_size: 16,
            gpu_memory_utilization: 0.9,
            enforce_eager: false,
            profile_layers: false,
            dtype: Dtype::Bf16,
        };
        // 600 tokens over at most 4 sequences needs 150 a sequence: over max_model_len.
        assert!(profile_batch(&limits, 128).is_err());
        let limits = CudaLimits { max_model_len: 200, ..limits };
        let b = profile_batch(&limits, 256).unwrap();
        // Sequences of 200 (256 capped by max_model_len): three.
        assert_eq!((b.num_tokens(), b.query_start_loc.len() - 1), (600, 3));
        assert!(b.slot_mapping.iter().all(|&x| x == u32::MAX) && b.block_tables.iter().all(|&x| x == 0));
        let mut be = CpuBackend::new(Arc::new(crate::model::dummy::tiny_model(1, 2, 256)), 1, 16, 1, 0);
        let logits = be.forward(&b);
        assert_eq!(logits.len(), 3 * 300);
        assert!(logits.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn only_one_token_per_sequence_all_sampled_is_decode_only() {
        let d = decode_batch();
        assert!(is_decode_only(&d));
        let chunk = ScheduledBatch { query_start_loc: vec![0, 1, 3], ..d.clone() };
        assert!(!is_decode_only(&chunk));
        let unsampled = ScheduledBatch { logits_indices: vec![0, 2], ..d };
        assert!(!is_decode_only(&unsampled));
        assert!(!is_decode_only(&ScheduledBatch::default()));
    }

    /// The padded step a graph runs gives the real rows the logits of the unpadded step: run
    /// both through the CPU backend (the same pass, `llama::forward`), after a prefill that
    /// fills the three sequences' KV.
    #[test]
    fn padding_a_decode_step_leaves_its_rows_unchanged() {
        let mut be = CpuBackend::new(Arc::new(crate::model::dummy::tiny_model(2, 4, 64)), 8, 16, 1, 0);
        let lens = [5u32, 9, 17];
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut slots = Vec::new();
        let mut qsl = vec![0u32];
        let firsts = [1u32, 2, 3];
        for (s, &n) in lens.iter().enumerate() {
            for p in 0..n {
                ids.push(1 + (p * 7 + s as u32) % 250);
                pos.push(p);
                // seq 2 spills into its second block (4).
                slots.push(if p < 16 { firsts[s] * 16 + p } else { 4 * 16 + p - 16 });
            }
            qsl.push(qsl.last().unwrap() + n);
        }
        let prefill = ScheduledBatch {
            input_ids: ids,
            positions: pos,
            query_start_loc: qsl.clone(),
            seq_lens: lens.to_vec(),
            context_lens: vec![0; 3],
            block_tables: vec![1, 0, 2, 0, 3, 4],
            max_blocks_per_seq: 2,
            block_size: 16,
            slot_mapping: slots,
            logits_indices: qsl[1..].iter().map(|x| x - 1).collect(),
            max_seq_len: 17,
            ..Default::default()
        };
        be.forward(&prefill);
        let d = decode_batch();
        let want = be.forward(&d);
        let padded = pad_decode(&d, 8, 4);
        assert!(is_decode_only(&padded));
        assert_eq!(padded.num_tokens(), 8);
        assert_eq!(&padded.block_tables[8..12], &[3, 4, 0, 0]);
        assert_eq!(padded.slot_mapping[3..], [u32::MAX; 5]);
        let got = be.forward(&padded);
        let vocab = 300;
        assert_eq!(got.len(), 8 * vocab);
        for (i, (a, b)) in got[..3 * vocab].iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "logit {i}: padded {a}, unpadded {b}");
        }
        assert!(got.iter().all(|x| x.is_finite()));
    }
}
