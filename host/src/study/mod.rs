//! Studying and tuning the engine: the step-log analyzer and its plots, the simulator and its
//! cost models, the profiler, the experiments and the generation benchmark. These drive the
//! engine; the engine never imports them.

pub mod analyze;
pub mod bench;
pub mod experiments;
pub mod kernel_bench;
pub mod logits;
pub mod plot;
pub mod profile;
pub mod sim;
pub mod sim_vs_real;
