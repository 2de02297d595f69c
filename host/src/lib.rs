//! weave's host: the engine loop, backends, and the commands built on them.
//!
//! **Owns**, by folder (data flows down this list, never back up):
//! - [`engine`]: the loop, the [`engine::Backend`] trait, the step log and its summary;
//! - [`backends`]: null, sim, cpu and cuda, each one `Backend` implementation;
//! - [`model`]: GGUF, dequantization, config, weights, tokenizer, chat template, the Llama
//!   pass written once over [`model::llama::LayerOps`], named shapes and dummy weights;
//! - [`sampling`]: greedy, temperature, top-k, top-p with per-request seeds, and the
//!   per-request sampler state a backend keeps;
//! - drivers over the engine: [`generate`] (real generation), [`replay`] (traces, no model);
//! - [`structured`]: structured outputs (llguidance constraints, their token masks, tool
//!   calls), used by the engine and the server;
//! - [`serve`]: the OpenAI-compatible server and the serving benchmark client;
//! - [`workload`]: seeded arrivals and length distributions (simulator and serving bench);
//! - [`study`]: the analyzer and plots, the simulator and its cost models, the profiler, the
//!   experiments and the generation benchmark.
//!
//! The `weave` binary (`src/main.rs`, `src/cli/`) parses arguments and calls into these.
//!
//! **Must not**: put scheduling policy in a backend, or reach into scheduler state from one:
//! a backend sees only the [`weave_scheduler::ScheduledBatch`].

pub mod backends;
pub mod engine;
pub mod generate;
pub mod model;
pub mod paths;
pub mod replay;
pub mod sampling;
pub mod serve;
pub mod structured;
pub mod study;
pub mod workload;
