//! weave's device code and the portable math it shares with the CPU backend.
//!
//! **Owns**: the CUDA kernels (compiled to PTX by `cargo xtask build-ptx`) and the per-row math
//! they are made of: online softmax and the merge of partial results, paged attention's tiling,
//! RMSNorm, rotary embedding, SiLU-and-multiply, argmax, and the f16/bf16 conversions.
//!
//! **Must not**: allocate on the device, print, or depend on host crates. On the host the crate
//! links `std` (for `exp`/`sqrt`, and the host drivers in [`attention`]); on nvptx it is pure `core`.
//! The one exception: on the host, [`gpu`] runs kernels under `weave-simt`, the SIMT emulator.
//!
//! **One kernel source, two machines**: every kernel in [`kernels`] (a family a file) is
//! written over the [`gpu`] seam, so the same body is a PTX entry point and, on the host,
//! `name::launch(&Launch, ...)` under the emulator (tests/tests/emu_kernels.rs).
//!
//! # Kernels (see [`KERNELS`], the typed table; `T` is `f32`, `f16` or `bf16`)
//!
//! | kernel | grid × block | work per thread block | global traffic per token |
//! |---|---|---|---|
//! | `reshape_and_cache_T` | tokens × 128 | copy one token's K and V rows (all KV heads) to its slot | 2 × 2·Hkv·D·sizeof(T) (read + write) |
//! | `paged_attention_T_dD` | tiles × KV heads × splits, 128 (4 warps) | ≤16 query rows (tile tokens × GQA group) against one split's KV blocks | K+V of the visible context once per tile and KV head |
//! | `paged_attention_pipelined_T_dD` (16-bit `T`) | as `paged_attention` | the same, with the next KV block held in registers (16-byte loads) during the current block's math, staging sized by the block size | as `paged_attention` |
//! | `paged_attention_mma_T_dD` (16-bit `T`) | chunk tiles × q heads, 128 (4 warps) | 64 query tokens of one head on tensor cores (mma.sync m16n8k16; FlashAttention-2's loop, 16 keys a step) | K+V of the visible context once per tile and q head |
//! | `paged_decode_T_dD` (16-bit `T`) | decode tiles × q heads × splits, 128 (4 warps) | one decode row of one head: warps take KV blocks in turn, `d/8` lanes a key row (one 16-byte load each of K and V), shuffles sum the dot, online softmax per warp, warps merged in shared memory | K+V of the context once per q head (L2 serves the group) |
//! | `attention_reduce_T_dD` | tokens × q heads × 32 | merge the splits' (m, l, acc) rows | splits × (D+2) × 4 B |
//! | `rms_norm_T`, `fused_add_rms_norm_T` | tokens × 128 | one hidden row: sum of squares (warp shuffles + shared), scale | 2–4 × hidden × sizeof(T) |
//! | `rotary_embedding_T` | tokens × 128 | rotate every (q and k) head's pairs using the cos/sin cache row | (Hq+Hkv)·D × 2 × sizeof(T) |
//! | `silu_and_mul_T` | tokens × 128 | `silu(gate) * up` over the intermediate row | 3 × I × sizeof(T) |
//! | `embedding_T` | tokens × 128 | gather one row of the table | 2 × hidden × sizeof(T) |
//! | `argmax_f32` | rows × 128 | (value, index) reduction over the vocabulary | vocab × 4 B |
//! | `sample_f32` | rows × 128 | temperature, top-k, top-p and a seeded draw ([`sample`]), the token's logprob | vocab × 4 B × (3 + up to 64 bisection passes) |
//! | `mask_logits_f32` | rows × 128 | structured outputs: `-inf` where the row's packed token mask (one bit a token) clears it; rows without a mask return at once | vocab × 4 B read, vocab / 8 B of mask |
//! | `fill_dummy_T` | grid-stride, 128 | dummy weights from a seed ([`sample::dummy_value`]) | n × sizeof(T) written |
//!
//! **Paged attention.** A tile is up to `16 / group` query tokens of one sequence. For every
//! KV block of its split, the thread block stages K (padded row stride D+1, so the 32 lanes
//! reading 32 keys hit 32 banks) and V for its KV head in shared memory as f32. Then each
//! warp processes its query rows: lane `t` scores key `t` of the block against the row's
//! scaled query (staged in shared memory), shuffles find the block max and the sum of the
//! probabilities, and each lane updates its D/32 output dims with the probabilities
//! broadcast by `shfl.idx`. Causal masking is per row: query `i` of a sequence with
//! `ctx` cached tokens sees keys `< ctx + i + 1`, so prefill chunks, chunks that start
//! mid-block and decodes (one query row) all take one path. Decode fills the GPU through
//! the split grid dimension (flash-decoding): with `blocks_per_split = B`, a sequence of
//! `n` blocks gives `ceil(n / B)` thread blocks per KV head, merged by `attention_reduce`.
//! Shared memory: (16·D + 32·(D+1) + 32·D) × 4 B = 40.5 KiB at D = 128.
//!
//! **Roofline.** Decode attention is bandwidth-bound: per sequence and KV head it reads
//! 2·ctx·D·sizeof(T) bytes for 4·ctx·D·group FLOPs (arithmetic intensity `group` FLOP/B at
//! f16), far under an H100/H200's ~300 FLOP/B ridge. The target is therefore the copy bandwidth:
//! ≥80% of device-to-device memcpy at 64 sequences × 4096 context (the CUDA backend's
//! `weave bench kernels` measures it). Prefill tiles reuse each staged KV block for
//! `16 / group` tokens × `group` heads = 16 rows, i.e. 16× less KV traffic than per-row
//! attention. They run on CUDA cores in f32, so prefill is compute-bound at the FP32 rate; the
//! tensor-core kernel (`paged_attention_mma_*`) takes chunks' rows onto mma.sync instead.
//! The pipelined and tensor-core kernels are opt-in (`WEAVE_ATTN_KERNEL`) until measured on a
//! GPU.
//! The elementwise kernels are pure bandwidth: their bytes per token are in the table.

#![no_std]
#![cfg_attr(target_arch = "nvptx64", feature(abi_ptx, stdarch_nvptx, link_llvm_intrinsics, asm_experimental_arch))]
#![cfg_attr(target_arch = "nvptx64", allow(internal_features))]

#[cfg(not(target_arch = "nvptx64"))]
extern crate std;

pub mod attention;
pub mod elem;
pub mod fmath;
pub mod kernel;
pub mod ops;
pub mod sample;
pub mod softmax;

/// The target seam the ported kernels are written over.
pub mod gpu;
pub mod kernels;

pub use attention::AttnShape;
pub use elem::{Bf16, Elem, F16};

/// `a / b` (`b != 0`). On the device there is no panic path to link, so the zero check is
/// dropped there; on the host a zero still panics.
#[inline(always)]
pub fn udiv(a: u32, b: u32) -> u32 {
    if cfg!(target_arch = "nvptx64") {
        // SAFETY: every caller divides by a launch parameter the host checked to be non-zero.
        unsafe { a.checked_div(b).unwrap_unchecked() }
    } else {
        a / b
    }
}

/// `a % b` (`b != 0`); see [`udiv`].
#[inline(always)]
pub fn urem(a: u32, b: u32) -> u32 {
    if cfg!(target_arch = "nvptx64") {
        // SAFETY: as for `udiv`.
        unsafe { a.checked_rem(b).unwrap_unchecked() }
    } else {
        a % b
    }
}

/// `ceil(a / b)` (`b != 0`); see [`udiv`].
#[inline(always)]
pub fn udiv_ceil(a: u32, b: u32) -> u32 {
    udiv(a, b) + u32::from(urem(a, b) != 0)
}

/// `sum_d q[d] * k[d]`, with `k` converted from its storage type.
#[cfg(not(target_arch = "nvptx64"))]
#[inline(always)]
pub fn dot_f32_elem<T: Elem>(q: &[f32], k: &[T]) -> f32 {
    // Eight independent partial sums: the compiler can keep them in one vector register
    // (a single running sum is a serial chain it may not reorder).
    let mut acc = [0.0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for i in 0..8 {
            acc[i] += a[i] * b[i].to_f32();
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (a, b) in qr.iter().zip(kr) {
        s += a * b.to_f32();
    }
    s
}

pub use kernel::{Dtype, HeadDim, Kernel, LaunchDims, KERNELS};

/// Threads per block of every kernel except `attention_reduce` (one warp).
pub const BLOCK_THREADS: u32 = 128;

/// Dynamic shared memory (bytes) `paged_attention_pipelined_*_d{head_dim}` needs for KV
/// blocks of `block_size` tokens (its staging is sized by the launch's block size).
pub const fn attention_smem_bytes_for(head_dim: u32, block_size: u32) -> u32 {
    (attention::ROWS_PER_TILE * head_dim + block_size * (head_dim + 1) + block_size * head_dim) * 4
}

/// Dynamic shared memory (bytes) `paged_attention_*_d{head_dim}` needs.
pub const fn attention_smem_bytes(head_dim: u32) -> u32 {
    (attention::ROWS_PER_TILE * head_dim
        + attention::MAX_BLOCK_SIZE * (head_dim + 1)
        + attention::MAX_BLOCK_SIZE * head_dim)
        * 4
}

#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // Kernels are written not to panic (no slice indexing on the device); this only
    // satisfies no_std. `trap` aborts the kernel if it ever happens.
    unsafe { core::arch::nvptx::trap() }
}
