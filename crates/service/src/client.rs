//! The client driver: connects to the server, authenticates, and for each round it is invited to
//! runs one [`fedlora_secagg::Client`] on its private input, signing its ephemeral keys with its
//! identity and checking its peers' signatures. The raw input never leaves this process: only the
//! masked vector does. Receives the new global state after every finished round.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fedlora_secagg::wire::{decode_server, encode_client, ServerMessage, Stage};
use fedlora_secagg::{Client, ClientEvent, ClientInput};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::auth::Ed25519Authenticator;
use crate::config::{ClientConfig, ConfigError, InputConfig};
use crate::federated::{Contributor, Purpose};
use crate::federated_client::{public_tail, take_input, FedClient, Pending};
use crate::framing::{frame_head, Header, Kind, SERVER};
use crate::identity::{IdentityKey, PublicIdentity};
use crate::session::{stage_code, ClientSession, RoundStart, SessionError, PAYLOAD_OFFSET};

/// Errors that end a client run.
#[derive(Debug, thiserror::Error)]
pub enum ClientRunError {
    /// Configuration or key file problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Connection, certificate, refusal or framing problem.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The input file could not be read or has the wrong length.
    #[error("input: {0}")]
    Input(String),
    /// A test asked this client to die before sending its message for a stage.
    #[error("injected failure before stage {0}")]
    Injected(Stage),
    /// Writing the received global state failed.
    #[error("state file: {0}")]
    State(std::io::Error),
    /// The privacy section is invalid.
    #[error("privacy: {0}")]
    Privacy(#[from] fedlora_dp::ConfigError),
    /// The server started a federated round and this client has nothing to train with.
    #[error(
        "the server runs federated fine-tuning; this client needs a [train] section to take part"
    )]
    NoTrainer,
    /// The server address could not be resolved.
    #[error("resolving the server address {server}: {source}")]
    Resolve {
        /// `server` as configured.
        server: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// Test and benchmark knobs not in the config file.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Stop (as if killed) right before sending the message of this stage, in the first round.
    pub fail_before: Option<Stage>,
    /// Stop (as if killed) half-way through writing the masked input, in the first round: the
    /// server must take the half it has already added back out of the sum.
    pub fail_mid_upload: bool,
    /// Stop responding (but keep the connection open) right before sending this stage's message:
    /// the server is then held in that stage until its deadline (tests of a server killed mid-round).
    pub stall_before: Option<Stage>,
    /// Benchmark only: wait on this barrier before sending the masked input, so every client of an
    /// in-process benchmark has finished masking and the server's ingest is measured on its own.
    pub upload_barrier: Option<Arc<tokio::sync::Barrier>>,
}

/// One round as this client saw it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClientRound {
    /// Round number.
    pub round: u64,
    /// This client's id in the round.
    pub client_id: u32,
    /// `finished` (global state received), `aborted` (by the protocol: too few survivors, a
    /// failed check), `interrupted` (the server cancelled the round, e.g. on shutdown, or the
    /// connection was lost: not counted toward `max_rounds`), `failed` (this client could not take
    /// part), or `refused` (roster outside `known_peers`).
    pub outcome: String,
    /// Abort reason or local failure.
    pub reason: Option<String>,
    /// SHA-256 (hex) of the received global state.
    pub aggregate_sha256: Option<String>,
    /// Bytes of protocol payload this client sent in the round.
    pub sent_bytes: u64,
    /// Of which the masked input.
    pub masked_input_bytes: u64,
    /// UDP payload bytes this client's connection sent during the round (QUIC headers, frames,
    /// acknowledgements and retransmissions included): the bytes on the wire.
    pub udp_tx_bytes: u64,
    /// Packets QUIC declared lost (and resent) on this connection during the round.
    pub lost_packets: u64,
    /// Values of this client's contribution beyond the round's per-value clip (clipped before
    /// masking: the aggregate moved).
    pub clipped_values: u64,
}

/// What `run_client` returns.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ClientReport {
    /// Rounds taken part in.
    pub rounds: Vec<ClientRound>,
    /// Whether the server said it was done.
    pub server_done: bool,
    /// Connections the server admitted (more than one after a reconnection).
    pub connections: u32,
}

struct Current {
    round: u64,
    id: u32,
    peers: HashMap<u32, PublicIdentity>,
    client: Option<Client>,
    sent_bytes: u64,
    masked_input_bytes: u64,
    udp_tx_start: u64,
    udp_tx_now: u64,
    lost_start: u64,
    lost_now: u64,
    result: Option<ClientRound>,
    /// The round's setup, once received.
    setup: Option<fedlora_secagg::wire::RoundSetup>,
    /// What the round is for.
    purpose: Purpose,
    /// Federated rounds: the local training or evaluation under way.
    pending: Option<Pending>,
    /// Values clipped by the round's per-value range.
    clipped_values: u64,
}

/// The client's synthetic input for a round: `len` values in [-0.5, 0.5), determined by
/// (seed, round), so tests and the demo can recompute the exact expected mean.
pub fn synthetic_input(seed: u64, round: u64, len: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ round.rotate_left(32) ^ 0x0066_6564_6c6f_7261,
    );
    (0..len).map(|_| rng.random::<f32>() - 0.5).collect()
}

fn load_input(
    cfg: Option<&InputConfig>,
    round: u64,
    len: usize,
) -> Result<ClientInput, ClientRunError> {
    let Some(cfg) = cfg else {
        return Err(ClientRunError::Input(
            "the server runs plain (vector) rounds and this client has no [input] section: add [input] kind = \"file\" with the adapter delta to contribute".into(),
        ));
    };
    match cfg {
        InputConfig::Synthetic { seed, weight } => Ok(ClientInput {
            values: synthetic_input(*seed, round, len),
            weight: *weight,
        }),
        InputConfig::File { path, weight } => {
            let bytes = std::fs::read(path)
                .map_err(|e| ClientRunError::Input(format!("{}: {e}", path.display())))?;
            if bytes.len() != len * 4 {
                return Err(ClientRunError::Input(format!(
                    "input.path {}: {} bytes ({} f32 values), but the server's rounds sum {len} values ({} bytes): the file must hold exactly the server's rounds.parameters values",
                    path.display(),
                    bytes.len(),
                    bytes.len() / 4,
                    len * 4
                )));
            }
            let values = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(ClientInput {
                values,
                weight: *weight,
            })
        }
    }
}

/// Runs the client until the server says done or `max_rounds` rounds ended. A connection lost
/// after the client was admitted is re-established (`reconnect_attempts`, with a delay that starts
/// at `reconnect_delay_ms` and doubles up to 30 s); the round it was in is recorded as `failed`.
pub async fn run_client(
    cfg: &ClientConfig,
    opts: &ClientOptions,
) -> Result<ClientReport, ClientRunError> {
    run_client_with(cfg, opts, None).await
}

/// [`run_client`] for federated fine-tuning: `contributor` trains and scores each round's global
/// state (protocol-spec §9).
pub async fn run_client_with(
    cfg: &ClientConfig,
    opts: &ClientOptions,
    contributor: Option<Box<dyn Contributor>>,
) -> Result<ClientReport, ClientRunError> {
    let mut run = Run {
        fed: contributor.map(FedClient::new),
        cfg,
        opts,
        identity: Arc::new(cfg.identity.load()?),
        privacy: cfg.privacy.as_ref().map(|p| p.resolve()).transpose()?,
        known_peers: cfg.known_peers()?,
        report: ClientReport::default(),
        current: None,
        fail_before: opts.fail_before,
        fail_mid_upload: opts.fail_mid_upload,
    };
    let trust = cfg.trust.to_trust()?;
    let mut failures = 0u32;
    loop {
        let addr = match cfg.server.resolve().await {
            Ok(a) => a,
            Err(source) => {
                let e = ClientRunError::Resolve {
                    server: cfg.server.to_string(),
                    source,
                };
                // A name that does not resolve yet (DNS, a Kubernetes service starting) is worth
                // retrying once the server had admitted this client; at the first start a
                // supervisor restarts the process.
                if !run.admitted() || failures >= cfg.reconnect_attempts {
                    return Err(e);
                }
                run.abandon_current("interrupted", format!("connection lost: {e}"));
                let delay = reconnect_delay(cfg.reconnect_delay_ms, failures);
                failures += 1;
                warn!(error = %e, attempt = failures, of = cfg.reconnect_attempts, "cannot resolve the server; retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let connected = ClientSession::connect(
            addr,
            &cfg.server_name,
            &trust,
            &run.identity,
            cfg.max_frame_bytes,
            Duration::from_millis(cfg.connect_timeout_ms),
        )
        .await;
        let lost = match connected {
            Ok(mut s) => {
                failures = 0;
                info!(target: "progress::client", "connected to {} ({addr}) and authenticated as {}", cfg.server, short_key(&run.identity.public().to_hex()));
                match run.session(&mut s).await {
                    Ok(()) => {
                        s.close().await;
                        return Ok(run.report);
                    }
                    Err(ClientRunError::Session(e)) if e.is_connection_loss() => e,
                    Err(e) => return Err(e),
                }
            }
            // Only a client that was admitted before keeps trying; a first connection that
            // fails is reported (a supervisor such as systemd restarts the process).
            Err(e) if run.admitted() && e.is_connection_loss() => e,
            Err(e) => return Err(e.into()),
        };
        run.abandon_current("interrupted", format!("connection lost: {lost}"));
        if failures >= cfg.reconnect_attempts {
            return Err(lost.into());
        }
        let delay = reconnect_delay(cfg.reconnect_delay_ms, failures);
        failures += 1;
        warn!(error = %lost, attempt = failures, of = cfg.reconnect_attempts, delay_ms = delay.as_millis() as u64, "connection lost; reconnecting");
        tokio::time::sleep(delay).await;
    }
}

/// The delay before reconnection attempt `failures + 1`: `base_ms` doubled per failure, at most
/// 30 s.
fn reconnect_delay(base_ms: u64, failures: u32) -> Duration {
    let ms = base_ms.saturating_mul(1u64 << failures.min(20));
    Duration::from_millis(ms.min(30_000))
}

/// One client run across (re)connections.
struct Run<'a> {
    fed: Option<FedClient>,
    cfg: &'a ClientConfig,
    opts: &'a ClientOptions,
    identity: Arc<IdentityKey>,
    privacy: Option<fedlora_dp::ResolvedPrivacy>,
    known_peers: Vec<PublicIdentity>,
    report: ClientReport,
    current: Option<Current>,
    fail_before: Option<Stage>,
    fail_mid_upload: bool,
}

impl Run<'_> {
    /// Records the round in progress, if it has no outcome yet, as `outcome` for `reason`.
    fn abandon_current(&mut self, outcome: &str, reason: String) {
        if let Some(old) = self.current.take() {
            if old.result.is_none() {
                info!(target: "progress::client", "round {}: {outcome}: {reason}", old.round);
                self.report
                    .rounds
                    .push(round_result(&old, outcome, Some(reason), None));
            }
        }
    }

    /// Whether the server ever admitted this client (it was connected and authenticated).
    fn admitted(&self) -> bool {
        self.report.connections > 0
    }

    /// Serves one connection until the server says done (`Ok`) or something fails.
    async fn session(&mut self, s: &mut ClientSession) -> Result<(), ClientRunError> {
        self.report.connections += 1;
        loop {
            let Some((h, body)) = s.recv().await? else {
                break;
            };
            let payload = &body[PAYLOAD_OFFSET..];
            if h.sender != SERVER && h.kind != Kind::RoundStart {
                return Err(
                    SessionError::Violation(format!("frame from sender {}", h.sender)).into(),
                );
            }
            if h.session != s.session {
                return Err(SessionError::Violation("frame for another session".into()).into());
            }
            match h.kind {
                Kind::RoundStart => {
                    let start: RoundStart = serde_json::from_slice(payload)
                        .map_err(|e| SessionError::Violation(format!("round start: {e}")))?;
                    let mut peers = HashMap::new();
                    for (id, hex_key) in &start.peers {
                        let pk = PublicIdentity::from_hex(hex_key).map_err(|e| {
                            SessionError::Violation(format!("roster key of {id}: {e}"))
                        })?;
                        peers.insert(*id, pk);
                    }
                    if peers.get(&h.sender) != Some(&self.identity.public()) {
                        return Err(SessionError::Violation(
                            "roster does not list this client under its id".into(),
                        )
                        .into());
                    }
                    if let Err(unknown) = check_roster(&peers, &self.known_peers) {
                        warn!(
                            round = h.round,
                            peer = unknown,
                            "roster names an identity outside known_peers; sitting this round out"
                        );
                        self.abandon_current("failed", "superseded by a new round".into());
                        self.report.rounds.push(ClientRound {
                            round: h.round,
                            client_id: h.sender,
                            outcome: "refused".into(),
                            reason: Some(format!(
                                "roster names client {unknown} with an identity not in known_peers"
                            )),
                            aggregate_sha256: None,
                            sent_bytes: 0,
                            masked_input_bytes: 0,
                            udp_tx_bytes: 0,
                            lost_packets: 0,
                            clipped_values: 0,
                        });
                        if reached(self.cfg, &self.report) {
                            break;
                        }
                        continue;
                    }
                    self.abandon_current("failed", "superseded by a new round".into());
                    info!(
                        target: "progress::client",
                        "round {}: invited ({} round, {} clients, this client is {})",
                        h.round,
                        start.purpose.name(),
                        peers.len(),
                        h.sender
                    );
                    let pending = match start.purpose {
                        Purpose::Vector => None,
                        _ => {
                            let fed = self.fed.as_ref().ok_or(ClientRunError::NoTrainer)?;
                            Some(fed.start(&start).map_err(SessionError::Violation)?)
                        }
                    };
                    let stats = s.conn.stats();
                    let (udp_tx_start, lost_start) = (stats.udp_tx.bytes, stats.path.lost_packets);
                    self.current = Some(Current {
                        round: h.round,
                        id: h.sender,
                        peers,
                        client: None,
                        sent_bytes: 0,
                        masked_input_bytes: 0,
                        udp_tx_start,
                        udp_tx_now: udp_tx_start,
                        lost_start,
                        lost_now: lost_start,
                        result: None,
                        setup: None,
                        purpose: start.purpose,
                        pending,
                        clipped_values: 0,
                    });
                }
                Kind::Protocol => {
                    let Some(cur) = self.current.as_mut().filter(|c| c.round == h.round) else {
                        warn!(
                            round = h.round,
                            "protocol message for a round this client is not in; ignored"
                        );
                        continue;
                    };
                    let msg = decode_server(payload)
                        .map_err(|e| SessionError::Violation(format!("decode: {e}")))?;
                    if cur.client.is_none() {
                        let ServerMessage::Setup(setup) = &msg else {
                            warn!("protocol message before setup; ignored");
                            continue;
                        };
                        let auth =
                            Ed25519Authenticator::client(self.identity.clone(), cur.peers.clone());
                        let mut client = if cur.pending.is_some() {
                            // Federated: the update is still being trained; it is provided when the
                            // masked input is due.
                            if let Some(fed) = &self.fed {
                                fed.check_setup(cur.purpose, setup)
                                    .map_err(SessionError::Violation)?;
                            }
                            Client::deferred(cur.id, &mut rand::rng())
                                .with_noise_free_tail(public_tail(setup))
                        } else {
                            let len = fedlora_secagg::manifest_len(&setup.manifest) as usize;
                            let mut input = load_input(self.cfg.input.as_ref(), cur.round, len)?;
                            // Differential privacy: clip the whole contribution in L2 norm before
                            // it is quantized (protocol-spec §7.2).
                            if let Some(c) = self.privacy.as_ref().and_then(|p| p.clip_norm) {
                                fedlora_dp::clip_l2(&mut input.values, c)
                                    .map_err(|e| ClientRunError::Input(format!("clipping: {e}")))?;
                            }
                            let range = crate::contribution::check(
                                &mut input,
                                setup.params.clip,
                                setup.params.weight_bound,
                                cur.round,
                                "[input]",
                            )
                            .map_err(ClientRunError::Input)?;
                            cur.clipped_values = range.clipped;
                            Client::new(cur.id, input, &mut rand::rng())
                        }
                        .with_authenticator(Box::new(auth));
                        cur.setup = Some(setup.clone());
                        if let Some(p) = self
                            .privacy
                            .as_ref()
                            .filter(|_| cur.purpose != Purpose::Eval)
                        {
                            // This client's own noise share, calibrated from its own config (§7.3).
                            client = client.with_noise(Box::new(fedlora_dp::ClientNoise::new(*p)));
                        }
                        cur.client = Some(client);
                    }
                    let Some(client) = cur.client.as_mut() else {
                        continue;
                    };
                    let abort = match &msg {
                        ServerMessage::Abort(reason) => {
                            Some((abort_outcome(reason), reason.to_string()))
                        }
                        _ => None,
                    };
                    if client.input_due() && matches!(msg, ServerMessage::ShareBroadcast(_)) {
                        // The masked input is next: wait for local training (or scoring).
                        let provided = match (cur.pending.take(), cur.setup.as_ref()) {
                            (Some(p), Some(setup)) => {
                                let clip = self.privacy.as_ref().and_then(|p| p.clip_norm);
                                take_input(p, setup, clip).await.map(|(input, clipped)| {
                                    cur.clipped_values = clipped;
                                    input
                                })
                            }
                            _ => Err("no local work was started for this round".into()),
                        };
                        if let Err(e) = provided.and_then(|input| {
                            client.provide_input(input).map_err(|e| e.to_string())
                        }) {
                            warn!(round = cur.round, error = %e, "local training or scoring failed; leaving the round");
                            self.report
                                .rounds
                                .push(round_result(cur, "failed", Some(e), None));
                            self.current = None;
                            if reached(self.cfg, &self.report) {
                                break;
                            }
                            continue;
                        }
                    }
                    if let Err(e) = blocking(|| client.handle_message(msg)) {
                        warn!(round = cur.round, error = %e, "protocol error");
                    }
                    while let Some(out) = client.poll_transmit() {
                        let stage = out.stage();
                        if self.fail_before == Some(stage) {
                            return Err(ClientRunError::Injected(stage));
                        }
                        if self.opts.stall_before == Some(stage) {
                            warn!(round = cur.round, stage = %stage, "stalling as asked (test option)");
                            std::future::pending::<()>().await;
                        }
                        let bytes = encode_client(&out)
                            .map_err(|e| SessionError::Violation(format!("encode: {e}")))?;
                        if stage == Stage::MaskedInput {
                            if let Some(b) = &self.opts.upload_barrier {
                                b.wait().await;
                            }
                            cur.masked_input_bytes += bytes.len() as u64;
                        }
                        let header = s.header(Kind::Protocol, cur.round, stage_code(stage), cur.id);
                        if stage == Stage::MaskedInput && self.fail_mid_upload {
                            return Err(die_mid_upload(s, &header, &bytes).await);
                        }
                        cur.sent_bytes += bytes.len() as u64;
                        s.send_owned(&header, bytes).await?;
                    }
                    let stats = s.conn.stats();
                    (cur.udp_tx_now, cur.lost_now) = (stats.udp_tx.bytes, stats.path.lost_packets);
                    let events: Vec<ClientEvent> =
                        std::iter::from_fn(|| client.poll_event()).collect();
                    for ev in events {
                        match ev {
                            ClientEvent::Sent(stage) => {
                                info!(round = cur.round, stage = %stage, "sent")
                            }
                            ClientEvent::Done => info!(
                                round = cur.round,
                                "unmasking answered; waiting for the global state"
                            ),
                            ClientEvent::Aborted(reason) => {
                                let outcome = abort_outcome(&reason);
                                warn!(round = cur.round, %reason, "round {outcome} by the server");
                                cur.result = Some(round_result(
                                    cur,
                                    outcome,
                                    Some(reason.to_string()),
                                    None,
                                ));
                            }
                            ClientEvent::Failed(e) => {
                                warn!(round = cur.round, error = %e, "client refused to continue the round");
                                cur.result = Some(round_result(cur, "failed", Some(e), None));
                            }
                        }
                    }
                    if let (Some((outcome, reason)), None) = (abort, &cur.result) {
                        // The state machine had already finished its part (e.g. answered the unmask
                        // request); the round still ended without an aggregate.
                        warn!(round = cur.round, %reason, "round {outcome} by the server");
                        cur.result = Some(round_result(cur, outcome, Some(reason), None));
                    }
                    if let Some(done) = cur.result.clone() {
                        info!(
                            target: "progress::client",
                            "round {}: {}{}",
                            done.round,
                            done.outcome,
                            done.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
                        );
                        self.report.rounds.push(done);
                        self.current = None;
                        self.fail_before = None;
                        self.fail_mid_upload = false;
                        if reached(self.cfg, &self.report) {
                            break;
                        }
                    }
                }
                Kind::GlobalState if self.fed.is_some() => {
                    let result_of_eval = self
                        .current
                        .as_ref()
                        .is_some_and(|c| c.round == h.round && c.purpose == Purpose::Eval);
                    let hex_hash = if result_of_eval {
                        // An evaluation round's result: the securely summed score.
                        if payload.len() < 32
                            || Sha256::digest(&payload[32..]).as_slice() != &payload[..32]
                        {
                            return Err(SessionError::Violation(
                                "global state hash mismatch".into(),
                            )
                            .into());
                        }
                        hex::encode(&payload[..32])
                    } else {
                        let fed = self.fed.as_mut().ok_or(ClientRunError::NoTrainer)?;
                        let hex_hash = fed
                            .receive_state(payload)
                            .map_err(SessionError::Violation)?;
                        if let Some(dir) = &self.cfg.state_dir {
                            write_state(dir, h.round, &payload[32..], "fgs")
                                .map_err(ClientRunError::State)?;
                        }
                        info!(round = h.round, sha256 = %hex_hash, bytes = payload.len() - 32, "global state received");
                        if let Some(dir) = &self.cfg.state_dir {
                            info!(target: "progress::client", "round {}: global state written to {}", h.round, dir.display());
                        }
                        hex_hash
                    };
                    match self.current.take() {
                        Some(mut cur)
                            if cur.round == h.round
                                && cur.purpose != Purpose::Vector
                                && cur.setup.is_some() =>
                        {
                            let stats = s.conn.stats();
                            (cur.udp_tx_now, cur.lost_now) =
                                (stats.udp_tx.bytes, stats.path.lost_packets);
                            info!(target: "progress::client", "round {}: finished ({} round)", cur.round, cur.purpose.name());
                            self.report.rounds.push(round_result(
                                &cur,
                                "finished",
                                None,
                                Some(hex_hash),
                            ));
                            self.fail_before = None;
                            self.fail_mid_upload = false;
                        }
                        other => self.current = other,
                    }
                    if reached(self.cfg, &self.report) {
                        break;
                    }
                }
                Kind::GlobalState => {
                    if payload.len() < 32 || (payload.len() - 32) % 4 != 0 {
                        return Err(SessionError::Violation("malformed global state".into()).into());
                    }
                    let (hash, state) = payload.split_at(32);
                    if Sha256::digest(state).as_slice() != hash {
                        return Err(
                            SessionError::Violation("global state hash mismatch".into()).into()
                        );
                    }
                    let hex_hash = hex::encode(hash);
                    if let Some(dir) = &self.cfg.state_dir {
                        write_state(dir, h.round, state, "f32").map_err(ClientRunError::State)?;
                    }
                    info!(round = h.round, sha256 = %hex_hash, values = state.len() / 4, "global state received");
                    info!(target: "progress::client", "round {}: finished; global state received ({} values, sha256 {}){}", h.round, state.len() / 4, &hex_hash[..16], self.cfg.state_dir.as_ref().map(|d| format!(", written to {}", d.display())).unwrap_or_default());
                    match self.current.take() {
                        Some(mut cur) if cur.round == h.round => {
                            let stats = s.conn.stats();
                            (cur.udp_tx_now, cur.lost_now) =
                                (stats.udp_tx.bytes, stats.path.lost_packets);
                            self.report.rounds.push(round_result(
                                &cur,
                                "finished",
                                None,
                                Some(hex_hash),
                            ));
                            self.fail_before = None;
                            self.fail_mid_upload = false;
                        }
                        other => self.current = other,
                    }
                    if reached(self.cfg, &self.report) {
                        break;
                    }
                }
                Kind::Done => {
                    self.report.server_done = true;
                    break;
                }
                other => {
                    return Err(SessionError::Violation(format!("unexpected {other} frame")).into())
                }
            }
        }

        Ok(())
    }
}

/// With a non-empty `known` list, every roster identity must be in it; returns the first client id
/// whose key is not.
fn check_roster(peers: &HashMap<u32, PublicIdentity>, known: &[PublicIdentity]) -> Result<(), u32> {
    if known.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<&u32> = peers.keys().collect();
    ids.sort();
    match ids
        .into_iter()
        .find(|id| peers.get(id).is_some_and(|pk| !known.contains(pk)))
    {
        Some(id) => Err(*id),
        None => Ok(()),
    }
}

/// Runs CPU-heavy protocol work (masking a large vector) without stalling other tasks.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Whether `max_rounds` is reached. A round the server cancelled or a lost connection cut short
/// (`interrupted`) does not count: it is taken part in again after the server's restart.
fn reached(cfg: &ClientConfig, report: &ClientReport) -> bool {
    cfg.max_rounds.is_some_and(|m| {
        report
            .rounds
            .iter()
            .filter(|r| r.outcome != "interrupted")
            .count() as u64
            >= m
    })
}

/// The outcome of a round the server aborted: `interrupted` when the server cancelled it (operator
/// shutdown, deadlines), `aborted` when the protocol failed it.
fn abort_outcome(reason: &fedlora_secagg::AbortReason) -> &'static str {
    match reason {
        fedlora_secagg::AbortReason::Cancelled { .. } => "interrupted",
        _ => "aborted",
    }
}

/// The first 16 hex digits of a key, enough to recognise it in a log.
fn short_key(hex_key: &str) -> &str {
    &hex_key[..hex_key.len().min(16)]
}

fn round_result(
    cur: &Current,
    outcome: &str,
    reason: Option<String>,
    sha: Option<String>,
) -> ClientRound {
    ClientRound {
        round: cur.round,
        client_id: cur.id,
        outcome: outcome.into(),
        reason,
        aggregate_sha256: sha,
        sent_bytes: cur.sent_bytes,
        masked_input_bytes: cur.masked_input_bytes,
        udp_tx_bytes: cur.udp_tx_now.saturating_sub(cur.udp_tx_start),
        lost_packets: cur.lost_now.saturating_sub(cur.lost_start),
        clipped_values: cur.clipped_values,
    }
}

fn write_state(dir: &Path, round: u64, state: &[u8], ext: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    crate::store::write_atomic(&dir.join(format!("global-{round:06}.{ext}")), state)?;
    crate::store::write_atomic(&dir.join(format!("global-latest.{ext}")), state)
}

/// Test option `fail_mid_upload`: writes the frame header and half of the masked input, gives
/// QUIC a moment to put it on the wire, and reports the injected failure.
async fn die_mid_upload(s: &mut ClientSession, header: &Header, bytes: &[u8]) -> ClientRunError {
    let mut partial = match frame_head(header, bytes.len()) {
        Ok(head) => head,
        Err(e) => return SessionError::from(e).into(),
    };
    partial.extend_from_slice(&bytes[..bytes.len() / 2]);
    if let Err(e) = s.send_raw(&partial).await {
        return e.into();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    warn!("dying half-way through the upload as asked (test option)");
    ClientRunError::Injected(Stage::MaskedInput)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_doubles_up_to_thirty_seconds() {
        assert_eq!(reconnect_delay(1_000, 0), Duration::from_secs(1));
        assert_eq!(reconnect_delay(1_000, 1), Duration::from_secs(2));
        assert_eq!(reconnect_delay(1_000, 4), Duration::from_secs(16));
        assert_eq!(reconnect_delay(1_000, 5), Duration::from_secs(30));
        assert_eq!(reconnect_delay(u64::MAX, 40), Duration::from_secs(30));
    }

    #[test]
    fn synthetic_input_is_deterministic_and_bounded() {
        let a = synthetic_input(7, 3, 1000);
        assert_eq!(a, synthetic_input(7, 3, 1000));
        assert_ne!(a, synthetic_input(7, 4, 1000));
        assert_ne!(a, synthetic_input(8, 3, 1000));
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
    }

    #[test]
    fn roster_must_be_within_known_peers() {
        use crate::identity::IdentityKey;
        let (a, b, c) = (
            IdentityKey::generate().public(),
            IdentityKey::generate().public(),
            IdentityKey::generate().public(),
        );
        let peers: HashMap<u32, PublicIdentity> = [(0, a), (1, b)].into();
        assert_eq!(
            check_roster(&peers, &[]),
            Ok(()),
            "no list: trust the server's roster"
        );
        assert_eq!(check_roster(&peers, &[a, b, c]), Ok(()));
        assert_eq!(check_roster(&peers, &[a, c]), Err(1));
    }

    #[test]
    fn file_input_length_is_checked() {
        let dir = std::env::temp_dir().join(format!("fedlora-input-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("in.f32");
        let vals = [0.25f32, -0.5, 1.0];
        std::fs::write(
            &p,
            vals.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        )
        .expect("write");
        let cfg = InputConfig::File {
            path: p.clone(),
            weight: 2,
        };
        let input = load_input(Some(&cfg), 0, 3).expect("load");
        assert_eq!(input.values, vals);
        assert_eq!(input.weight, 2);
        assert!(matches!(
            load_input(Some(&cfg), 0, 4),
            Err(ClientRunError::Input(_))
        ));
        let e = load_input(None, 0, 4).expect_err("no input");
        assert!(e.to_string().contains("no [input] section"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
