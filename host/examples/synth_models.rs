//! Writes the synthetic architecture models of `weave::model::synth`, with the vocabulary of a
//! fixture file, for `tools/golden/arch_oracle.py` to run llama.cpp on (the tests rebuild the
//! same files themselves).
//!
//! Usage: cargo run -p weave --release --example synth_models -- FIXTURE.json OUT_DIR

use anyhow::Context;
use weave::model::synth::{all_specs, gguf, SynthVocab};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [fixture, out] = args.as_slice() else { anyhow::bail!("usage: synth_models FIXTURE.json OUT_DIR") };
    let text = std::fs::read_to_string(fixture).with_context(|| format!("cannot read {fixture}"))?;
    let f: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{fixture} is not JSON"))?;
    let vocab = |key: &str| -> anyhow::Result<SynthVocab> {
        serde_json::from_value(f[key].clone()).with_context(|| format!("{fixture}: no usable {key:?}"))
    };
    let (bpe, spm) = (vocab("vocab")?, vocab("spm_vocab")?);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {out}"))?;
    for s in all_specs() {
        let p = std::path::Path::new(out).join(format!("{}.gguf", s.name));
        let v = if s.spm() { &spm } else { &bpe };
        std::fs::write(&p, gguf(&s, v)).with_context(|| format!("cannot write {}", p.display()))?;
        println!("{} {}", s.name, p.display());
    }
    Ok(())
}
