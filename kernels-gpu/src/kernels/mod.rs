//! Kernels written over the [`gpu`](crate::gpu) seam, a family a file: each builds for the
//! GPU (PTX entry points) and for the host (the same bodies under the SIMT emulator).

pub mod norm;
pub(crate) mod reduce;
