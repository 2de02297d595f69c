//! The CUDA side of weave: find a GPU at run time (cudarc loads libcuda dynamically, so this
//! builds and runs where there is none), load the PTX that `cargo xtask build-ptx` wrote, and
//! launch weave's kernels with the grid each one expects. One file a job:
//! - `error`: what can go wrong, as one typed error;
//! - `dev`: the one seam between the backend and a device (memory, copies, a launch by
//!   [`Kernel`], GEMM, events, graphs), implemented by `cudarc_dev` (a GPU: cudarc's driver
//!   API and cuBLAS) and `emu` (the SIMT emulator, GEMMs on the CPU): `--device emu` runs the
//!   whole backend in `cargo test`;
//! - `device`: whether there is a usable GPU, and the CLI's `--device` choice;
//! - `ptx`: where the PTX is looked for, and `Kernels`, the kernels on a device;
//! - `dtype`: the bridge between the kernels' element types and device buffers;
//! - `launch`: one wrapper a kernel, with the grid `kernels-gpu` documents, and the choice of
//!   attention kernel (`AttnKernel`);
//! - `roofline`: the device's copy bandwidth and GEMM rate, measured in the run that quotes them;
//! - `model`: the model backend, `model::llama::LayerOps` on device buffers (cuBLAS GEMMs,
//!   the kernels above, the KV cache in device memory, CUDA graphs for decode steps, sampling
//!   on the device).
//!
//! Status: the first kernels and these launch wrappers were checked on an H200 by
//! `tests/tests/cuda_kernels.rs`. Every kernel and the model backend's whole pass (all but
//! cuBLAS and CUDA graphs, which the device seam leaves to cudarc) run on the SIMT emulator in
//! `cargo test`, against the CPU backend; the newer kernels and the model backend have not run
//! on a GPU yet (issue 22's proof).

mod cudarc_dev;
pub mod dev;
mod device;
mod dtype;
pub mod emu;
#[cfg(test)]
mod emu_pass_tests;
mod error;
mod launch;
pub mod model;
mod ptx;
pub mod roofline;

pub use dev::{DBuf, DView, Device};
pub use device::{choose_device, no_gpu_reason, ExecDevice};
pub use dtype::DevElem;
pub use error::CudaError;
pub use launch::{AttnKernel, AttnMeta};
pub use ptx::{ptx_dirs, Kernels, EMU_MEMORY};
pub use weave_kernels_gpu::Kernel;
