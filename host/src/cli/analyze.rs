//! `weave analyze`: Summarise, compare, plot and export step logs (from replay, generate or simulate).

use super::*;

/// Summarise, compare, plot and export step logs (from replay, generate or simulate).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Step logs (JSONL); several are compared side by side.
    #[arg(required = true)]
    pub logs: Vec<PathBuf>,
    /// Composition plot (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Chrome/Perfetto trace of the first log.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { logs, plot, trace, json } = a;
    let mut all = Vec::new();
    for p in &logs {
        all.push((p.display().to_string(), weave::study::analyze::read_log(p)?));
    }
    let analyses: Vec<_> = all.iter().map(|(n, s)| weave::study::analyze::analyze(n, s)).collect();
    if json {
        println!("{}", serde_json::to_string(&analyses)?);
    } else {
        print!("{}", weave::study::analyze::render(&analyses));
    }
    if let Some(p) = plot {
        weave::study::plot::write(&weave::study::plot::composition_svg(&all)?, &p)?;
        eprintln!("plot written to {}", p.display());
    }
    if let Some(p) = trace {
        std::fs::write(&p, serde_json::to_string(&weave::study::analyze::chrome_trace(&all[0].1))?)
            .with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("trace written to {} (open in ui.perfetto.dev or chrome://tracing)", p.display());
    }
    Ok(())
}
