//! `weave bench kernels`: paged attention on the GPU over the kernels issue's shapes, with the
//! roofline and PyTorch SDPA measured in the same run.

use super::*;
use weave::study::kernel_bench;

/// Time the paged attention kernel on the GPU over decode, prefill and mixed shapes, with the
/// device's copy bandwidth and GEMM rate measured in the same run, and PyTorch's SDPA
/// (FlashAttention-2 and cuDNN) on the same shapes where Python with PyTorch is there.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One decode context per batch size and the smaller prefills.
    #[arg(long)]
    pub quick: bool,
    /// Element type: float16 or bfloat16.
    #[arg(long, default_value = "float16", value_parser = ["float16", "bfloat16"])]
    pub dtype: String,
    /// Timed launches per shape (the median is kept).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// The PyTorch baseline script (skipped when python3 or torch is missing).
    #[arg(long, default_value = "tools/gpu/sdpa_bench.py")]
    pub torch_script: PathBuf,
    /// No PyTorch baseline.
    #[arg(long)]
    pub no_torch: bool,
    /// Print the shapes with their bytes and FLOPs, and the JSON the PyTorch script reads;
    /// time nothing (needs no GPU).
    #[arg(long)]
    pub dry_run: bool,
    /// Also write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let shapes = kernel_bench::shapes(a.quick);
    let elem = 2;
    if a.dry_run {
        println!("{:<28} {:>7} {:>6} {:>10} {:>10}", "shape", "tokens", "seqs", "MB moved", "GFLOP");
        for s in &shapes {
            println!(
                "{:<28} {:>7} {:>6} {:>10.1} {:>10.2}",
                s.name,
                s.num_tokens(),
                s.seqs.len(),
                s.bytes(elem) / 1e6,
                s.flops() / 1e9
            );
        }
        println!("{}", serde_json::to_string(&shapes)?);
        return Ok(());
    }
    if let Some(why) = weave::backends::cuda::no_gpu_reason() {
        anyhow::bail!("weave bench kernels needs a GPU: {why} (--dry-run prints the shapes without one)");
    }
    let k = weave::backends::cuda::Kernels::load(0)?;
    let ceil = weave::backends::cuda::roofline::measure(&k)?;
    eprintln!("{} ({}), {} SMs", k.name, k.arch, k.num_sms);
    let dtype = if a.dtype == "bfloat16" { weave_kernels_gpu::Dtype::Bf16 } else { weave_kernels_gpu::Dtype::F16 };
    let bar = indicatif::ProgressBar::new(shapes.len() as u64);
    let mut rows = kernel_bench::run(&k, &shapes, dtype, a.iters, ceil.copy_gbs, ceil.gemm_tflops, &mut |name| {
        bar.set_message(name.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    drop(k);
    if !a.no_torch {
        // PyTorch's shapes exclude the mixed batch: SDPA has no varlen paged form.
        let torch_shapes: Vec<_> = shapes.iter().filter(|s| s.kind != kernel_bench::Kind::Mixed).cloned().collect();
        match kernel_bench::torch_baseline(&a.torch_script, &torch_shapes, &a.dtype) {
            Ok(t) => {
                for r in &mut rows {
                    if let Some(x) = t.iter().find(|x| x.name == r.shape) {
                        r.torch_flash_us = x.flash_us;
                        r.torch_cudnn_us = x.cudnn_us;
                    }
                }
            }
            Err(e) => eprintln!("skipped: the PyTorch baseline ({e})"),
        }
    }
    print!("{}", kernel_bench::table(&rows, ceil.copy_gbs, ceil.gemm_tflops));
    if let Some(p) = &a.json {
        let v = serde_json::json!({"ceilings": ceil, "rows": rows});
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
