//! Backends: each one [`crate::engine::Backend`] implementation, and nothing else knows which ran.
//!
//! - [`null`]: a synthetic token per sampling row; time counted in steps (trace replay);
//! - [`sim`]: no model, a cost model's step time (the simulator);
//! - [`cpu`]: the real model on the CPU;
//! - [`cuda`]: the GPU kernels (the model-level CUDA backend is not written yet).

pub mod cpu;
pub mod cuda;
pub mod null;
pub mod sim;
