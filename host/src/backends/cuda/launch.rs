//! Launch wrappers: same arguments as the kernels, grids as `kernels-gpu` documents them.

use super::dev::{DBuf, DView};
use super::{CudaError, DevElem, Kernels};
use weave_kernels_gpu::attention::{count_tiles, fill_tiles, AttnShape};
use weave_kernels_gpu::gpu::Arg;
use weave_kernels_gpu::{HeadDim, Kernel};

/// Which paged attention kernel a launch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnKernel {
    /// KV blocks staged through shared memory one at a time (the first kernel, proven on an
    /// H200).
    #[default]
    Staged,
    /// 16-bit caches only: the next block's K and V held in registers (16-byte loads) while
    /// the current one is worked on, staging sized by the block size.
    Pipelined,
    /// 16-bit caches and block sizes that are multiples of 16: the rows of prefill chunks on
    /// tensor cores (`paged_attention_mma_*`, tiles of `MMA_TILE_TOKENS` tokens), decode rows
    /// on the staged kernel.
    TensorCore,
    /// As `TensorCore`, with decode rows on the decode kernel (`paged_decode_*`: one query
    /// head a thread block, whole key rows in 16-byte loads).
    Fast,
}

impl AttnKernel {
    /// `WEAVE_ATTN_KERNEL=pipelined` picks the pipelined kernel for the model's steps (until
    /// it is proven on a GPU, the staged one stays the default).
    pub fn from_env() -> AttnKernel {
        match std::env::var("WEAVE_ATTN_KERNEL").as_deref() {
            Ok("pipelined") => AttnKernel::Pipelined,
            Ok("tensorcore") => AttnKernel::TensorCore,
            Ok("fast") => AttnKernel::Fast,
            _ => AttnKernel::Staged,
        }
    }

    /// Whether the batch's tiles split into decode rows and chunk rows (`TensorCore`, `Fast`)
    /// for `dtype` at `block_size`.
    pub fn splits_tiles(self, dtype: weave_kernels_gpu::Dtype, block_size: u32) -> bool {
        matches!(self, AttnKernel::TensorCore | AttnKernel::Fast) && AttnKernel::mma_ok(dtype, block_size)
    }

    /// The kernel the CUDA-core tiles ([`Self::tiles`]' first list) take for `dtype` at
    /// `block_size`. The decode kernel only where the tiles split, since it takes one-token
    /// sequences alone: where they do not (f32, or a block size the tensor-core kernel cannot
    /// walk), `Fast`'s tiles hold chunks too and go to the staged kernel, as `TensorCore`'s do.
    pub fn decode_rows(self, dtype: weave_kernels_gpu::Dtype, block_size: u32) -> AttnKernel {
        match self {
            AttnKernel::Fast if self.splits_tiles(dtype, block_size) => AttnKernel::Fast,
            AttnKernel::Fast | AttnKernel::TensorCore => AttnKernel::Staged,
            other => other,
        }
    }

    /// The batch's tiles for this choice: the CUDA-core kernel's (`fill_tiles` for
    /// `tokens_per_tile`; with `TensorCore` or `Fast`, decode rows only) and the tensor-core
    /// kernel's (chunks, `MMA_TILE_TOKENS` tokens a tile; empty unless the tiles split).
    pub fn tiles(
        self,
        dtype: weave_kernels_gpu::Dtype,
        block_size: u32,
        query_start_loc: &[u32],
        tokens_per_tile: u32,
    ) -> (Vec<u32>, Vec<u32>) {
        if self.splits_tiles(dtype, block_size) {
            weave_kernels_gpu::attention::split_tiles(query_start_loc, tokens_per_tile)
        } else {
            let mut tiles = vec![0u32; 2 * count_tiles(query_start_loc, tokens_per_tile)];
            fill_tiles(query_start_loc, tokens_per_tile, &mut tiles);
            (tiles, Vec::new())
        }
    }

    /// Whether the tensor-core kernel serves `T` at `block_size`.
    pub fn mma_ok(dtype: weave_kernels_gpu::Dtype, block_size: u32) -> bool {
        dtype != weave_kernels_gpu::Dtype::F32 && block_size.is_multiple_of(16)
    }
}

/// A batch's attention metadata on the device.
#[derive(Debug, Clone, Copy)]
pub struct AttnMeta<'a> {
    /// `(sequence, first query index)` of each tile.
    pub tiles: DView<'a, u32>,
    pub num_tiles: usize,
    pub query_start_loc: DView<'a, u32>,
    pub num_tokens: u32,
    pub context_lens: DView<'a, u32>,
    pub block_tables: DView<'a, u32>,
}

/// A launch argument: a buffer's device address, or a scalar.
trait AsArg {
    fn arg(&self) -> Arg;
}
impl<T: bytemuck::Pod> AsArg for DBuf<T> {
    fn arg(&self) -> Arg {
        Arg::Ptr(self.addr())
    }
}
impl<T> AsArg for DView<'_, T> {
    fn arg(&self) -> Arg {
        Arg::Ptr(self.addr())
    }
}
impl<A: AsArg + ?Sized> AsArg for &A {
    fn arg(&self) -> Arg {
        (**self).arg()
    }
}
impl<A: AsArg + ?Sized> AsArg for &mut A {
    fn arg(&self) -> Arg {
        (**self).arg()
    }
}
impl AsArg for u32 {
    fn arg(&self) -> Arg {
        Arg::U32(*self)
    }
}
impl AsArg for u64 {
    fn arg(&self) -> Arg {
        Arg::U64(*self)
    }
}
impl AsArg for f32 {
    fn arg(&self) -> Arg {
        Arg::F32(*self)
    }
}

/// The arguments of a launch, in the kernel's parameter order.
macro_rules! args {
    ($($a:expr),* $(,)?) => { [$(AsArg::arg(&$a)),*] };
}

impl Kernels {
    #[allow(clippy::too_many_arguments)]
    pub fn reshape_and_cache<T: DevElem>(
        &self,
        k: &DBuf<T::Bits>,
        v: &DBuf<T::Bits>,
        k_cache: &mut DBuf<T::Bits>,
        v_cache: &mut DBuf<T::Bits>,
        slots: DView<'_, u32>,
        num_tokens: usize,
        row: u32,
    ) -> Result<(), CudaError> {
        let kind = Kernel::ReshapeAndCache(T::DTYPE);
        // Buffers sized by the caller for `num_tokens` rows and every slot in `slots`.
        self.dev.launch(kind, kind.rows(num_tokens as u32), &args![k, v, k_cache, v_cache, slots, row])?;
        Ok(())
    }

    /// Paged attention over a packed batch, with the split-KV reduce when `blocks_per_split > 0`.
    /// Builds and uploads the tile list and the query offsets (see [`Self::paged_attention_with`]
    /// for a caller that keeps them on the device across layers).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention<T: DevElem>(
        &self,
        kind: AttnKernel,
        shape: &AttnShape,
        query_start_loc: &[u32],
        context_lens: &DBuf<u32>,
        block_tables: &DBuf<u32>,
        max_seq_len: u32,
        q: &DBuf<T::Bits>,
        k_cache: &DBuf<T::Bits>,
        v_cache: &DBuf<T::Bits>,
        out: &mut DBuf<T::Bits>,
    ) -> Result<(), CudaError> {
        shape.check().map_err(CudaError::Shape)?;
        let num_tokens = *query_start_loc.last().unwrap_or(&0);
        let tq = shape.tokens_per_tile();
        let qsl_d = self.upload(query_start_loc)?;
        let qsl_v = qsl_d.as_view();
        let (context_lens, block_tables) = (context_lens.as_view(), block_tables.as_view());
        let (small, big) = kind.tiles(T::DTYPE, shape.block_size, query_start_loc, tq);
        // An empty list still uploads one (unused) tile: no zero-sized device buffers.
        let up = |v: &[u32]| self.upload(if v.is_empty() { &[0, 0] } else { v });
        let (small_d, big_d) = (up(&small)?, up(&big)?);
        let (small_v, big_v) = (small_d.as_view(), big_d.as_view());
        let meta = |tiles, n: usize| AttnMeta {
            tiles,
            num_tiles: n / 2,
            query_start_loc: qsl_v,
            num_tokens,
            context_lens,
            block_tables,
        };
        let splits = if big.is_empty() { shape.num_splits(max_seq_len) as usize } else { 1 };
        let mut partials = self.zeros::<f32>(if splits > 1 {
            splits * num_tokens as usize * shape.num_q_heads as usize * shape.partial_stride()
        } else {
            1
        })?;
        let (small_m, big_m) = (meta(small_v, small.len()), meta(big_v, big.len()));
        self.paged_attention_split::<T>(
            kind,
            shape,
            small_m,
            big_m,
            max_seq_len,
            q,
            k_cache,
            v_cache,
            out,
            &mut partials,
        )
    }

    /// Paged attention over tiles from [`AttnKernel::tiles`]: `small`'s on the CUDA-core kernel
    /// `kind` picks for them, `big`'s on tensor cores (either may have no tiles). The split
    /// applies only when there is no chunk tile: the reduce rewrites every row.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_split<T: DevElem>(
        &self,
        kind: AttnKernel,
        shape: &AttnShape,
        small: AttnMeta<'_>,
        big: AttnMeta<'_>,
        max_seq_len: u32,
        q: &DBuf<T::Bits>,
        k_cache: &DBuf<T::Bits>,
        v_cache: &DBuf<T::Bits>,
        out: &mut DBuf<T::Bits>,
        partials: &mut DBuf<f32>,
    ) -> Result<(), CudaError> {
        let shape = if big.num_tiles > 0 { AttnShape { blocks_per_split: 0, ..*shape } } else { *shape };
        if small.num_tiles > 0 {
            let kind = kind.decode_rows(T::DTYPE, shape.block_size);
            self.paged_attention_with::<T>(kind, &shape, small, max_seq_len, q, k_cache, v_cache, out, partials)?;
        }
        if big.num_tiles > 0 {
            self.paged_attention_mma::<T>(&shape, big, q, k_cache, v_cache, out)?;
        }
        Ok(())
    }

    /// Tensor-core attention for the tiles of `meta` (`MMA_TILE_TOKENS` tokens each, from
    /// `split_tiles`), no split. 16-bit `T` and block sizes that are multiples of 16.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_mma<T: DevElem>(
        &self,
        shape: &AttnShape,
        meta: AttnMeta<'_>,
        q: &DBuf<T::Bits>,
        k_cache: &DBuf<T::Bits>,
        v_cache: &DBuf<T::Bits>,
        out: &mut DBuf<T::Bits>,
    ) -> Result<(), CudaError> {
        shape.check().map_err(CudaError::Shape)?;
        if !AttnKernel::mma_ok(T::DTYPE, shape.block_size) {
            return Err(CudaError::Shape(
                "the tensor-core kernel takes 16-bit caches and block sizes that are multiples of 16",
            ));
        }
        let hd = HeadDim::of(shape.head_dim).ok_or(CudaError::Shape("head_dim must be 64 or 128"))?;
        let kernel = Kernel::PagedAttentionMma(T::DTYPE, hd);
        let cfg = kernel.attention(shape, meta.num_tiles as u32, 1);
        // Shapes checked; the tiles cover `MMA_TILE_TOKENS` tokens of chunks whose
        // blocks the tables hold; buffers sized by the caller as AttnShape documents.
        self.dev.launch(
            kernel,
            cfg,
            &args![
                out,
                q,
                k_cache,
                v_cache,
                meta.tiles,
                meta.query_start_loc,
                meta.context_lens,
                meta.block_tables,
                meta.num_tokens,
                shape.num_q_heads,
                shape.num_kv_heads,
                shape.block_size,
                shape.max_blocks_per_seq,
                shape.scale
            ],
        )?;
        Ok(())
    }

    /// Paged attention with kernel `kind` for the batch's tiles (`fill_tiles` for
    /// `shape.tokens_per_tile()`) and query offsets already on the device, and a `partials`
    /// workspace of at least `splits * num_tokens * num_q_heads * partial_stride()` floats
    /// when there is more than one split. f32 caches always take the staged kernel;
    /// `TensorCore` here means the staged kernel too, and `Fast` the decode kernel, whose
    /// tiles must all be one-token sequences (their chunk tiles go to
    /// [`Self::paged_attention_mma`]).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_with<T: DevElem>(
        &self,
        kind: AttnKernel,
        shape: &AttnShape,
        meta: AttnMeta<'_>,
        max_seq_len: u32,
        q: &DBuf<T::Bits>,
        k_cache: &DBuf<T::Bits>,
        v_cache: &DBuf<T::Bits>,
        out: &mut DBuf<T::Bits>,
        partials: &mut DBuf<f32>,
    ) -> Result<(), CudaError> {
        shape.check().map_err(CudaError::Shape)?;
        let d = shape.head_dim;
        let num_tokens = meta.num_tokens;
        let splits = shape.num_splits(max_seq_len);
        let hd = HeadDim::of(d).ok_or(CudaError::Shape("head_dim must be 64 or 128"))?;
        let half = T::DTYPE != weave_kernels_gpu::Dtype::F32;
        let pipelined = kind == AttnKernel::Pipelined && half;
        // The decode kernel takes only tiles of one-token sequences (`split_tiles`' first list).
        let decode = kind == AttnKernel::Fast && half;
        let kernel = if decode {
            Kernel::PagedDecode(T::DTYPE, hd)
        } else if pipelined {
            Kernel::PagedAttentionPipelined(T::DTYPE, hd)
        } else {
            Kernel::PagedAttention(T::DTYPE, hd)
        };
        // The decode kernel is one query head a thread block, the others one KV head.
        let dims = kernel.attention(shape, meta.num_tiles as u32, splits);
        // Shapes checked; buffers sized by the caller as AttnShape documents.
        self.dev.launch(
            kernel,
            dims,
            &args![
                out,
                partials,
                q,
                k_cache,
                v_cache,
                meta.tiles,
                meta.query_start_loc,
                meta.context_lens,
                meta.block_tables,
                num_tokens,
                shape.num_q_heads,
                shape.num_kv_heads,
                shape.block_size,
                shape.max_blocks_per_seq,
                shape.blocks_per_split,
                splits,
                shape.scale
            ],
        )?;
        if splits > 1 {
            let reduce = Kernel::AttentionReduce(T::DTYPE, hd);
            // `partials` was filled for these dimensions by the launch above.
            self.dev.launch(
                reduce,
                reduce.attention(shape, num_tokens, 1),
                &args![out, partials, num_tokens, shape.num_q_heads, splits],
            )?;
        }
        Ok(())
    }

    pub fn rms_norm<T: DevElem>(
        &self,
        out: &mut DBuf<T::Bits>,
        x: &DBuf<T::Bits>,
        w: &DBuf<f32>,
        n_rows: usize,
        n: u32,
        eps: f32,
    ) -> Result<(), CudaError> {
        let kind = Kernel::RmsNorm(T::DTYPE);
        // `n_rows * n` elements in `out` and `x`, `n` weights.
        self.dev.launch(kind, kind.rows(n_rows as u32), &args![out, x, w, n, eps])?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn fused_add_rms_norm<T: DevElem>(
        &self,
        x: &mut DBuf<T::Bits>,
        residual: &mut DBuf<T::Bits>,
        w: &DBuf<f32>,
        n_rows: usize,
        n: u32,
        eps: f32,
    ) -> Result<(), CudaError> {
        let kind = Kernel::FusedAddRmsNorm(T::DTYPE);
        // As for rms_norm.
        self.dev.launch(kind, kind.rows(n_rows as u32), &args![x, residual, w, n, eps])?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rotary_embedding<T: DevElem>(
        &self,
        q: &mut DBuf<T::Bits>,
        k: &mut DBuf<T::Bits>,
        positions: DView<'_, u32>,
        cos_sin: &DBuf<f32>,
        num_tokens: usize,
        dims: (u32, u32, u32, u32),
        layout: weave_kernels_gpu::ops::RopeLayout,
    ) -> Result<(), CudaError> {
        let (nq, nk, head_dim, rot_dim) = dims;
        let kind = Kernel::RotaryEmbedding(T::DTYPE);
        let layout = layout as u32;
        // Q/K hold `num_tokens` rows of nq/nk heads; the cos/sin cache covers every position.
        self.dev.launch(
            kind,
            kind.rows(num_tokens as u32),
            &args![q, k, positions, cos_sin, nq, nk, head_dim, rot_dim, layout],
        )?;
        Ok(())
    }

    pub fn silu_and_mul<T: DevElem>(
        &self,
        out: &mut DBuf<T::Bits>,
        x: &DBuf<T::Bits>,
        num_tokens: usize,
        inter: u32,
    ) -> Result<(), CudaError> {
        let kind = Kernel::SiluAndMul(T::DTYPE);
        // `x` holds 2 * inter per token, `out` inter per token.
        self.dev.launch(kind, kind.rows(num_tokens as u32), &args![out, x, inter])?;
        Ok(())
    }

    pub fn embedding<T: DevElem>(
        &self,
        out: &mut DBuf<T::Bits>,
        table: &DBuf<T::Bits>,
        ids: DView<'_, u32>,
        num_tokens: usize,
        hidden: u32,
    ) -> Result<(), CudaError> {
        let kind = Kernel::Embedding(T::DTYPE);
        // Every id indexes a row of `table`.
        self.dev.launch(kind, kind.rows(num_tokens as u32), &args![out, table, ids, hidden])?;
        Ok(())
    }

    pub fn argmax(&self, out: &mut DBuf<u32>, logits: &DBuf<f32>, n_rows: usize, vocab: u32) -> Result<(), CudaError> {
        let kind = Kernel::ArgmaxF32;
        // `logits` holds n_rows * vocab values, `out` n_rows.
        self.dev.launch(kind, kind.rows(n_rows as u32), &args![out, logits, vocab])?;
        Ok(())
    }

    /// Samples one token per row of `logits` (`n_rows x vocab`) by `params`
    /// (`PARAM_WORDS` words a row, `weave_kernels_gpu::sample::RowParams::to_words`), writing
    /// the tokens and their logprobs under the raw logits.
    pub fn sample(
        &self,
        out: &mut DBuf<u32>,
        out_logprob: &mut DBuf<f32>,
        logits: &DBuf<f32>,
        params: &DBuf<u32>,
        n_rows: usize,
        vocab: u32,
    ) -> Result<(), CudaError> {
        let kind = Kernel::SampleF32;
        // `logits` holds n_rows * vocab values, `params` n_rows rows, the outputs n_rows.
        self.dev.launch(kind, kind.rows(n_rows as u32), &args![out, out_logprob, logits, params, vocab])?;
        Ok(())
    }

    /// Structured outputs: sets row `r` of `logits` (`n_rows x vocab`) to `-inf` wherever row
    /// `mask_rows[r]` of `masks` (`words` words a row) clears a token; rows whose entry is
    /// `weave_kernels_gpu::sample::NO_MASK` are left alone.
    pub fn mask_logits(
        &self,
        logits: &mut DBuf<f32>,
        masks: &DBuf<u32>,
        mask_rows: &DBuf<u32>,
        n_rows: usize,
        words: u32,
        vocab: u32,
    ) -> Result<(), CudaError> {
        if mask_rows.len() < n_rows || logits.len() < n_rows * vocab as usize || words < vocab.div_ceil(32) {
            return Err(CudaError::Shape("mask_logits: buffers smaller than n_rows rows of vocab"));
        }
        let kind = Kernel::MaskLogitsF32;
        // `logits` holds n_rows * vocab values and `mask_rows` n_rows entries (checked above);
        // each entry names a row of `masks` or none (the caller packs them together).
        self.dev.launch(kind, kind.rows(n_rows as u32), &args![logits, masks, mask_rows, words, vocab])?;
        Ok(())
    }

    /// Fills `out` with the dummy-weight stream `seed` at `scale` (the values the CPU's dummy
    /// weights hold), on the device.
    pub fn fill_dummy<T: DevElem>(&self, out: &mut DBuf<T::Bits>, seed: u64, scale: f32) -> Result<(), CudaError> {
        let kind = Kernel::FillDummy(T::DTYPE);
        let n = out.len() as u64;
        // The kernel writes `out.len()` elements.
        self.dev.launch(kind, Kernel::fill(n), &args![out, n, seed, scale])?;
        Ok(())
    }

    /// The conformance kernel (`weave_kernels_gpu::kernels::conformance`): every `gpu`
    /// primitive on `inp` (its `input()`), each thread's results in `out`.
    pub fn gpu_conformance(&self, inp: &DBuf<u32>, out: &mut DBuf<u32>) -> Result<(), CudaError> {
        use weave_kernels_gpu::kernels::conformance::{region, GRID, NTHREADS, OUT_WORDS};
        if inp.len() < region::END || out.len() < NTHREADS * OUT_WORDS {
            return Err(CudaError::Shape("gpu_conformance: buffers smaller than its regions"));
        }
        let kind = Kernel::GpuConformance;
        // Both buffers hold what the kernel's regions and slots index (checked above).
        self.dev.launch(kind, kind.rows(GRID), &args![inp, out])?;
        Ok(())
    }
}
