//! `weave serve`: an OpenAI-compatible HTTP server over the engine, and `weave bench serve`,
//! a load generator for any OpenAI-compatible server.
//!
//! - [`core`]: the engine thread, fed by a bounded channel of new sequences and an
//!   unbounded one of aborts; each sequence's tokens go back on its own channel;
//! - [`http`]: axum routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
//!   `/health`, `/metrics`, `/tokenize`, `/detokenize`), request checking, SSE streams;
//! - [`openai`]: the wire types; [`metrics`]: Prometheus metrics under vLLM's names (with a
//!   `weave:` prefix, or vLLM's own with `--metrics-prefix vllm`);
//! - the worker contract of vLLM's router (`/get_load`, `/v1/completions/render`,
//!   `/v1/chat/completions/render`, `/tokenize` with `messages`) and sglang-router's small
//!   info endpoints, so that replicas run behind either (see docs/SCALING.md);
//! - [`bench`](mod@bench): the serving benchmark client.
//!
//! Serving drives the same engine as every other command: the scheduler and the backend do
//! not know an HTTP request from a line of a trace.

pub mod bench;
pub mod core;
pub mod http;
pub mod metrics;
pub mod openai;

use crate::backends::cpu::CpuBackend;
use crate::engine::steplog::StepLogWriter;
use crate::engine::{Clock, Engine};
use crate::generate::LoadedModel;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use weave_scheduler::{Scheduler, SchedulerConfig};

/// How a server is set up, beyond the model and the scheduler.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub sched: SchedulerConfig,
    pub threads: usize,
    /// Seed for requests that bring none.
    pub seed: u64,
    /// The name clients use (`model`); a request for another gets 404.
    pub model_name: String,
    /// Most sequences waiting (queued or in the scheduler's queue) before new ones get 429.
    pub max_waiting: usize,
    /// Most samples (`n`) per request.
    pub max_n: usize,
    /// Where the model runs; on a GPU the KV cache takes what `gpu_memory_utilization` leaves,
    /// replacing `sched.num_gpu_blocks`.
    pub device: crate::backends::cuda::ExecDevice,
    pub gpu_memory_utilization: f64,
    pub enforce_eager: bool,
    /// Metric names are `{metrics_prefix}:...`: `weave` by default, `vllm` for vLLM's exact
    /// names (what the Kubernetes inference gateway and llm-d scrape).
    pub metrics_prefix: String,
}

/// The model's name as served, by default: its file name without `.gguf`.
pub fn default_model_name(lm: &LoadedModel) -> String {
    let f = lm.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    f.strip_suffix(".gguf").map(String::from).unwrap_or(f)
}

/// Starts the engine thread on the CPU backend and builds what the handlers share.
/// The cache's layout follows the scheduler's KV groups ([`crate::model::config::KvLayout::for_groups`]).
pub fn start_cpu(lm: &LoadedModel, cfg: &ServeConfig, step_log: StepLogWriter) -> anyhow::Result<Arc<http::App>> {
    let backend = CpuBackend::for_sched(lm.model.clone(), &cfg.sched, cfg.threads, cfg.seed)?;
    start_with(lm, cfg, backend, step_log)
}

/// Starts the engine thread on `cfg.device`'s backend. Returns the app and the scheduler
/// config it runs (on a GPU, with the KV blocks the device's memory holds), with a line
/// describing the GPU when there is one.
pub fn start(
    lm: &LoadedModel,
    cfg: &ServeConfig,
    step_log: StepLogWriter,
) -> anyhow::Result<(Arc<http::App>, SchedulerConfig, Option<String>)> {
    match cfg.device {
        crate::backends::cuda::ExecDevice::Cpu => {
            anyhow::ensure!(!lm.model.w.on_device_only(), "dummy weights left for the GPU cannot run on the CPU");
            Ok((start_cpu(lm, cfg, step_log)?, cfg.sched.clone(), None))
        }
        crate::backends::cuda::ExecDevice::Cuda | crate::backends::cuda::ExecDevice::Emu => {
            let be = crate::generate::cuda_backend_for(
                lm,
                cfg.device,
                &cfg.sched,
                cfg.gpu_memory_utilization,
                cfg.enforce_eager,
                false,
                cfg.seed,
            )?;
            let describe = be.describe();
            let cfg = ServeConfig {
                sched: SchedulerConfig { num_gpu_blocks: be.num_blocks(), ..cfg.sched.clone() },
                ..cfg.clone()
            };
            Ok((start_with(lm, &cfg, be, step_log)?, cfg.sched, Some(describe)))
        }
    }
}

fn start_with<B: crate::engine::Backend + Send + 'static>(
    lm: &LoadedModel,
    cfg: &ServeConfig,
    backend: B,
    step_log: StepLogWriter,
) -> anyhow::Result<Arc<http::App>> {
    let mut engine = Engine::new(Scheduler::new(cfg.sched.clone())?, backend, Clock::Seconds);
    // A server runs for days: its step records go to the log, never into memory.
    engine.keep_steps = step_log.is_open();
    let t0 = std::time::Instant::now();
    let guides = lm.guides().map_err(|e| format!("{e:#}"));
    match &guides {
        Ok(f) => {
            let workers = crate::structured::masks::default_workers(cfg.threads);
            engine.enable_guides(f, workers);
            eprintln!(
                "weave serve: structured outputs ready ({} tokens in the trie, {:.0} ms; {workers} mask worker(s))",
                f.vocab_size(),
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        Err(e) => eprintln!("weave serve: structured outputs unavailable: {e}"),
    }
    let cache = metrics::CacheInfo {
        block_size: cfg.sched.block_size,
        num_gpu_blocks: cfg.sched.num_gpu_blocks,
        cache_dtype: match cfg.device {
            crate::backends::cuda::ExecDevice::Cpu => lm.model.kv_dtype.name().to_string(),
            crate::backends::cuda::ExecDevice::Cuda | crate::backends::cuda::ExecDevice::Emu => "auto".to_string(),
        },
        enable_prefix_caching: cfg.sched.enable_prefix_caching,
    };
    let metrics = Arc::new(metrics::Metrics::new(&cfg.model_name, &cfg.metrics_prefix, &cache)?);
    let tokenizer = Arc::new(lm.tokenizer.clone());
    let handle = core::EngineHandle::spawn(engine, tokenizer.clone(), metrics.clone(), step_log, cfg.max_waiting)?;
    Ok(Arc::new(http::App {
        engine: handle,
        tokenizer,
        chat: lm.chat.clone(),
        model_name: cfg.model_name.clone(),
        sched: cfg.sched.clone(),
        device: match cfg.device {
            crate::backends::cuda::ExecDevice::Cpu => "cpu",
            crate::backends::cuda::ExecDevice::Cuda => "cuda",
            crate::backends::cuda::ExecDevice::Emu => "emu",
        },
        metrics,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        max_n: cfg.max_n,
        next_request: AtomicU64::new(0),
        guides,
    }))
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops taking requests (503),
/// lets the running ones finish for up to `drain_timeout`, aborts what is left and returns.
pub async fn serve_until(
    app: Arc<http::App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, http::router(app.clone())).with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    let in_flight = app.engine.stats.running.load(std::sync::atomic::Ordering::SeqCst)
        + app.engine.stats.waiting.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "weave serve: shutting down; draining {in_flight} request(s) (up to {:.0} s)",
        drain_timeout.as_secs_f64()
    );
    app.engine.drain();
    let a = app.clone();
    let drained = tokio::task::spawn_blocking(move || a.engine.wait_stopped(drain_timeout)).await?;
    if !drained {
        eprintln!("weave serve: drain timed out; aborting what is left");
    }
    let a = app.clone();
    let engine_result = tokio::task::spawn_blocking(move || a.engine.stop()).await?;
    // The engine is gone, so every stream has ended; connections close as they finish.
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(r) => r??,
        Err(_) => eprintln!("weave serve: connections still open after 5 s; closing them"),
    }
    engine_result
}
