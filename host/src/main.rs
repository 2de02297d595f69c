//! The `weave` command line: parses and dispatches; each subcommand lives in `cli/`.

mod cli;

use clap::Parser;

fn main() {
    if let Err(e) = cli::Cli::parse().run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
