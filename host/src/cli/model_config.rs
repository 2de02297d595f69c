//! `weave model-config`: a named model shape as JSON (for tools that build the same model
//! elsewhere, e.g. the PyTorch baseline in `tools/gpu/hf_baseline.py`).

/// Print a model shape (llama-3-8b, llama-2-7b, mistral-7b, smollm2-135m, or a JSON profile
/// file) as JSON, with its parameter count.
#[derive(Debug, clap::Args)]
pub struct Args {
    pub name: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let p = weave::model::profiles::find_model(&a.name).map_err(anyhow::Error::msg)?;
    p.check().map_err(anyhow::Error::msg)?;
    let mut v = serde_json::to_value(&p)?;
    let embeddings = (1 + usize::from(!p.tied_embeddings)) * p.hidden * p.vocab;
    v["params"] = serde_json::json!(p.layer_params() as u64 + embeddings as u64);
    println!("{v}");
    Ok(())
}
