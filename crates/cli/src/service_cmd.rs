//! `fedlora server`, `fedlora client`, `fedlora keygen` and `fedlora demo`: the networked service
//! (crates/service) on the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use fedlora_secagg::Stage;
use fedlora_service::client::{run_client_with, ClientOptions, ClientRunError};
use fedlora_service::clock::SystemClock;
use fedlora_service::config::{ClientConfig, InputConfig, ServerConfig};
use fedlora_service::demo::{run_demo, DemoOptions};
use fedlora_service::identity::IdentityKey;
use fedlora_service::logging::filter_for;
use fedlora_service::server::serve_until;
use tracing::warn;

use crate::exit;
use crate::output::{emit, emit_outcome};
use crate::ranges;

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
    /// Override `server` (`host:port`; a DNS name or an IP address).
    #[arg(long)]
    pub server: Option<String>,
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
    let name = args
        .name
        .clone()
        .or_else(|| {
            args.out
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "client".into());
    // The entry is checked (and its name escaped) before any key is written.
    let key = IdentityKey::generate();
    let public = key.public().to_hex();
    let snippet = fedlora_service::preflight::enrollment_entry(&name, &public)
        .map_err(|e| exit::refuse(format!("--name: {e}")))?;
    let key_file = args.out.with_extension("key");
    if key_file.exists() && !args.force {
        return Err(exit::refuse(format!(
            "--out: {} exists; pass --force to replace this identity (its old public key stops being enrolled)",
            key_file.display()
        )));
    }
    ranges::out_file("--out", &key_file)?;
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    key.write_files(&args.out, args.force)?;
    let value = serde_json::json!({
        "public_key": public,
        "key_file": key_file.display().to_string(),
        "pub_file": args.out.with_extension("pub").display().to_string(),
        "name": name,
        "enrollment": snippet,
    });
    emit(
        json,
        || {
            format!(
                "wrote {} (secret) and {}\nenroll it on the server with:\n\n{snippet}",
                key_file.display(),
                args.out.with_extension("pub").display()
            )
        },
        &value,
    )
}

/// A configuration problem found before anything was written: exit code 2, naming the file.
fn refused_in(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> anyhow::Error {
    exit::refused(anyhow::Error::new(e).context(path.display().to_string()))
}

/// Runs `fedlora server`.
pub fn run_server(args: ServerArgs, json: bool, verbose: u8) -> anyhow::Result<()> {
    fedlora_service::logging::init(filter_for(verbose));
    let mut cfg = ServerConfig::load(&args.config).map_err(exit::refused)?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(r) = args.rounds {
        ranges::rounds("--rounds", r)?;
        cfg.rounds.count = r;
    }
    // The whole configuration and every path, before the first write.
    cfg.preflight().map_err(|e| refused_in(&args.config, e))?;
    let rt = fedlora_service::runtime()?;
    let shutdown = {
        let _inside = rt.enter();
        fedlora_service::shutdown::on_signals(|stop| {
            eprintln!(
                "{}: cancelling the round under way, recording it and reporting; send it again to exit at once",
                stop.signal
            );
        })?
    };
    // Spawned rather than run on this thread, so the coordinator shares the runtime's worker
    // threads (and their caches) with the connection readers that feed it.
    let serving = rt.spawn(serve_until(
        cfg.clone(),
        Arc::new(SystemClock),
        shutdown,
        |l| {
            eprintln!(
                "fedlora server listening on {} fingerprint {}",
                l.addr,
                hex_fp(&l.fingerprint)
            );
        },
    ));
    let report = rt.block_on(serving)??;
    let code = crate::summary::server_code(&report);
    emit_outcome(
        json,
        || crate::summary::server(&report, &cfg),
        &report,
        code,
        || match report.shutdown {
            Some(stop) => format!("stopped by {}", stop.signal),
            None => {
                let aborted: Vec<String> = report
                    .rounds
                    .iter()
                    .filter(|r| r.status != "finished")
                    .map(|r| r.round.to_string())
                    .collect();
                format!(
                    "{} of {} rounds did not finish (rounds {})",
                    aborted.len(),
                    report.rounds.len(),
                    aborted.join(", ")
                )
            }
        },
    )
}

fn hex_fp(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `fedlora client`.
pub fn run_client_cmd(args: ClientArgs, json: bool, verbose: u8) -> anyhow::Result<()> {
    fedlora_service::logging::init(filter_for(verbose));
    let mut cfg = ClientConfig::load(&args.config).map_err(exit::refused)?;
    if let Some(s) = &args.server {
        cfg.server = s
            .parse()
            .map_err(|e: String| exit::refuse(format!("--server: {e}")))?;
    }
    if let Some(fp) = args.server_fingerprint {
        cfg.trust.server_fingerprint = Some(fp);
        cfg.trust.ca_cert = None;
    }
    // The whole configuration and every path, before connecting.
    cfg.preflight().map_err(|e| refused_in(&args.config, e))?;
    if let Some(InputConfig::Synthetic { seed, .. }) = &cfg.input {
        warn!(
            "{}: [input] kind = \"synthetic\": this client contributes made-up values (seed {seed}) to vector rounds, not real data: tests and demos only",
            args.config.display()
        );
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
            crate::federate::contributor::TrainContributor::new(t).map_err(|e| {
                exit::refused(e.context(format!("{}: [train]", args.config.display())))
            })?,
        )),
        None => None,
    };
    let rt = fedlora_service::runtime()?;
    match rt.block_on(run_client_with(&cfg, &opts, contributor)) {
        Ok(report) => {
            let code = crate::summary::client_code(&report);
            emit_outcome(
                json,
                || crate::summary::client(&report, &cfg),
                &report,
                code,
                || {
                    let not: Vec<String> = report
                        .rounds
                        .iter()
                        .filter(|r| r.outcome != "finished")
                        .map(|r| format!("{} {}", r.round, r.outcome))
                        .collect();
                    format!("rounds not finished: {}", not.join(", "))
                },
            )
        }
        Err(ClientRunError::Injected(stage)) => {
            // Simulated kill: no connection close, no report.
            eprintln!("fail-before {stage}: exiting abruptly");
            std::process::exit(86);
        }
        Err(e) => Err(e.into()),
    }
}

/// Flag checks shared by both demos.
fn check_demo_args(args: &DemoArgs) -> anyhow::Result<()> {
    if let Some(c) = args.clients {
        ranges::int("--clients", u64::from(c), 2, 1000)?;
    }
    ranges::rounds("--rounds", args.rounds)?;
    if let Some(d) = &args.dir {
        ranges::out_dir("--dir", d)?;
    }
    if args.synthetic {
        if let Some(p) = args.parameters {
            ranges::int(
                "--parameters",
                u64::from(p),
                1,
                fedlora_service::preflight::max_values().min(u64::from(u32::MAX)),
            )?;
        }
        if let Some(t) = args.stage_timeout_ms {
            ranges::timeout_ms("--stage-timeout-ms", t)?;
        }
        if let Some(mb) = args.baseline_mb {
            ranges::int("--baseline-mb", mb, 1, 1 << 20)?;
        }
    } else {
        if args.parameters.is_some()
            || args.stage_timeout_ms.is_some()
            || args.baseline_mb.is_some()
            || args.synchronized_upload
        {
            return Err(exit::refuse(
                "--parameters, --stage-timeout-ms, --baseline-mb and --synchronized-upload are for --synthetic",
            ));
        }
        ranges::epochs("--local-epochs", args.local_epochs)?;
        ranges::lr("--lr", args.lr)?;
        ranges::max_len(Some(args.max_len))?;
        let clients = u64::from(args.clients.unwrap_or(4));
        ranges::int(
            "--train-examples",
            args.train_examples as u64,
            clients,
            1 << 24,
        )?;
        ranges::int(
            "--eval-examples",
            args.eval_examples as u64,
            clients,
            1 << 24,
        )?;
        if let Some(e) = args.epsilon {
            if !(e.is_finite() && e > 0.0) {
                return Err(exit::refuse(format!(
                    "--epsilon must be a positive number, got {e}"
                )));
            }
        }
    }
    Ok(())
}

/// The demo's working directory: `--dir` (kept), or a fresh temporary one that is removed at the
/// end, on an error and on SIGINT/SIGTERM (it holds private keys).
struct DemoDir {
    path: PathBuf,
    temporary: bool,
}

impl DemoDir {
    fn new(dir: Option<PathBuf>) -> Self {
        match dir {
            Some(path) => DemoDir {
                path,
                temporary: false,
            },
            None => {
                let path = std::env::temp_dir()
                    .join(format!("fedlora-demo-{:016x}", rand::random::<u64>()));
                let d = DemoDir {
                    path,
                    temporary: true,
                };
                d.remove_on_signal();
                d
            }
        }
    }

    /// A watcher thread: on SIGINT/SIGTERM, removes the directory and exits with 128 + signal.
    fn remove_on_signal(&self) {
        let path = self.path.clone();
        std::thread::spawn(move || {
            let Ok(rt) = fedlora_service::tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(shutdown) = fedlora_service::shutdown::on_signals(|_| {}) else {
                    return;
                };
                let stop = shutdown.wait().await;
                let _ = std::fs::remove_dir_all(&path);
                eprintln!(
                    "{}: demo stopped; its temporary directory {} was removed",
                    stop.signal,
                    path.display()
                );
                std::process::exit(i32::from(stop.exit_code));
            });
        });
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Runs `fedlora demo`.
pub fn run_demo_cmd(args: DemoArgs, json: bool, verbose: u8) -> anyhow::Result<()> {
    // The demo prints its own summary; by default the server's progress lines show it moving
    // (the clients' would repeat them), -v adds every protocol step.
    fedlora_service::logging::init(match verbose {
        0 => "warn,progress::server=info",
        v => filter_for(v),
    });
    check_demo_args(&args)?;
    if args.synthetic {
        return run_synthetic_demo(args, json);
    }
    let keep = args.dir.clone();
    let dir = DemoDir::new(args.dir.clone());
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
        dir: Some(dir.path.clone()),
    };
    let report = crate::federate::demo::run(demo)?;
    let code = if report.aborted_rounds.is_empty() {
        exit::OK
    } else {
        exit::ROUNDS_ABORTED
    };
    emit_outcome(
        json,
        || crate::federate::demo::human(&report, keep.as_deref()),
        &report,
        code,
        || {
            format!(
                "rounds {} aborted",
                report
                    .aborted_rounds
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    )
}

/// `fedlora demo --synthetic`: secure rounds on synthetic vectors, each aggregate checked against
/// the plain mean (the service benchmark's demo).
fn run_synthetic_demo(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    let dir = DemoDir::new(args.dir.clone());
    let opts = DemoOptions {
        clients: args.clients.unwrap_or(5),
        parameters: args.parameters.unwrap_or(10_000),
        rounds: args.rounds,
        dir: Some(dir.path.clone()),
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
    let finished = report.rounds.iter().all(|r| r.status == "finished");
    let all_exact = report
        .rounds
        .iter()
        .all(|r| r.status != "finished" || r.exact);
    let code = match (all_exact, finished) {
        (false, _) => exit::FAILED,
        (true, false) => exit::ROUNDS_ABORTED,
        (true, true) => exit::OK,
    };
    emit_outcome(
        json,
        || {
            let mut s = format!(
                "demo: server + {} clients on loopback QUIC, {} parameters, {:.2} s",
                report.clients, report.parameters, report.wall_s
            );
            for r in &report.rounds {
                if r.status != "finished" {
                    s.push_str(&format!("\n  round {}: {}", r.round, r.status));
                    continue;
                }
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
        code,
        || {
            if all_exact {
                "a round did not finish".into()
            } else {
                "a round did not match the plain mean".into()
            }
        },
    )
}
