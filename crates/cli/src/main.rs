//! `fedlora`: privacy-preserving federated LoRA fine-tuning.
//!
//! One binary with a subcommand per job. Every subcommand that reports figures accepts the global
//! `--json` flag and then prints exactly one JSON object as the last line of standard output;
//! human-readable progress goes to standard error.

use clap::{Parser, Subcommand};

mod output;

#[derive(Debug, Parser)]
#[command(name = "fedlora", version, about = "Privacy-preserving federated LoRA fine-tuning")]
struct Cli {
    /// Print one JSON object as the last line of standard output (machine-readable report).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

// Each subcommand lives in its own module; add a variant here and an arm in `main` below.
#[derive(Debug, Subcommand)]
enum Command {}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let result: anyhow::Result<()> = match cli.command {};
    output::finish(result, json)
}
