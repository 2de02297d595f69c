//! `cargo xtask build-ptx`: kernels-gpu -> PTX per arch -> ptxas validation and a resource table.
//!
//! Output: `target/ptx/<arch>/weave_kernels.ptx` (the CUDA backend's default PTX location),
//! and `ptxas.txt` beside it. Fails on a ptxas error, a kernel of
//! `weave_kernels_gpu::KERNELS` missing from the PTX, or spills over `--max-spill-bytes`
//! (default 0: a spill in these kernels means a register-pressure regression worth a look).

use crate::tools::{self, NvptxRust};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GPU architectures to build for (repeatable).
    #[arg(long = "arch", default_values = ["sm_80", "sm_90"])]
    archs: Vec<String>,
    /// Largest spill (store + load bytes) any kernel may have.
    #[arg(long, default_value_t = 0)]
    max_spill_bytes: u64,
    /// Install a missing toolchain or ptxas instead of printing how.
    #[arg(long)]
    install: bool,
}

/// ptxas's figures for one kernel.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KernelStats {
    pub name: String,
    pub registers: u64,
    pub smem_static: u64,
    pub stack: u64,
    pub spill_stores: u64,
    pub spill_loads: u64,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

pub fn run(args: Args) -> Result<()> {
    let rust = match NvptxRust::find() {
        Ok(r) => r,
        Err(why) if args.install => {
            eprintln!("{why}; installing");
            tools::run_install(&tools::RUST_INSTALL.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
            NvptxRust::find().map_err(anyhow::Error::msg)?
        }
        Err(why) => bail!(
            "{why}.\nInstall it with:\n  {}\nor run `cargo xtask build-ptx --install`.",
            tools::RUST_INSTALL.join("\n  ")
        ),
    };
    let ptxas = match tools::find_ptxas() {
        Some(p) => p,
        None if args.install => {
            tools::run_install(&tools::ptxas_install())?;
            tools::find_ptxas().context("ptxas still not found after installing nvidia-cuda-nvcc")?
        }
        None => bail!(
            "ptxas not found (looked at $WEAVE_PTXAS, {}, and PATH).\nInstall it with:\n  {}\nor run `cargo xtask build-ptx --install`.",
            tools::cache_dir().join("nvidia-cuda-nvcc").display(),
            tools::ptxas_install().join("\n  ")
        ),
    };
    let root = workspace_root();
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for arch in &args.archs {
        let ptx = build_one(&rust, &root, arch)?;
        let stats = validate(&ptxas, &ptx, arch)?;
        for k in weave_kernels_gpu::KERNELS {
            if !stats.iter().any(|s| s.name == k.name()) {
                problems.push(format!("{arch}: kernel {} is missing from {}", k.name(), ptx.display()));
            }
        }
        for s in &stats {
            if s.spill_stores + s.spill_loads > args.max_spill_bytes {
                problems.push(format!(
                    "{arch}: {} spills {} + {} bytes (limit {})",
                    s.name, s.spill_stores, s.spill_loads, args.max_spill_bytes
                ));
            }
        }
        println!("{arch}: {} ({} kernels)", ptx.display(), stats.len());
        rows.extend(stats.into_iter().map(|s| (arch.clone(), s)));
    }
    print_table(&rows);
    if !problems.is_empty() {
        bail!("PTX check failed:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// Compiles kernels-gpu for `arch` in its own target dir, returns the PTX's final path.
fn build_one(rust: &NvptxRust, root: &Path, arch: &str) -> Result<PathBuf> {
    let build_dir = root.join("target/ptx-build").join(arch);
    let deps = build_dir.join("nvptx64-nvidia-cuda/release/deps");
    let status = Command::new(&rust.cargo)
        .current_dir(root)
        .env("RUSTC", &rust.rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", &build_dir)
        .env_remove("RUSTFLAGS")
        .args([
            "rustc",
            "--quiet",
            "-p",
            "weave-kernels-gpu",
            "--release",
            "-Zbuild-std=core",
            "--target",
            "nvptx64-nvidia-cuda",
            "--config",
            "profile.release.panic=\"abort\"",
            "--config",
            "profile.release.codegen-units=1",
            "--config",
            "profile.release.debug=false",
            "--",
            "--emit=asm",
        ])
        .arg(format!("-Ctarget-cpu={arch}"))
        // Unroll the kernels' short fixed loops (the tensor-core kernel's 8 and 16 MMA tiles
        // carry inline asm, which LLVM's default cost model refuses to unroll): an array
        // indexed in a rolled loop lives in local memory, not registers.
        .arg("-Cllvm-args=-unroll-threshold=2000")
        .status()
        .with_context(|| format!("cannot run {}", rust.cargo.display()))?;
    if !status.success() {
        bail!("building kernels-gpu for {arch} failed ({status})");
    }
    // The newest matching .s: cargo leaves the file in place when nothing changed, and an
    // older one with another hash may linger after a toolchain change.
    let s = std::fs::read_dir(&deps)
        .with_context(|| format!("reading {}", deps.display()))?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("weave_kernels_gpu-") && n.ends_with(".s")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .with_context(|| format!("no PTX (.s) for weave_kernels_gpu in {}", deps.display()))?;
    let out_dir = root.join("target/ptx").join(arch);
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("weave_kernels.ptx");
    std::fs::copy(&s, &out).with_context(|| format!("copying {} to {}", s.display(), out.display()))?;
    Ok(out)
}

fn validate(ptxas: &Path, ptx: &Path, arch: &str) -> Result<Vec<KernelStats>> {
    let out = Command::new(ptxas)
        .args(["-v", &format!("-arch={arch}")])
        .arg(ptx)
        .args(["-o", "/dev/null"])
        .output()
        .with_context(|| format!("cannot run {}", ptxas.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    std::fs::write(ptx.with_file_name("ptxas.txt"), &text)?;
    if !out.status.success() {
        bail!("ptxas rejected {} for {arch}:\n{text}", ptx.display());
    }
    Ok(parse_ptxas(&text))
}

/// Parses `ptxas -v` output into per-kernel figures.
pub fn parse_ptxas(text: &str) -> Vec<KernelStats> {
    let mut out: Vec<KernelStats> = Vec::new();
    let num_before = |line: &str, unit: &str| -> Option<u64> {
        let i = line.find(unit)?;
        line[..i].trim_end().rsplit([' ', ',']).next()?.parse().ok()
    };
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelStats { name, ..Default::default() });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains(" registers") {
                k.registers = num_before(line, "registers").unwrap_or(0);
                k.smem_static = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

fn dynamic_smem(kernel: &str) -> u32 {
    weave_kernels_gpu::KERNELS.iter().find(|k| k.name() == kernel).map_or(0, |k| k.dynamic_smem())
}

fn print_table(rows: &[(String, KernelStats)]) {
    println!("{:<28} {:<6} {:>5} {:>11} {:>6} {:>7}", "kernel", "arch", "regs", "smem (dyn)", "stack", "spills");
    for (arch, s) in rows {
        println!(
            "{:<28} {:<6} {:>5} {:>11} {:>6} {:>7}",
            s.name,
            arch,
            s.registers,
            format!("{} ({})", s.smem_static, dynamic_smem(&s.name)),
            s.stack,
            s.spill_stores + s.spill_loads
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let t = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'argmax_f32' for 'sm_90'\n\
ptxas info    : Function properties for argmax_f32\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 24 registers, used 1 barriers, 16 bytes smem, 364 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'rms_norm_f32' for 'sm_90'\n\
ptxas info    : Function properties for rms_norm_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 22 registers, used 1 barriers\n";
        let s = parse_ptxas(t);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            KernelStats {
                name: "argmax_f32".into(),
                registers: 24,
                smem_static: 16,
                stack: 8,
                spill_stores: 4,
                spill_loads: 12
            }
        );
        assert_eq!((s[1].registers, s[1].smem_static, s[1].stack), (22, 0, 0));
    }
}
