//! Backends: each one [`crate::engine::Backend`] implementation, and nothing else knows which ran.
//!
//! - [`null`]: a synthetic token per sampling row; time counted in steps (trace replay);
//! - [`sim`]: no model, a cost model's step time (the simulator);
//! - [`cpu`]: the real model on the CPU;
//! - [`cuda`]: the model through weave's GPU kernels, on a GPU (cudarc) or on the SIMT
//!   emulator (`--device emu`), behind one device seam.

pub mod cpu;
pub mod cuda;
pub mod null;
pub mod sim;
