//! weave's host: the engine loop, backends, and the commands built on them.
//!
//! **Owns**: the engine loop ([`engine`]), backends behind one trait ([`backend`]: null,
//! sim, [`cpu`], [`cuda`] kernels), the model files ([`model`]), generation ([`generate`]),
//! trace replay ([`trace`], [`replay`]), the step log and its batch-composition summary
//! ([`steplog`], [`analyze`]), the simulator and its cost models ([`sim`]: roofline and
//! log-fitted; [`profile`]: measured on designed batches), the experiments
//! ([`experiments`]), and the `weave` CLI on top.
//!
//! **Must not**: put scheduling policy in a backend, or reach into scheduler state from one:
//! a backend sees only the [`weave_scheduler::ScheduledBatch`].

pub mod analyze;
pub mod backend;
pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod experiments;
pub mod generate;
pub mod model;
pub mod paths;
pub mod plot;
pub mod profile;
pub mod replay;
pub mod sampling;
pub mod sim;
pub mod steplog;
pub mod trace;
