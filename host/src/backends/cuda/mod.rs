//! The CUDA side of weave: find a GPU at run time (cudarc loads libcuda dynamically, so this
//! builds and runs where there is none), load the PTX that `cargo xtask build-ptx` wrote, and
//! launch weave's kernels with the grid each one expects. One file a job:
//! - `error`: what can go wrong, as one typed error;
//! - `device`: whether there is a usable GPU, and the CLI's `--device` choice;
//! - `ptx`: where the PTX is looked for, loading it, its functions by [`Kernel`];
//! - `dtype`: the bridge between the kernels' element types and device buffers;
//! - `launch`: one wrapper a kernel, with the grid `kernels-gpu` documents.
//!
//! Status: the kernels and these launch wrappers are exercised by `tests/tests/cuda_kernels.rs`
//! against the CPU reference when a GPU is present; the model-level CUDA backend (weights,
//! cuBLAS GEMMs, device KV cache, `--device cuda`) is not written yet. It is to implement
//! `model::llama::LayerOps` on device buffers, as the CPU backend does on host vectors.

mod device;
mod dtype;
mod error;
mod launch;
mod ptx;

pub use device::{describe_device, no_gpu_reason};
pub use dtype::DevElem;
pub use error::CudaError;
pub use ptx::{ptx_dirs, Kernels};
pub use weave_kernels_gpu::Kernel;
