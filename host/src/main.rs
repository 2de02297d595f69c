//! The `weave` command line: a thin layer over the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use weave::engine::Event;

#[derive(Debug, Parser)]
#[command(name = "weave", version, about = "Continuous-batching LLM inference engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Drive the scheduler and block manager with a trace (no model) and summarize the batches.
    Replay {
        /// Trace JSON: {"config": {...}, "requests": [...]}.
        #[arg(long)]
        trace: PathBuf,
        /// Write the per-step JSONL (and a final summary line) here; `-` for stdout.
        #[arg(long)]
        step_log: Option<PathBuf>,
        /// Print the summary as one JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn open_log(path: &Option<PathBuf>) -> anyhow::Result<Option<Box<dyn Write>>> {
    Ok(match path {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout().lock())),
        Some(p) => Some(Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create step log {}", p.display()))?,
        ))),
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Replay { trace, step_log, json } => {
            let t = weave::trace::Trace::load(&trace)?;
            let mut log = open_log(&step_log)?;
            let mut write_err = None;
            let (report, summary) = weave::replay::replay(&t, &mut |ev| match ev {
                Event::Rejected { message, .. } => eprintln!("error: {}: {message}", trace.display()),
                Event::Step { record, .. } => {
                    if let Some(w) = log.as_mut() {
                        if let Err(e) = serde_json::to_writer(&mut *w, record)
                            .map_err(anyhow::Error::from)
                            .and_then(|_| Ok(writeln!(w)?))
                        {
                            write_err.get_or_insert(e);
                        }
                    }
                }
                Event::Finished(_) => {}
            })?;
            if let Some(e) = write_err {
                return Err(e.context("writing the step log"));
            }
            if let Some(w) = log.as_mut() {
                serde_json::to_writer(&mut *w, &summary)?;
                writeln!(w)?;
                w.flush()?;
            }
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
    }
}
