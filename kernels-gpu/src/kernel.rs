//! Every kernel by type: the one table from which the PTX check (`cargo xtask build-ptx`),
//! the host's loader and its launch wrappers take their names, so a kernel is spelled once
//! here and once where its family's file in `kernels/` defines it (a test holds the two
//! together through the PTX's entries).

/// A kernel's storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// The head sizes attention is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadDim {
    D64,
    D128,
}

impl HeadDim {
    pub const fn of(d: u32) -> Option<HeadDim> {
        match d {
            64 => Some(HeadDim::D64),
            128 => Some(HeadDim::D128),
            _ => None,
        }
    }

    pub const fn get(self) -> u32 {
        match self {
            HeadDim::D64 => 64,
            HeadDim::D128 => 128,
        }
    }
}

/// One PTX entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    ReshapeAndCache(Dtype),
    PagedAttention(Dtype, HeadDim),
    /// The 16-bit variant that keeps the next KV block in registers (16-byte loads) while the
    /// warps work on the staged one, with staging sized by the block size.
    PagedAttentionPipelined(Dtype, HeadDim),
    /// Tensor-core attention (mma.sync m16n8k16) for the rows of prefill chunks, 16-bit only.
    PagedAttentionMma(Dtype, HeadDim),
    /// Decode rows, one query head a thread block, 16-byte loads of whole key rows.
    PagedDecode(Dtype, HeadDim),
    AttentionReduce(Dtype, HeadDim),
    RmsNorm(Dtype),
    FusedAddRmsNorm(Dtype),
    RotaryEmbedding(Dtype),
    SiluAndMul(Dtype),
    Embedding(Dtype),
    ArgmaxF32,
    /// Device sampling (`crate::sample`): one row per thread block.
    SampleF32,
    /// Structured outputs: a row's packed token mask applied to its logits.
    MaskLogitsF32,
    /// Dummy weights (`crate::sample::dummy_value`), grid-stride.
    FillDummy(Dtype),
    /// Every primitive of the `gpu` seam on known inputs, to compare a GPU with the emulator
    /// (`crate::kernels::conformance`).
    GpuConformance,
}

impl Kernel {
    /// The entry's name in the PTX.
    pub const fn name(self) -> &'static str {
        use Dtype::*;
        use HeadDim::*;
        use Kernel::*;
        match self {
            ReshapeAndCache(F32) => "reshape_and_cache_f32",
            ReshapeAndCache(F16) => "reshape_and_cache_f16",
            ReshapeAndCache(Bf16) => "reshape_and_cache_bf16",
            PagedAttention(F32, D64) => "paged_attention_f32_d64",
            PagedAttention(F32, D128) => "paged_attention_f32_d128",
            PagedAttention(F16, D64) => "paged_attention_f16_d64",
            PagedAttention(F16, D128) => "paged_attention_f16_d128",
            PagedAttention(Bf16, D64) => "paged_attention_bf16_d64",
            PagedAttention(Bf16, D128) => "paged_attention_bf16_d128",
            PagedAttentionPipelined(F16, D64) => "paged_attention_pipelined_f16_d64",
            PagedAttentionPipelined(F16, D128) => "paged_attention_pipelined_f16_d128",
            PagedAttentionPipelined(Bf16, D64) => "paged_attention_pipelined_bf16_d64",
            PagedAttentionPipelined(Bf16, D128) => "paged_attention_pipelined_bf16_d128",
            // f32 caches take the staged kernel.
            PagedAttentionPipelined(F32, _) => "paged_attention_pipelined_unsupported_f32",
            PagedAttentionMma(F16, D64) => "paged_attention_mma_f16_d64",
            PagedAttentionMma(F16, D128) => "paged_attention_mma_f16_d128",
            PagedAttentionMma(Bf16, D64) => "paged_attention_mma_bf16_d64",
            PagedAttentionMma(Bf16, D128) => "paged_attention_mma_bf16_d128",
            PagedAttentionMma(F32, _) => "paged_attention_mma_unsupported_f32",
            PagedDecode(F16, D64) => "paged_decode_f16_d64",
            PagedDecode(F16, D128) => "paged_decode_f16_d128",
            PagedDecode(Bf16, D64) => "paged_decode_bf16_d64",
            PagedDecode(Bf16, D128) => "paged_decode_bf16_d128",
            PagedDecode(F32, _) => "paged_decode_unsupported_f32",
            AttentionReduce(F32, D64) => "attention_reduce_f32_d64",
            AttentionReduce(F32, D128) => "attention_reduce_f32_d128",
            AttentionReduce(F16, D64) => "attention_reduce_f16_d64",
            AttentionReduce(F16, D128) => "attention_reduce_f16_d128",
            AttentionReduce(Bf16, D64) => "attention_reduce_bf16_d64",
            AttentionReduce(Bf16, D128) => "attention_reduce_bf16_d128",
            RmsNorm(F32) => "rms_norm_f32",
            RmsNorm(F16) => "rms_norm_f16",
            RmsNorm(Bf16) => "rms_norm_bf16",
            FusedAddRmsNorm(F32) => "fused_add_rms_norm_f32",
            FusedAddRmsNorm(F16) => "fused_add_rms_norm_f16",
            FusedAddRmsNorm(Bf16) => "fused_add_rms_norm_bf16",
            RotaryEmbedding(F32) => "rotary_embedding_f32",
            RotaryEmbedding(F16) => "rotary_embedding_f16",
            RotaryEmbedding(Bf16) => "rotary_embedding_bf16",
            SiluAndMul(F32) => "silu_and_mul_f32",
            SiluAndMul(F16) => "silu_and_mul_f16",
            SiluAndMul(Bf16) => "silu_and_mul_bf16",
            Embedding(F32) => "embedding_f32",
            Embedding(F16) => "embedding_f16",
            Embedding(Bf16) => "embedding_bf16",
            ArgmaxF32 => "argmax_f32",
            SampleF32 => "sample_f32",
            MaskLogitsF32 => "mask_logits_f32",
            FillDummy(F32) => "fill_dummy_f32",
            FillDummy(F16) => "fill_dummy_f16",
            FillDummy(Bf16) => "fill_dummy_bf16",
            GpuConformance => "gpu_conformance",
        }
    }

    /// Bytes of dynamic shared memory a launch must give it.
    pub const fn dynamic_smem(self) -> u32 {
        match self {
            Kernel::PagedAttention(_, d) | Kernel::PagedAttentionPipelined(_, d) => {
                crate::attention_smem_bytes(d.get())
            }
            // K staged row-major (d + 8 values a row) and V transposed (24 a row), 16 keys.
            Kernel::PagedAttentionMma(_, d) => (16 * (d.get() + 8) + d.get() * 24) * 2,
            // Each warp's (m, l) and d values, merged at the end.
            Kernel::PagedDecode(_, d) => (crate::BLOCK_THREADS / 32) * (d.get() + 2) * 4,
            // Block reductions: a value and an index per warp.
            Kernel::RmsNorm(_) | Kernel::FusedAddRmsNorm(_) | Kernel::ArgmaxF32 | Kernel::SampleF32 => {
                2 * (crate::BLOCK_THREADS / 32) * 4
            }
            Kernel::GpuConformance => crate::kernels::conformance::SMEM_BYTES,
            _ => 0,
        }
    }

    /// Its place in [`KERNELS`] (the loader keeps the functions in that order). Host only:
    /// the device has no use for it, and its panic path has no place in the PTX.
    #[cfg(not(target_arch = "nvptx64"))]
    pub fn index(self) -> usize {
        KERNELS.iter().position(|&k| k == self).expect("every kernel is in KERNELS")
    }
}

/// The shape of one launch: grid, threads a block, bytes of dynamic shared memory. The CUDA
/// backend's launchers and the emulator's take their launches from here, so both machines run
/// a kernel with the same grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
}

/// Host only, as [`Kernel::index`]: the device has no use for them.
#[cfg(not(target_arch = "nvptx64"))]
impl Kernel {
    /// One thread block of `BLOCK_THREADS` a row (the row kernels, norms, argmax, sampling).
    pub const fn rows(self, n: u32) -> LaunchDims {
        LaunchDims { grid: (n, 1, 1), block: crate::BLOCK_THREADS, smem: self.dynamic_smem() }
    }

    /// The grid-stride fill of `n` values: enough blocks to fill a large GPU (132 SMs x 16),
    /// not one per element.
    pub const fn fill(n: u64) -> LaunchDims {
        let blocks = n.div_ceil(crate::BLOCK_THREADS as u64);
        let blocks = if blocks > 132 * 16 {
            132 * 16
        } else if blocks == 0 {
            1
        } else {
            blocks
        };
        LaunchDims { grid: (blocks as u32, 1, 1), block: crate::BLOCK_THREADS, smem: 0 }
    }

    /// An attention kernel over `num_tiles` tiles and `splits` KV splits: the staged and
    /// pipelined kernels take a KV head a thread block, the decode and tensor-core ones a
    /// query head (the tensor-core kernel never splits); the pipelined kernel's staging is
    /// sized by the block size. `AttentionReduce` takes `num_tiles` as the token count: one
    /// warp a (token, query head).
    pub fn attention(self, shape: &crate::AttnShape, num_tiles: u32, splits: u32) -> LaunchDims {
        let block = crate::BLOCK_THREADS;
        let (grid, block, smem) = match self {
            Kernel::PagedAttention(..) => ((num_tiles, shape.num_kv_heads, splits), block, self.dynamic_smem()),
            Kernel::PagedAttentionPipelined(..) => (
                (num_tiles, shape.num_kv_heads, splits),
                block,
                crate::attention_smem_bytes_for(shape.head_dim, shape.block_size),
            ),
            Kernel::PagedDecode(..) => ((num_tiles, shape.num_q_heads, splits), block, self.dynamic_smem()),
            Kernel::PagedAttentionMma(..) => ((num_tiles, shape.num_q_heads, 1), block, self.dynamic_smem()),
            Kernel::AttentionReduce(..) => ((num_tiles, shape.num_q_heads, 1), 32, 0),
            other => panic!("{} is not an attention kernel", other.name()),
        };
        LaunchDims { grid, block, smem }
    }
}

/// A kernel's emulated entry.
#[cfg(not(target_arch = "nvptx64"))]
#[derive(Debug, Clone, Copy)]
pub struct EmuEntry {
    /// The PTX entry's name.
    pub name: &'static str,
    /// The body under the emulator, from the arguments as a launch passes them.
    pub launch: fn(&weave_simt::Launch, &[crate::gpu::Arg]) -> Result<weave_simt::Stats, weave_simt::EmuError>,
    /// The parameters' names, in order.
    pub params: &'static [&'static str],
    /// Which parameters the kernel may write through.
    pub writes: &'static [bool],
}

#[cfg(not(target_arch = "nvptx64"))]
impl Kernel {
    /// The kernel's body under the SIMT emulator, by type: what a device that emulates (the
    /// CUDA backend's launchers over the emulator) calls where a GPU launches the PTX entry.
    pub fn emu_entry(self) -> EmuEntry {
        use crate::kernels::*;
        use Dtype::*;
        use HeadDim::*;
        use Kernel::*;
        macro_rules! e {
            ($m:path) => {{
                use $m as m;
                EmuEntry { name: m::NAME, launch: m::launch_args, params: m::PARAMS, writes: m::WRITES }
            }};
        }
        match self {
            ReshapeAndCache(F32) => e!(rows::reshape_and_cache_f32),
            ReshapeAndCache(F16) => e!(rows::reshape_and_cache_f16),
            ReshapeAndCache(Bf16) => e!(rows::reshape_and_cache_bf16),
            PagedAttention(F32, D64) => e!(attention::paged_attention_f32_d64),
            PagedAttention(F32, D128) => e!(attention::paged_attention_f32_d128),
            PagedAttention(F16, D64) => e!(attention::paged_attention_f16_d64),
            PagedAttention(F16, D128) => e!(attention::paged_attention_f16_d128),
            PagedAttention(Bf16, D64) => e!(attention::paged_attention_bf16_d64),
            PagedAttention(Bf16, D128) => e!(attention::paged_attention_bf16_d128),
            PagedAttentionPipelined(F16, D64) => e!(attention::paged_attention_pipelined_f16_d64),
            PagedAttentionPipelined(F16, D128) => e!(attention::paged_attention_pipelined_f16_d128),
            PagedAttentionPipelined(Bf16, D64) => e!(attention::paged_attention_pipelined_bf16_d64),
            PagedAttentionPipelined(Bf16, D128) => e!(attention::paged_attention_pipelined_bf16_d128),
            PagedAttentionMma(F16, D64) => e!(mma::paged_attention_mma_f16_d64),
            PagedAttentionMma(F16, D128) => e!(mma::paged_attention_mma_f16_d128),
            PagedAttentionMma(Bf16, D64) => e!(mma::paged_attention_mma_bf16_d64),
            PagedAttentionMma(Bf16, D128) => e!(mma::paged_attention_mma_bf16_d128),
            PagedDecode(F16, D64) => e!(decode::paged_decode_f16_d64),
            PagedDecode(F16, D128) => e!(decode::paged_decode_f16_d128),
            PagedDecode(Bf16, D64) => e!(decode::paged_decode_bf16_d64),
            PagedDecode(Bf16, D128) => e!(decode::paged_decode_bf16_d128),
            // f32 caches take the staged kernel: these have no body (nor PTX entry).
            PagedAttentionPipelined(F32, _) | PagedAttentionMma(F32, _) | PagedDecode(F32, _) => EmuEntry {
                name: self.name(),
                launch: |l, _| {
                    Err(weave_simt::EmuError {
                        kind: weave_simt::ErrorKind::BadLaunch,
                        kernel: l.kernel.clone(),
                        block: weave_simt::Dim3::default(),
                        thread: None,
                        detail: "no f32 variant: f32 caches take the staged kernel".into(),
                    })
                },
                params: &[],
                writes: &[],
            },
            AttentionReduce(F32, D64) => e!(attention::attention_reduce_f32_d64),
            AttentionReduce(F32, D128) => e!(attention::attention_reduce_f32_d128),
            AttentionReduce(F16, D64) => e!(attention::attention_reduce_f16_d64),
            AttentionReduce(F16, D128) => e!(attention::attention_reduce_f16_d128),
            AttentionReduce(Bf16, D64) => e!(attention::attention_reduce_bf16_d64),
            AttentionReduce(Bf16, D128) => e!(attention::attention_reduce_bf16_d128),
            RmsNorm(F32) => e!(norm::rms_norm_f32),
            RmsNorm(F16) => e!(norm::rms_norm_f16),
            RmsNorm(Bf16) => e!(norm::rms_norm_bf16),
            FusedAddRmsNorm(F32) => e!(norm::fused_add_rms_norm_f32),
            FusedAddRmsNorm(F16) => e!(norm::fused_add_rms_norm_f16),
            FusedAddRmsNorm(Bf16) => e!(norm::fused_add_rms_norm_bf16),
            RotaryEmbedding(F32) => e!(rows::rotary_embedding_f32),
            RotaryEmbedding(F16) => e!(rows::rotary_embedding_f16),
            RotaryEmbedding(Bf16) => e!(rows::rotary_embedding_bf16),
            SiluAndMul(F32) => e!(rows::silu_and_mul_f32),
            SiluAndMul(F16) => e!(rows::silu_and_mul_f16),
            SiluAndMul(Bf16) => e!(rows::silu_and_mul_bf16),
            Embedding(F32) => e!(rows::embedding_f32),
            Embedding(F16) => e!(rows::embedding_f16),
            Embedding(Bf16) => e!(rows::embedding_bf16),
            ArgmaxF32 => e!(sampling::argmax_f32),
            SampleF32 => e!(sampling::sample_f32),
            MaskLogitsF32 => e!(sampling::mask_logits_f32),
            FillDummy(F32) => e!(rows::fill_dummy_f32),
            FillDummy(F16) => e!(rows::fill_dummy_f16),
            FillDummy(Bf16) => e!(rows::fill_dummy_bf16),
            GpuConformance => e!(conformance::gpu_conformance),
        }
    }

    /// Runs the kernel under the emulator with `args` as a launch passes them.
    pub fn emulate(
        self,
        l: &weave_simt::Launch,
        args: &[crate::gpu::Arg],
    ) -> Result<weave_simt::Stats, weave_simt::EmuError> {
        (self.emu_entry().launch)(l, args)
    }
}

/// Every kernel the PTX must contain.
pub const KERNELS: [Kernel; 49] = {
    use Dtype::*;
    use HeadDim::*;
    use Kernel::*;
    [
        ReshapeAndCache(F32),
        ReshapeAndCache(F16),
        ReshapeAndCache(Bf16),
        PagedAttention(F32, D64),
        PagedAttention(F32, D128),
        PagedAttention(F16, D64),
        PagedAttention(F16, D128),
        PagedAttention(Bf16, D64),
        PagedAttention(Bf16, D128),
        PagedAttentionPipelined(F16, D64),
        PagedAttentionPipelined(F16, D128),
        PagedAttentionPipelined(Bf16, D64),
        PagedAttentionPipelined(Bf16, D128),
        PagedAttentionMma(F16, D64),
        PagedAttentionMma(F16, D128),
        PagedAttentionMma(Bf16, D64),
        PagedAttentionMma(Bf16, D128),
        PagedDecode(F16, D64),
        PagedDecode(F16, D128),
        PagedDecode(Bf16, D64),
        PagedDecode(Bf16, D128),
        AttentionReduce(F32, D64),
        AttentionReduce(F32, D128),
        AttentionReduce(F16, D64),
        AttentionReduce(F16, D128),
        AttentionReduce(Bf16, D64),
        AttentionReduce(Bf16, D128),
        RmsNorm(F32),
        RmsNorm(F16),
        RmsNorm(Bf16),
        FusedAddRmsNorm(F32),
        FusedAddRmsNorm(F16),
        FusedAddRmsNorm(Bf16),
        RotaryEmbedding(F32),
        RotaryEmbedding(F16),
        RotaryEmbedding(Bf16),
        SiluAndMul(F32),
        SiluAndMul(F16),
        SiluAndMul(Bf16),
        Embedding(F32),
        Embedding(F16),
        Embedding(Bf16),
        ArgmaxF32,
        SampleF32,
        MaskLogitsF32,
        FillDummy(F32),
        FillDummy(F16),
        FillDummy(Bf16),
        GpuConformance,
    ]
};

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::format;

    #[test]
    fn names_follow_kind_type_and_head_size_and_are_unique() {
        for (i, k) in KERNELS.iter().enumerate() {
            assert_eq!(k.index(), i);
            let want = match *k {
                Kernel::ReshapeAndCache(t) => format!("reshape_and_cache_{}", t.name()),
                Kernel::PagedAttention(t, d) => format!("paged_attention_{}_d{}", t.name(), d.get()),
                Kernel::PagedAttentionPipelined(t, d) => format!("paged_attention_pipelined_{}_d{}", t.name(), d.get()),
                Kernel::PagedAttentionMma(t, d) => format!("paged_attention_mma_{}_d{}", t.name(), d.get()),
                Kernel::PagedDecode(t, d) => format!("paged_decode_{}_d{}", t.name(), d.get()),
                Kernel::AttentionReduce(t, d) => format!("attention_reduce_{}_d{}", t.name(), d.get()),
                Kernel::RmsNorm(t) => format!("rms_norm_{}", t.name()),
                Kernel::FusedAddRmsNorm(t) => format!("fused_add_rms_norm_{}", t.name()),
                Kernel::RotaryEmbedding(t) => format!("rotary_embedding_{}", t.name()),
                Kernel::SiluAndMul(t) => format!("silu_and_mul_{}", t.name()),
                Kernel::Embedding(t) => format!("embedding_{}", t.name()),
                Kernel::ArgmaxF32 => "argmax_f32".into(),
                Kernel::SampleF32 => "sample_f32".into(),
                Kernel::MaskLogitsF32 => "mask_logits_f32".into(),
                Kernel::FillDummy(t) => format!("fill_dummy_{}", t.name()),
                Kernel::GpuConformance => "gpu_conformance".into(),
            };
            assert_eq!(k.name(), want);
            // The emulated body behind each entry is the kernel of that name.
            assert_eq!(k.emu_entry().name, k.name());
            assert!(KERNELS[..i].iter().all(|o| o.name() != k.name()), "{} twice", k.name());
        }
        assert_eq!(HeadDim::of(96), None);
        assert_eq!(HeadDim::of(128).map(HeadDim::get), Some(128));
    }
}
