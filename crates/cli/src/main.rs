//! `fedlora`: privacy-preserving federated LoRA fine-tuning.
//!
//! One binary with a subcommand per job. Every subcommand that reports figures accepts the global
//! `--json` flag and then prints exactly one JSON object as the last line of standard output;
//! human-readable progress goes to standard error.

use clap::{Parser, Subcommand};

/// The binary's allocator. candle allocates a fresh buffer for every tensor op; glibc's malloc hands
/// large freed buffers back to the kernel and the next op faults them in again, zero-filled.
/// Profiling a MiniLM LoRA step showed ~40% of its time in the kernel's page clearing, and keeping
/// pages (glibc tunables as an experiment) doubled tokens/s. jemalloc keeps freed pages for reuse
/// (10 s decay) with no tuning. Training is what needs it, but an allocator is the whole binary's
/// choice, so it is declared here.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod exit;
mod federate;
mod limits;
mod output;
mod privacy_cmd;
mod progress;
mod ranges;
mod service_cmd;
mod simulate;
mod summary;
mod threads;
mod train_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "fedlora",
    version,
    about = "Privacy-preserving federated LoRA fine-tuning"
)]
struct Cli {
    /// Print one JSON object as the last line of standard output (machine-readable report).
    #[arg(long, global = true)]
    json: bool,

    /// More detail on standard error: -v every protocol step, -vv debug (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

// Each subcommand lives in its own module; add a variant here and an arm in `main` below.
#[derive(Debug, Subcommand)]
enum Command {
    /// Federated LoRA fine-tuning in one process: N clients, R rounds, an aggregation rule, plain
    /// sums, SecAgg+ or SecAgg+ with distributed DP.
    Federate(Box<federate::args::FederateArgs>),
    /// Write the adapter layout (model, LoRA shapes, head) a federation's server names in its
    /// `[federation]` section.
    Layout(federate::layout_cmd::LayoutArgs),
    /// Privacy accountant: epsilon for a noise multiplier, or the noise for a target epsilon.
    Privacy(privacy_cmd::PrivacyArgs),
    /// Run one secure-aggregation round in memory (real crypto) and report error, time and bytes.
    Simulate(simulate::SimulateArgs),
    /// Measure this machine's AES-CTR and summation throughput: the bound for the server's work.
    Limits(limits::LimitsArgs),
    /// Train one client's LoRA adapter locally on a task (spam, gsm) or a JSONL file.
    Train(train_cmd::TrainArgs),
    /// Evaluate a model (optionally with an adapter) on a task's held-out split.
    Eval(train_cmd::EvalArgs),
    /// Greedy generation with a causal LM, optionally with an adapter merged in.
    Generate(train_cmd::GenerateArgs),
    /// Generate an Ed25519 client identity (`<out>.key`, `<out>.pub`) and print its enrollment entry.
    Keygen(service_cmd::KeygenArgs),
    /// Run the secure-aggregation server over QUIC for R rounds.
    Server(service_cmd::ServerArgs),
    /// Run a client next to its data: connect, authenticate, take part in rounds.
    Client(service_cmd::ClientArgs),
    /// One command: a server and several clients on loopback run secure rounds end to end.
    Demo(service_cmd::DemoArgs),
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let json = cli.json;
    let verbose = cli.verbose;
    let result: anyhow::Result<()> = match cli.command {
        Command::Federate(args) => federate::run(*args, json),
        Command::Layout(args) => federate::layout_cmd::run(args, json),
        Command::Privacy(args) => privacy_cmd::run(args, json),
        Command::Simulate(args) => simulate::run(args, json),
        Command::Limits(args) => limits::run(args, json),
        Command::Train(args) => train_cmd::run_train(args, json),
        Command::Eval(args) => train_cmd::run_eval(args, json),
        Command::Generate(args) => train_cmd::run_generate(args, json),
        Command::Keygen(args) => service_cmd::run_keygen(args, json),
        Command::Server(args) => service_cmd::run_server(args, json, verbose),
        Command::Client(args) => service_cmd::run_client_cmd(args, json, verbose),
        Command::Demo(args) => service_cmd::run_demo_cmd(args, json, verbose),
    };
    output::finish(result, json)
}

/// A command line clap refuses (unknown flag, value out of range): its message and exit code 2
/// (0 for --help and --version), and with `--json` the same one JSON object as any refusal.
fn usage_error(e: clap::Error) -> std::process::ExitCode {
    let code = e.exit_code().clamp(0, 255) as u8;
    let _ = e.print();
    if code != 0 && std::env::args().any(|a| a == "--json") {
        let rendered = e.to_string();
        let text = rendered
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_string();
        println!(
            "{}",
            serde_json::json!({
                "error": text,
                "outcome": exit::outcome(exit::REFUSED),
                "exit_code": exit::REFUSED,
            })
        );
    }
    std::process::ExitCode::from(code)
}
