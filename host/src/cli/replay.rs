//! `weave replay`: Drive the scheduler and block manager with a trace (no model) and summarize the batches.

use super::*;

/// Drive the scheduler and block manager with a trace (no model) and summarize the batches.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Trace JSON: {"config": {...}, "requests": [...]}.
    #[arg(long)]
    pub trace: PathBuf,
    /// Write the per-step JSONL (and a final summary line) here; `-` for stdout.
    #[arg(long)]
    pub step_log: Option<PathBuf>,
    /// Print the summary as one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { trace, step_log, json } = a;
    let t = weave::replay::trace::Trace::load(&trace)?;
    let mut log = StepLog::open(step_log.as_deref())?;
    let (report, summary) = weave::replay::replay(&t, &mut |ev| match ev {
        Event::Rejected { message, .. } => eprintln!("error: {}: {message}", trace.display()),
        Event::Step { record, .. } => log.line(record),
        Event::Finished(_) => {}
    })?;
    log.finish(Some(&summary))?;
    let to_stdout = step_log.as_ref().is_some_and(|p| p.as_os_str() == "-");
    if json && !to_stdout {
        println!("{}", serde_json::to_string(&summary)?);
    } else if !to_stdout {
        print!("{}", summary.render());
    }
    if report.outcomes.is_empty() && !report.rejected.is_empty() {
        anyhow::bail!("{}: every request was rejected; nothing ran", trace.display());
    }
    Ok(())
}
