//! Every kernel, written over the [`gpu`](crate::gpu) seam, a family a file: each builds for
//! the GPU (PTX entry points) and for the host (the same bodies under the SIMT emulator, as
//! `name::launch(&Launch, args...)`).

// Index loops over small fixed arrays are how the kernels keep per-lane state in registers
// (each unrolled index is a constant); iterator forms hide that from the reader.
#![allow(clippy::needless_range_loop)]

pub mod attention;
pub mod conformance;
pub mod decode;
pub mod mma;
pub mod norm;
pub(crate) mod reduce;
pub mod rows;
pub mod sampling;
