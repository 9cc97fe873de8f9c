//! `fedlora demo`: one command that starts a server and several clients on loopback QUIC, runs
//! secure rounds end to end on synthetic adapters, and checks every aggregate against the plain
//! mean of the clients' inputs (which only the demo, holding every input, can compute).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tracing::Instrument;

use crate::client::{run_client, synthetic_input, ClientOptions, ClientReport, ClientRunError};
use crate::clock::SystemClock;
use crate::config::{
    ClientConfig, EnrolledClient, IdentityConfig, InputConfig, ProtocolConfig, RoundsConfig,
    ServerConfig, ServerTlsConfig, TrustConfig,
};
use crate::identity::IdentityKey;
use crate::server::{serve, ServerError, ServerReport};
use crate::throughput::{raw_quinn_loopback, RawThroughput, ThroughputError};

/// Errors running the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Bad option.
    #[error("invalid option: {0}")]
    Invalid(String),
    /// The server failed.
    #[error("server: {0}")]
    Server(#[from] ServerError),
    /// A client failed.
    #[error("client {0}: {1}")]
    Client(usize, ClientRunError),
    /// A task panicked or was cancelled.
    #[error("task: {0}")]
    Join(String),
    /// Reading an aggregate back failed.
    #[error("aggregate file: {0}")]
    Io(#[from] std::io::Error),
    /// The raw throughput baseline failed.
    #[error("baseline: {0}")]
    Baseline(#[from] ThroughputError),
}

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Number of clients.
    pub clients: u32,
    /// Adapter parameters per client.
    pub parameters: u32,
    /// Rounds.
    pub rounds: u64,
    /// Working directory (store, certificate); a fresh temporary one when `None`.
    pub dir: Option<PathBuf>,
    /// Per-stage deadline.
    pub stage_timeout_ms: u64,
    /// Also measure raw quinn loopback throughput with this many bytes (benchmark baseline).
    pub baseline_bytes: Option<u64>,
    /// Benchmark: clients wait for each other before uploading (see [`ClientOptions::upload_barrier`]).
    pub synchronized_upload: bool,
    /// Benchmark: also measure raw quinn with one connection per client, each sending this many
    /// bytes concurrently (the same traffic shape as the upload stage, without the service).
    pub baseline_many_bytes_each: Option<u64>,
    /// Server receive window per connection (default: derived from the number of clients).
    pub receive_window_bytes: Option<u32>,
    /// Concurrent uploads the server admits (`pacing`; 0 = all at once).
    pub upload_slots: u32,
    /// Differential privacy for server and clients alike. With noise, `exact` is expected to be
    /// false: the aggregate then differs from the plain mean by the noise.
    pub privacy: Option<fedlora_dp::PrivacyConfig>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            clients: 5,
            parameters: 10_000,
            rounds: 2,
            dir: None,
            stage_timeout_ms: 30_000,
            baseline_bytes: None,
            synchronized_upload: false,
            baseline_many_bytes_each: None,
            receive_window_bytes: None,
            upload_slots: crate::pacing::DEFAULT_UPLOAD_SLOTS,
            privacy: None,
        }
    }
}

/// One round checked against the plain mean.
#[derive(Debug, Clone, Serialize)]
pub struct DemoRound {
    /// Round number.
    pub round: u64,
    /// `finished` or `aborted`.
    pub status: String,
    /// Clients in the sum.
    pub survivors: usize,
    /// Largest |secure mean − plain mean| over all parameters.
    pub max_abs_error: f64,
    /// The protocol's quantization error bound.
    pub error_bound: f64,
    /// Whether `max_abs_error <= error_bound` and every client received the same global state.
    pub exact: bool,
    /// Wall time of the round in ms.
    pub wall_ms: u64,
}

/// Bytes a client put on the wire in one round, against its raw quantized payload.
#[derive(Debug, Clone, Serialize)]
pub struct ClientBytes {
    /// Round.
    pub round: u64,
    /// Mean over clients of UDP payload bytes sent during the round (all stages, QUIC included).
    pub udp_tx_mean: f64,
    /// Largest per-client UDP bytes sent.
    pub udp_tx_max: u64,
    /// Mean protocol payload bytes sent (all stages, before framing and QUIC).
    pub protocol_mean: f64,
    /// Parameters × ring_bits / 8: the quantized vector alone.
    pub quantized_bytes: u64,
    /// `udp_tx_mean / quantized_bytes`.
    pub ratio: f64,
    /// Packets lost and resent, summed over clients.
    pub lost_packets: u64,
}

/// The demo's report.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Clients.
    pub clients: u32,
    /// Parameters.
    pub parameters: u32,
    /// Rounds checked.
    pub rounds: Vec<DemoRound>,
    /// Total wall time in seconds.
    pub wall_s: f64,
    /// The server's own report.
    pub server: ServerReport,
    /// Raw quinn loopback baseline (one connection, one stream), when asked for.
    pub baseline: Option<RawThroughput>,
    /// Raw quinn loopback with one connection per client, all sending at once, when asked for.
    pub baseline_many: Option<RawThroughput>,
    /// Per-round client figures: (round, mean UDP bytes sent per client, mean masked-input bytes,
    /// quantized payload bytes per client).
    pub client_bytes: Vec<ClientBytes>,
    /// Where the store and aggregates are.
    pub dir: String,
}

/// Runs the demo.
pub async fn run_demo(opts: DemoOptions) -> Result<DemoReport, DemoError> {
    if opts.clients < 2 {
        return Err(DemoError::Invalid("at least 2 clients".into()));
    }
    if opts.rounds == 0 || opts.parameters == 0 || opts.stage_timeout_ms == 0 {
        return Err(DemoError::Invalid(
            "rounds, parameters and the stage timeout must be at least 1".into(),
        ));
    }
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedlora-demo-{}", rand::random::<u64>()))
    });
    std::fs::create_dir_all(&dir)?;
    let baseline = match opts.baseline_bytes {
        Some(b) => Some(raw_quinn_loopback(b).await?),
        None => None,
    };
    let baseline_many = match opts.baseline_many_bytes_each {
        Some(b) => Some(crate::throughput::raw_quinn_loopback_many(opts.clients, b).await?),
        None => None,
    };
    let keys: Vec<IdentityKey> = (0..opts.clients).map(|_| IdentityKey::generate()).collect();
    let names: Vec<String> = (0..opts.clients)
        .map(|i| format!("client-{i:03}"))
        .collect();
    let server_cfg = ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        data_dir: dir.join("server"),
        tls: ServerTlsConfig::default(),
        rounds: RoundsConfig {
            count: opts.rounds,
            min_clients: opts.clients,
            max_clients: opts.clients,
            join_timeout_ms: 60_000,
            join_grace_ms: 0,
            stage_timeout_ms: opts.stage_timeout_ms,
            parameters: opts.parameters,
        },
        protocol: ProtocolConfig::default(),
        max_frame_bytes: crate::framing::DEFAULT_MAX_FRAME,
        receive_window_bytes: opts.receive_window_bytes,
        upload_slots: opts.upload_slots,
        privacy: opts.privacy.clone(),
        federation: None,
        clients: keys
            .iter()
            .zip(&names)
            .map(|(k, n)| EnrolledClient {
                name: n.clone(),
                public_key: k.public().to_hex(),
            })
            .collect(),
    };
    let start = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // The server gets its own runtime (its own threads), as it would in its own process, so the
    // operating system shares the CPU between it and the clients instead of one task queue. It is
    // spawned, as `fedlora server` does, so that its coordinator runs on the worker threads.
    let server = std::thread::spawn(move || {
        let rt = crate::runtime_named("fedlora-server")
            .map_err(|e| DemoError::Join(format!("server runtime: {e}")))?;
        let serving = rt.spawn(serve(server_cfg, Arc::new(SystemClock), move |l| {
            let _ = tx.send(*l);
        }));
        rt.block_on(serving)
            .map_err(|e| DemoError::Join(format!("server task: {e}")))?
            .map_err(DemoError::from)
    });
    let listening = rx
        .await
        .map_err(|_| DemoError::Join("server did not start".into()))?;
    let barrier = opts
        .synchronized_upload
        .then(|| Arc::new(tokio::sync::Barrier::new(opts.clients as usize)));
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let cfg = ClientConfig {
            server: listening.addr.into(),
            server_name: "localhost".into(),
            trust: TrustConfig {
                server_fingerprint: Some(hex::encode(listening.fingerprint)),
                ca_cert: None,
            },
            identity: IdentityConfig {
                key_file: None,
                key: Some(hex::encode(*key.seed()).into()),
            },
            input: Some(InputConfig::Synthetic {
                seed: i as u64,
                weight: 1,
            }),
            max_rounds: None,
            privacy: opts.privacy.clone(),
            connect_timeout_ms: 10_000,
            // The demo's server ends when its rounds do; a lost connection is a failure here.
            reconnect_attempts: 0,
            reconnect_delay_ms: 1_000,
            max_frame_bytes: crate::framing::DEFAULT_MAX_FRAME,
            state_dir: None,
            train: None,
            known_peers: keys.iter().map(|k| k.public().to_hex()).collect(),
        };
        let span = tracing::info_span!("client", n = i);
        tasks.push(tokio::spawn(
            {
                let opts = ClientOptions {
                    fail_before: None,
                    fail_mid_upload: false,
                    stall_before: None,
                    upload_barrier: barrier.clone(),
                };
                async move { run_client(&cfg, &opts).await }
            }
            .instrument(span),
        ));
    }
    let mut reports: Vec<ClientReport> = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t
            .await
            .map_err(|e| DemoError::Join(e.to_string()))?
            .map_err(|e| DemoError::Client(i, e))?;
        reports.push(r);
    }
    let server = tokio::task::spawn_blocking(move || server.join())
        .await
        .map_err(|e| DemoError::Join(e.to_string()))?
        .map_err(|_| DemoError::Join("server thread panicked".into()))??;
    let mut rounds = Vec::new();
    for s in &server.rounds {
        let mut round = DemoRound {
            round: s.round,
            status: s.status.clone(),
            survivors: s.survivors.len(),
            max_abs_error: f64::NAN,
            error_bound: s.error_bound.unwrap_or(f64::NAN),
            exact: false,
            wall_ms: s.wall_ms,
        };
        if s.status == "finished" {
            let path = dir
                .join("server")
                .join("aggregates")
                .join(format!("round-{:06}.bin", s.round));
            let bytes = std::fs::read(&path)?;
            let secure: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let len = opts.parameters as usize;
            let mut plain = vec![0f64; len];
            for &c in &s.survivors {
                for (p, v) in plain
                    .iter_mut()
                    .zip(synthetic_input(u64::from(c), s.round, len))
                {
                    *p += f64::from(v);
                }
            }
            let k = s.survivors.len().max(1) as f64;
            round.max_abs_error = secure
                .iter()
                .zip(&plain)
                .map(|(a, b)| (f64::from(*a) - b / k).abs())
                .fold(0.0, f64::max);
            let same_state = reports.iter().all(|r| {
                r.rounds
                    .iter()
                    .any(|cr| cr.round == s.round && cr.aggregate_sha256 == s.aggregate_sha256)
            });
            round.exact =
                secure.len() == len && round.max_abs_error <= round.error_bound && same_state;
        }
        rounds.push(round);
    }
    let mut client_bytes = Vec::new();
    for s in &server.rounds {
        let per: Vec<&crate::client::ClientRound> = reports
            .iter()
            .flat_map(|r| r.rounds.iter().filter(|cr| cr.round == s.round))
            .collect();
        if per.is_empty() {
            continue;
        }
        let k = per.len() as f64;
        let quantized = u64::from(opts.parameters) * u64::from(s.ring_bits.unwrap_or(0) / 8);
        let udp_tx_mean = per.iter().map(|c| c.udp_tx_bytes as f64).sum::<f64>() / k;
        client_bytes.push(ClientBytes {
            round: s.round,
            udp_tx_mean,
            udp_tx_max: per.iter().map(|c| c.udp_tx_bytes).max().unwrap_or(0),
            protocol_mean: per.iter().map(|c| c.sent_bytes as f64).sum::<f64>() / k,
            quantized_bytes: quantized,
            ratio: udp_tx_mean / (quantized.max(1) as f64),
            lost_packets: per.iter().map(|c| c.lost_packets).sum(),
        });
    }
    Ok(DemoReport {
        client_bytes,
        clients: opts.clients,
        parameters: opts.parameters,
        rounds,
        wall_s: start.elapsed().as_secs_f64(),
        server,
        baseline,
        baseline_many,
        dir: dir.display().to_string(),
    })
}
