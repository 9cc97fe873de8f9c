//! `fedlora server`, `fedlora client`, `fedlora keygen` and `fedlora demo`: the networked service
//! (crates/service) on the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use fedlora_secagg::Stage;
use fedlora_service::client::{run_client_with, ClientOptions, ClientRunError};
use fedlora_service::clock::SystemClock;
use fedlora_service::config::{ClientConfig, ServerConfig};
use fedlora_service::demo::{run_demo, DemoOptions};
use fedlora_service::identity::IdentityKey;
use fedlora_service::server::serve;

use crate::output::{emit, Reported};

/// `fedlora keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Output path without extension: writes `<out>.key` (secret, mode 0600) and `<out>.pub`.
    #[arg(long)]
    pub out: PathBuf,
    /// Name to put in the enrollment snippet (default: the file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Overwrite an existing key.
    #[arg(long)]
    pub force: bool,
}

/// `fedlora server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Server configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Override `listen`.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Override `rounds.count`.
    #[arg(long)]
    pub rounds: Option<u64>,
}

/// Stage names for `--fail-before`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StageArg {
    /// Before advertising keys.
    Advertise,
    /// Before sending shares.
    Share,
    /// Before uploading the masked input.
    Upload,
    /// Before answering the unmask request.
    Unmask,
}

impl From<StageArg> for Stage {
    fn from(s: StageArg) -> Stage {
        match s {
            StageArg::Advertise => Stage::AdvertiseKeys,
            StageArg::Share => Stage::ShareKeys,
            StageArg::Upload => Stage::MaskedInput,
            StageArg::Unmask => Stage::Unmask,
        }
    }
}

/// `fedlora client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Client configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Override `server`.
    #[arg(long)]
    pub server: Option<SocketAddr>,
    /// Override the pinned `trust.server_fingerprint`.
    #[arg(long)]
    pub server_fingerprint: Option<String>,
    /// Testing: exit abruptly (like a kill, no goodbye) right before sending this stage's message.
    #[arg(long, value_enum, hide = true)]
    pub fail_before: Option<StageArg>,
    /// Testing: exit abruptly half-way through writing the masked input.
    #[arg(long, hide = true)]
    pub fail_mid_upload: bool,
    /// Testing: stop responding (connection kept open) right before sending this stage's message.
    #[arg(long, value_enum, hide = true)]
    pub stall_before: Option<StageArg>,
}

/// `fedlora demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of clients (default 4; 5 with --synthetic).
    #[arg(long)]
    pub clients: Option<u32>,
    /// Rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: u64,
    /// Working directory (kept afterwards, with the global adapter); default: a temporary one,
    /// removed afterwards.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Aggregation rule (fedavg, frozen-a, exact, share-a, alternate).
    #[arg(long, default_value = "fedavg")]
    pub rule: String,
    /// Add distributed differential privacy at this epsilon over the run (default: off).
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// Training emails in all, dealt among the clients.
    #[arg(long, default_value_t = 800)]
    pub train_examples: usize,
    /// Held-out emails in all, dealt among the clients.
    #[arg(long, default_value_t = 400)]
    pub eval_examples: usize,
    /// Tokens per email.
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1.0)]
    pub local_epochs: f64,
    /// Learning rate of local training.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Log every protocol step (RUST_LOG overrides).
    #[arg(short, long)]
    pub verbose: bool,
    /// The service benchmark's demo instead: synthetic vectors, checked against their plain mean.
    #[arg(long)]
    pub synthetic: bool,
    /// --synthetic: adapter parameters per client.
    #[arg(long)]
    pub parameters: Option<u32>,
    /// --synthetic: per-stage deadline in milliseconds.
    #[arg(long)]
    pub stage_timeout_ms: Option<u64>,
    /// --synthetic: also measure raw quinn loopback throughput with this many MB.
    #[arg(long)]
    pub baseline_mb: Option<u64>,
    /// --synthetic: clients finish masking, then upload together (isolates server ingest).
    #[arg(long)]
    pub synchronized_upload: bool,
}

/// Runs `fedlora keygen`.
pub fn run_keygen(args: KeygenArgs, json: bool) -> anyhow::Result<()> {
    let key = IdentityKey::generate();
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    key.write_files(&args.out, args.force)?;
    let name = args
        .name
        .clone()
        .or_else(|| {
            args.out
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "client".into());
    let public = key.public().to_hex();
    let snippet = format!("[[client]]\nname = \"{name}\"\npublic_key = \"{public}\"\n");
    let value = serde_json::json!({
        "public_key": public,
        "key_file": args.out.with_extension("key").display().to_string(),
        "pub_file": args.out.with_extension("pub").display().to_string(),
        "enrollment": snippet,
    });
    emit(
        json,
        || {
            format!(
                "wrote {} (secret) and {}\nenroll it on the server with:\n\n{snippet}",
                args.out.with_extension("key").display(),
                args.out.with_extension("pub").display()
            )
        },
        &value,
    )
}

/// Runs `fedlora server`.
pub fn run_server(args: ServerArgs, json: bool) -> anyhow::Result<()> {
    fedlora_service::logging::init("info");
    let mut cfg = ServerConfig::load(&args.config)?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(r) = args.rounds {
        cfg.rounds.count = r;
    }
    let rt = fedlora_service::runtime()?;
    // Spawned rather than run on this thread, so the coordinator shares the runtime's worker
    // threads (and their caches) with the connection readers that feed it.
    let serving = rt.spawn(serve(cfg, Arc::new(SystemClock), |l| {
        eprintln!(
            "fedlora server listening on {} fingerprint {}",
            l.addr,
            hex_fp(&l.fingerprint)
        );
    }));
    let report = rt.block_on(serving)??;
    emit(
        json,
        || {
            let mut s = format!(
                "server {} done: {} round(s)",
                report.listen,
                report.rounds.len()
            );
            for r in &report.rounds {
                s.push_str(&format!(
                    "\n  round {}: {} survivors={:?} dropped={:?}{}",
                    r.round,
                    r.status,
                    r.survivors,
                    r.dropped,
                    r.abort_reason
                        .as_ref()
                        .map(|a| format!(" reason: {a}"))
                        .unwrap_or_default()
                ));
            }
            s
        },
        &report,
    )
}

fn hex_fp(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `fedlora client`.
pub fn run_client_cmd(args: ClientArgs, json: bool) -> anyhow::Result<()> {
    fedlora_service::logging::init("info");
    let mut cfg = ClientConfig::load(&args.config)?;
    if let Some(s) = args.server {
        cfg.server = s;
    }
    if let Some(fp) = args.server_fingerprint {
        cfg.trust.server_fingerprint = Some(fp);
        cfg.trust.ca_cert = None;
    }
    let opts = ClientOptions {
        fail_before: args.fail_before.map(Stage::from),
        stall_before: args.stall_before.map(Stage::from),
        fail_mid_upload: args.fail_mid_upload,
        upload_barrier: None,
    };
    // A [train] section: load its data and model now, so a bad setting is reported before
    // connecting.
    let contributor: Option<Box<dyn fedlora_service::federated::Contributor>> = match &cfg.train {
        Some(t) => Some(Box::new(
            crate::federate::contributor::TrainContributor::new(t)
                .with_context(|| format!("{}: [train]", args.config.display()))?,
        )),
        None => None,
    };
    let rt = fedlora_service::runtime()?;
    match rt.block_on(run_client_with(&cfg, &opts, contributor)) {
        Ok(report) => emit(
            json,
            || {
                let mut s = format!("client done: {} round(s)", report.rounds.len());
                for r in &report.rounds {
                    s.push_str(&format!(
                        "\n  round {}: {} as client {}",
                        r.round, r.outcome, r.client_id
                    ));
                }
                s
            },
            &report,
        ),
        Err(ClientRunError::Injected(stage)) => {
            // Simulated kill: no connection close, no report.
            eprintln!("fail-before {stage}: exiting abruptly");
            std::process::exit(86);
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `fedlora demo`.
pub fn run_demo_cmd(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    fedlora_service::logging::init(if args.verbose { "info" } else { "warn" });
    if args.synthetic {
        return run_synthetic_demo(args, json);
    }
    if args.parameters.is_some()
        || args.stage_timeout_ms.is_some()
        || args.baseline_mb.is_some()
        || args.synchronized_upload
    {
        anyhow::bail!("--parameters, --stage-timeout-ms, --baseline-mb and --synchronized-upload are for --synthetic");
    }
    let keep = args.dir.clone();
    let demo = crate::federate::demo::FedDemo {
        clients: args.clients.unwrap_or(4),
        rounds: args.rounds,
        rule: args.rule,
        epsilon: args.epsilon,
        train_examples: args.train_examples,
        eval_examples: args.eval_examples,
        max_len: args.max_len,
        local_epochs: args.local_epochs,
        lr: args.lr,
        seed: args.seed,
        dir: args.dir,
    };
    let report = crate::federate::demo::run(demo)?;
    emit(
        json,
        || crate::federate::demo::human(&report, keep.as_deref()),
        &report,
    )?;
    if !report.aborted_rounds.is_empty() {
        return Err(Reported(format!("rounds {:?} aborted", report.aborted_rounds)).into());
    }
    Ok(())
}

/// `fedlora demo --synthetic`: secure rounds on synthetic vectors, each aggregate checked against
/// the plain mean (the service benchmark's demo).
fn run_synthetic_demo(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    let keep = args.dir.is_some();
    let opts = DemoOptions {
        clients: args.clients.unwrap_or(5),
        parameters: args.parameters.unwrap_or(10_000),
        rounds: args.rounds,
        dir: args.dir,
        stage_timeout_ms: args.stage_timeout_ms.unwrap_or(30_000),
        baseline_bytes: args.baseline_mb.map(|mb| mb << 20),
        synchronized_upload: args.synchronized_upload,
        baseline_many_bytes_each: None,
        receive_window_bytes: None,
        upload_slots: fedlora_service::pacing::DEFAULT_UPLOAD_SLOTS,
        privacy: None,
    };
    let rt = fedlora_service::runtime()?;
    let report = rt.block_on(run_demo(opts))?;
    if !keep {
        let _ = std::fs::remove_dir_all(&report.dir);
    }
    let all_exact = report.rounds.iter().all(|r| r.exact);
    emit(
        json,
        || {
            let mut s = format!(
                "demo: server + {} clients on loopback QUIC, {} parameters, {:.2} s",
                report.clients, report.parameters, report.wall_s
            );
            for r in &report.rounds {
                s.push_str(&format!(
                    "\n  round {}: {} with {} clients, max |secure - plain| = {:.3e} (bound {:.3e}) {}",
                    r.round,
                    r.status,
                    r.survivors,
                    r.max_abs_error,
                    r.error_bound,
                    if r.exact { "OK" } else { "MISMATCH" }
                ));
            }
            s
        },
        &report,
    )?;
    if !all_exact {
        return Err(Reported("a round did not match the plain mean".into()).into());
    }
    Ok(())
}
