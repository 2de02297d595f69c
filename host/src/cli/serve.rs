//! `weave serve`: the OpenAI-compatible server.

use super::*;
use std::time::Duration;

/// Serve the model over an OpenAI-compatible HTTP API (completions and chat, streamed or
/// not), with Prometheus metrics at /metrics.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The name clients give as `model` (default: the GGUF file name without .gguf).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most sequences waiting to run before new requests get 429.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// On SIGINT/SIGTERM, how long running requests may take to finish (seconds).
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Most samples (`n`) one request may ask for.
    #[arg(long, default_value_t = 16)]
    pub max_n: usize,
    /// Seed for requests that bring none.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Metric names at /metrics are PREFIX:name; `vllm` gives vLLM's exact names, which the
    /// Kubernetes inference gateway and llm-d read without configuration.
    #[arg(long, default_value = "weave")]
    pub metrics_prefix: String,
    #[command(flatten)]
    pub sched: SchedArgs,
    #[command(flatten)]
    pub run: ModelArgs,
    /// Write the per-step JSONL here (for `weave analyze`).
    #[arg(long)]
    pub step_log: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.shutdown_timeout >= 0.0, "--shutdown-timeout must be >= 0, got {}", a.shutdown_timeout);
    anyhow::ensure!(a.max_waiting >= 1, "--max-waiting must be at least 1");
    weave::serve::metrics::check_prefix(&a.metrics_prefix)?;
    let (lm, _path, (exec, device)) = a.run.load(&a.sched.kv_cache_dtype, true)?;
    let cfg = weave::serve::ServeConfig {
        sched: a.sched.config(&lm.model)?,
        threads: a.run.threads,
        seed: a.seed,
        model_name: a.served_model_name.unwrap_or_else(|| weave::serve::default_model_name(&lm)),
        max_waiting: a.max_waiting,
        max_n: a.max_n.max(1),
        device: exec,
        gpu_memory_utilization: a.run.gpu_memory_utilization,
        enforce_eager: a.run.enforce_eager,
        metrics_prefix: a.metrics_prefix,
    };
    let log = StepLog::open(a.step_log.as_deref())?;
    let (app, sched, gpu) = weave::serve::start(&lm, &cfg, log)?;
    if let Some(g) = gpu {
        eprintln!("weave serve: {g}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener =
            tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!(
            "weave serve: {} on http://{} (device {device}, {} threads, KV cache {}, max_model_len {})",
            cfg.model_name,
            listener.local_addr()?,
            a.run.threads,
            super::kv_cache_phrase(&sched),
            sched.max_model_len
        );
        weave::serve::serve_until(app, listener, shutdown_signal(), Duration::from_secs_f64(a.shutdown_timeout)).await
    })?;
    eprintln!("weave serve: stopped");
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = int.await;
                return;
            }
        };
        tokio::select! {
            _ = int => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = int.await;
    }
}
