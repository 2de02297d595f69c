//! Finding (and, when asked, installing) the external tools: the nvptx-capable Rust toolchain
//! and ptxas. What works on these machines is recorded in shared/TOOLCHAIN.md.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Commands that install the Debian Rust toolchain with library sources (for -Zbuild-std).
pub const RUST_INSTALL: &[&str] = &["apt-get update", "apt-get install -y rustc-web cargo-web rust-web-src"];

/// The nvptx-capable rustc and cargo: `WEAVE_NVPTX_RUSTC`/`WEAVE_NVPTX_CARGO`, else Debian's
/// `/usr/bin/rustc` and `/usr/bin/cargo` (rustup's have no nvptx std and no rust-src).
#[derive(Debug, Clone)]
pub struct NvptxRust {
    pub rustc: PathBuf,
    pub cargo: PathBuf,
}

impl NvptxRust {
    pub fn find() -> Result<NvptxRust, String> {
        let rustc = std::env::var_os("WEAVE_NVPTX_RUSTC").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/rustc".into());
        let cargo = std::env::var_os("WEAVE_NVPTX_CARGO").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/cargo".into());
        if !rustc.exists() || !cargo.exists() {
            return Err(format!(
                "no nvptx-capable Rust toolchain: {} or {} is missing",
                rustc.display(),
                cargo.display()
            ));
        }
        let sysroot = Command::new(&rustc)
            .args(["--print", "sysroot"])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", rustc.display()))?;
        let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
        let src = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
        if !src.exists() {
            return Err(format!(
                "{} has no library source at {} (needed by -Zbuild-std=core)",
                rustc.display(),
                src.display()
            ));
        }
        Ok(NvptxRust { rustc, cargo })
    }
}

pub use weave::paths::cache_dir;

fn ptxas_pkg_dir() -> PathBuf {
    cache_dir().join("nvidia-cuda-nvcc")
}

/// The commands that install ptxas (PyPI's nvidia-cuda-nvcc wheel, into weave's cache).
pub fn ptxas_install() -> Vec<String> {
    vec![format!("python3 -m pip install --quiet --no-deps --target {} nvidia-cuda-nvcc", ptxas_pkg_dir().display())]
}

/// ptxas: `$WEAVE_PTXAS`, weave's cache, then `ptxas` on PATH.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEAVE_PTXAS").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    for cu in ["cu13", "cu12"] {
        let p = ptxas_pkg_dir().join("nvidia").join(cu).join("bin/ptxas");
        if p.exists() {
            return Some(p);
        }
    }
    let p = ptxas_pkg_dir().join("nvidia/cuda_nvcc/bin/ptxas");
    if p.exists() {
        return Some(p);
    }
    Command::new("ptxas").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "ptxas".into())
}

/// Runs install commands through `sh -c`, one by one, echoing each.
pub fn run_install(cmds: &[String]) -> Result<()> {
    for c in cmds {
        eprintln!("+ {c}");
        let st = Command::new("sh").args(["-c", c]).status().with_context(|| format!("cannot run `{c}`"))?;
        if !st.success() {
            bail!("`{c}` failed ({st})");
        }
    }
    Ok(())
}
