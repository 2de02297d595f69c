//! `weave experiment`: Run a tuning experiment on the simulator: batch-size, prefill-cap, chunked-prefill,

use super::*;

/// Run a tuning experiment on the simulator: batch-size, prefill-cap, chunked-prefill,
/// static-vs-continuous, adaptive, or all; or sim-vs-real (the simulator checked against
/// the real CPU backend with the reference model).
#[derive(Debug, clap::Args)]
pub struct Args {
    pub name: String,
    #[command(flatten)]
    pub sim: SimArgs,
    /// Requests per run (simulator: 2000, --quick 400; cpu: 24, --quick 6).
    #[arg(long)]
    pub num_requests: Option<usize>,
    #[arg(long)]
    pub quick: bool,
    /// sim (the GPU profile's cost model), cpu (the real reference model on this machine, at
    /// small sizes) or cuda (the model --model or --load-format dummy --model-config names,
    /// on the GPU, at the simulator's sizes).
    #[arg(long, default_value = "sim")]
    pub backend: String,
    /// The model for --backend cuda (and its device settings).
    #[command(flatten)]
    pub run: ModelArgs,
    /// Output directory (one sub-directory per experiment).
    #[arg(long, default_value = "docs/experiments")]
    pub out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { name, sim, num_requests, quick, backend, out, run } = a;
    if name == "sim-vs-real" && backend == "cuda" {
        let (lm, _path, (_, desc)) = ModelArgs { device: "cuda".into(), ..run.clone() }.load("auto", true)?;
        let sched = weave_scheduler::SchedulerConfig {
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            max_model_len: 8192.min(lm.model.cfg.context_length),
            block_size: 16,
            ..Default::default()
        };
        let mut be = run.cuda_backend(&lm, &sched)?;
        eprintln!("sim-vs-real on {desc}");
        let gpu = weave::study::sim::find_gpu(&sim.gpu).map_err(anyhow::Error::msg)?;
        // The roofline's model: the dummy's shape, else --model-profile.
        let shape = run.model_config.clone().unwrap_or_else(|| sim.model_profile.clone());
        let model = weave::study::sim::find_model(&shape).map_err(anyhow::Error::msg)?;
        let r = weave::study::experiments::sim_vs_real_gpu(&lm, &mut be, gpu, model, quick)?;
        r.write(&out.join("cuda-sim-vs-real"))?;
        print!("{}", weave::study::experiments::markdown(&r.table));
        return Ok(());
    }
    if name == "sim-vs-real" {
        rayon::ThreadPoolBuilder::new().num_threads(default_threads()).build_global().ok();
        let lm = weave::generate::LoadedModel::load(&weave::paths::default_model_path())?;
        let r = weave::study::sim_vs_real::sim_vs_real(&lm, default_threads(), quick)?;
        r.write(&out.join("sim-vs-real"))?;
        print!("{}", weave::study::experiments::markdown(&r.table));
        return Ok(());
    }
    let names: Vec<&str> = if name == "all" { weave::study::experiments::NAMES.to_vec() } else { vec![name.as_str()] };
    let lm;
    let (mut runner, kv, scale, sub): (Box<dyn weave::study::experiments::Runner>, usize, _, &str) = match backend
        .as_str()
    {
        "sim" => {
            let (cost, kv) = sim.cost()?;
            let scale = weave::study::experiments::Scale::gpu(num_requests.unwrap_or(if quick { 400 } else { 2000 }));
            let r: Box<dyn weave::study::experiments::Runner> = match cost {
                Cost::Roofline(c) => Box::new(weave::study::experiments::SimRunner(c)),
                Cost::Measured(c) => Box::new(weave::study::experiments::SimRunner(c)),
            };
            (r, kv, scale, "")
        }
        "cpu" => {
            rayon::ThreadPoolBuilder::new().num_threads(default_threads()).build_global().ok();
            lm = weave::generate::LoadedModel::load(&weave::paths::default_model_path())?;
            let scale = weave::study::experiments::Scale::cpu(num_requests.unwrap_or(if quick { 6 } else { 24 }));
            (
                Box::new(weave::study::experiments::CpuRunner { lm: &lm, threads: default_threads() }),
                16384,
                scale,
                "cpu-",
            )
        }
        "cuda" => {
            anyhow::ensure!(run.device != "cpu", "--backend cuda runs on the GPU; drop --device cpu");
            let (l, _path, (exec, desc)) = ModelArgs { device: "cuda".into(), ..run.clone() }.load("auto", true)?;
            debug_assert_eq!(exec, weave::backends::cuda::ExecDevice::Cuda);
            lm = l;
            let scale =
                weave::study::experiments::Scale::gpu_real(num_requests.unwrap_or(if quick { 64 } else { 200 }));
            // One backend for every run: the largest budget and batch any experiment uses.
            let sched = weave_scheduler::SchedulerConfig {
                max_num_batched_tokens: 8192,
                max_num_seqs: 256,
                max_model_len: scale.max_model_len.min(lm.model.cfg.context_length),
                block_size: 16,
                ..Default::default()
            };
            let backend = run.cuda_backend(&lm, &sched)?;
            eprintln!("experiments on {desc}");
            let kv = (backend.num_blocks() - 1) * 16;
            (Box::new(weave::study::experiments::CudaRunner { lm: &lm, backend }), kv, scale, "cuda-")
        }
        other => anyhow::bail!("unknown --backend {other:?}; use sim, cpu or cuda"),
    };
    for n in names {
        let t0 = std::time::Instant::now();
        let t = weave::study::experiments::run(n, runner.as_mut(), kv, scale)?;
        let dir = out.join(format!("{sub}{n}"));
        weave::study::experiments::write(&t, &dir)?;
        print!("{}", weave::study::experiments::markdown(&t));
        eprintln!("({n}: {:.1} s; written to {})\n", t0.elapsed().as_secs_f64(), dir.display());
    }
    Ok(())
}
