//! The aggregation server: accepts enrolled clients over QUIC and, for each of R rounds, drives one
//! [`fedlora_secagg::Server`] with per-stage deadlines, then sends the new global state to every
//! connected client. Everything the protocol decides stays in `fedlora-secagg`; this module only
//! moves bytes, keeps time, enforces the transport binding and writes the store.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedlora_secagg::wire::{decode_client, encode_server, ServerMessage, Stage, TensorSpec};
use fedlora_secagg::{AbortReason, RoundConfig, ServerEvent};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::auth::Ed25519Authenticator;
use crate::clock::Clock;
use crate::config::{ConfigError, ServerConfig};
use crate::federated::{Purpose, ServerFederation, EVAL_CLIP};
use crate::framing::{
    read_frame, read_frame_len, write_frame, FrameError, Header, Kind, ReplayGuard, HEADER_LEN,
    SERVER,
};
use crate::identity::{PublicIdentity, Registry, HELLO_CONTEXT};
use crate::pacing::{read_holding, UploadPacer, Windows, SLOT_STALL};
use crate::quic::{server_endpoint, QuicError};
use crate::session::{
    exporter, server_stage_code, stage_code, RoundStart, CLOSE_OK, CLOSE_REFUSED, CLOSE_SHUTDOWN,
    CLOSE_VIOLATION, MAX_HELLO_FRAME, NO_STAGE,
};
use crate::shutdown::{Shutdown, Stop};
use crate::store::{Store, StoreError};
use crate::tls::{ServerCert, TlsError};

/// Errors that stop the server (a single round's trouble never does: it is recorded and the next
/// round runs).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS certificate could not be loaded or generated.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC endpoint could not be started.
    #[error(transparent)]
    Quic(#[from] QuicError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The local socket address could not be read.
    #[error("endpoint address: {0}")]
    Addr(std::io::Error),
    /// The privacy section is invalid.
    #[error("privacy: {0}")]
    Privacy(#[from] fedlora_dp::ServerPrivacyError),
    /// A shutdown was requested while waiting for clients (handled inside [`serve_until`], which
    /// then returns its report).
    #[error("stopped by {}", .0.signal)]
    Shutdown(Stop),
}

/// Where the server listens and the certificate fingerprint clients pin.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    /// Bound UDP address.
    pub addr: SocketAddr,
    /// SHA-256 of the server certificate.
    pub fingerprint: [u8; 32],
}

/// Upload-stage ingest measurement of one round.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IngestStats {
    /// Masked-input frames accepted.
    pub frames: u32,
    /// Bytes of those frames on the stream (length prefix + frame header + encoded message).
    pub wire_bytes: u64,
    /// Raw quantized payload of those inputs: words × ring_bits / 8.
    pub quantized_bytes: u64,
    /// From the first byte of the first masked input on the stream to the moment the last one has
    /// been added into the aggregate (reception, checks and accumulation all inside).
    pub seconds: f64,
    /// `wire_bytes / seconds`.
    pub bytes_per_sec: f64,
}

/// Outcome of one round, as reported by `fedlora server --json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundSummary {
    /// Round number.
    pub round: u64,
    /// `vector`, `train` or `eval`.
    pub purpose: Purpose,
    /// `finished` or `aborted`.
    pub status: String,
    /// Identity names of the invited clients, by client id.
    pub participants: Vec<String>,
    /// Client ids whose input is in the aggregate.
    pub survivors: Vec<u32>,
    /// Client ids dropped, with the stage they missed.
    pub dropped: Vec<(u32, String)>,
    /// Why the round aborted.
    pub abort_reason: Option<String>,
    /// SHA-256 (hex) of the aggregate file (f32 little-endian mean).
    pub aggregate_sha256: Option<String>,
    /// Degree, threshold and ring of the round.
    pub threshold: Option<u32>,
    /// Ring width in bits.
    pub ring_bits: Option<u8>,
    /// Bound on |mean − exact weighted mean of the clipped inputs| from quantization alone.
    pub error_bound: Option<f64>,
    /// Messages rejected by the transport binding or the protocol.
    pub rejected: u32,
    /// Wall time of the round (from the first setup message to the end).
    pub wall_ms: u64,
    /// Upload-stage ingest.
    pub ingest: Option<IngestStats>,
}

/// What `serve` returns.
#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    /// Bound address.
    pub listen: String,
    /// Certificate fingerprint (hex).
    pub fingerprint: String,
    /// Rounds found interrupted at start-up and recorded as aborted.
    pub interrupted_rounds: Vec<u64>,
    /// The rounds run by this process (federated: training rounds, each followed by the
    /// evaluation of its result; the first evaluation scores the initial model).
    pub rounds: Vec<RoundSummary>,
    /// The federated run, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federation: Option<FederationReport>,
    /// The signal that stopped the server before its last round, if one did.
    pub shutdown: Option<Stop>,
}

/// What a federated run produced.
#[derive(Debug, Clone, Serialize)]
pub struct FederationReport {
    /// The aggregation rule.
    pub rule: String,
    /// The latest global adapter (PEFT format).
    pub global_dir: String,
    /// Rounds folded into the global state.
    pub rounds_folded: u64,
    /// Securely summed held-out scores: (rounds folded in, metric, loss); the first, at 0 rounds,
    /// is the initial model's.
    pub scores: Vec<(u64, f64, f64)>,
}

/// How long a stopping server lets queued frames (the typed abort) reach the clients.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);

/// How often a progress line reports a stage that is still waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);

/// A frame body ready to write (header + payload), shared between recipients.
type Outgoing = Arc<Vec<u8>>;

enum Inbound {
    Joined {
        conn_id: u64,
        name: String,
        pk: PublicIdentity,
        tx: mpsc::UnboundedSender<Outgoing>,
        conn: quinn::Connection,
    },
    Refused {
        remote: SocketAddr,
        reason: String,
    },
    Frame {
        conn_id: u64,
        body: Vec<u8>,
        first_byte: Instant,
    },
    /// A masked input begins; its words follow as `UploadPiece`s (protocol-spec §4.3.2 streaming).
    UploadBegin {
        conn_id: u64,
        /// The frame header and the message's masked-input prefix.
        head: Vec<u8>,
        ring_bits: u8,
        count: u32,
        /// Length of the whole frame body.
        frame_len: u32,
        first_byte: Instant,
    },
    UploadPiece {
        conn_id: u64,
        piece: Bytes,
    },
    UploadEnd {
        conn_id: u64,
    },
    Broken {
        conn_id: u64,
        error: String,
    },
    Left {
        conn_id: u64,
    },
}

struct Conn {
    name: String,
    pk: PublicIdentity,
    tx: mpsc::UnboundedSender<Outgoing>,
    conn: quinn::Connection,
}

struct AcceptCtx {
    registry: Registry,
    session: [u8; 16],
    max_frame: u32,
    tx: mpsc::Sender<Inbound>,
    pacer: Option<UploadPacer>,
}

/// Runs the server: `cfg.rounds.count` rounds, then tells every client it is done.
/// `on_listening` is called once the endpoint is bound (the CLI prints address and fingerprint).
pub async fn serve(
    cfg: ServerConfig,
    clock: Arc<dyn Clock>,
    on_listening: impl FnOnce(&Listening),
) -> Result<ServerReport, ServerError> {
    serve_until(cfg, clock, Shutdown::never(), on_listening).await
}

/// [`serve`] until `shutdown` is requested: then the round under way is cancelled (participants get
/// the typed `Cancelled` abort), recorded as aborted, the audit log says why, every connection is
/// closed with [`CLOSE_SHUTDOWN`] and the report (with `shutdown` set) is returned.
///
/// Nothing is written before the whole configuration and its paths pass
/// [`ServerConfig::preflight`].
pub async fn serve_until(
    cfg: ServerConfig,
    clock: Arc<dyn Clock>,
    shutdown: Shutdown,
    on_listening: impl FnOnce(&Listening),
) -> Result<ServerReport, ServerError> {
    cfg.preflight()?;
    let privacy = match &cfg.privacy {
        Some(p) => Some(fedlora_dp::ServerPrivacy::new(p)?),
        None => None,
    };
    let registry = cfg.registry()?;
    // The federation's state is read (and checked against the configuration) before anything is
    // written.
    let fed = match &cfg.federation {
        Some(f) => Some(ServerFederation::open(f.clone(), &cfg.data_dir)?),
        None => None,
    };
    let (store, interrupted) = Store::open(&cfg.data_dir, clock)?;
    for r in &interrupted {
        warn!(
            round = r,
            "round was interrupted by a server restart; recorded as aborted"
        );
    }
    let session = store.session_id()?;
    let cert = ServerCert::load_or_generate(
        cfg.tls.cert.as_deref(),
        cfg.tls.key.as_deref(),
        &cfg.data_dir,
        &cfg.tls.names,
    )?;
    let idle_window = cfg
        .receive_window_bytes
        .unwrap_or_else(|| crate::quic::server_window(cfg.rounds.max_clients));
    let (windows, pacer) = match cfg.upload_slots {
        0 => (Windows::uniform(idle_window), None),
        slots => {
            let windows = Windows::paced(slots, idle_window);
            (windows, Some(UploadPacer::new(slots, windows)))
        }
    };
    let endpoint = server_endpoint(cfg.listen, &cert, windows)?;
    let addr = endpoint.local_addr().map_err(ServerError::Addr)?;
    let listening = Listening {
        addr,
        fingerprint: cert.fingerprint(),
    };
    let fp_path = cfg.data_dir.join("server.fingerprint");
    crate::store::write_atomic(
        &fp_path,
        format!("{}\n", hex::encode(listening.fingerprint)).as_bytes(),
    )
    .map_err(|source| TlsError::Io {
        path: fp_path.display().to_string(),
        source,
    })?;
    on_listening(&listening);
    info!(%addr, fingerprint = %hex::encode(listening.fingerprint), enrolled = registry.len(), "listening");
    store.audit(
        None,
        "server_started",
        &format!("listen={addr} enrolled={}", registry.len()),
    )?;

    let (tx, rx) = mpsc::channel(1024);
    let ctx = Arc::new(AcceptCtx {
        registry,
        session,
        max_frame: cfg.max_frame_bytes,
        tx,
        pacer,
    });
    let accept = tokio::spawn(accept_loop(endpoint.clone(), ctx));

    let mut co = Coordinator {
        cfg,
        store,
        session,
        conns: HashMap::new(),
        rx,
        privacy,
        fed,
        shutdown,
    };
    let mut rounds = Vec::new();
    let stopped = co.run_all(&mut rounds).await?;
    let federation = co.fed.as_ref().map(|f| FederationReport {
        rule: f.global.rule.name().into(),
        global_dir: f.dir().join("latest").display().to_string(),
        rounds_folded: f.global.round,
        scores: f.scores.clone(),
    });
    match stopped {
        None => co.finish().await,
        Some(stop) => co.finish_shutdown(stop).await,
    }
    accept.abort();
    match stopped {
        None => endpoint.close(CLOSE_OK.into(), b"done"),
        Some(_) => endpoint.close(CLOSE_SHUTDOWN.into(), b"server shutting down"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(ServerReport {
        listen: addr.to_string(),
        fingerprint: hex::encode(listening.fingerprint),
        interrupted_rounds: interrupted,
        rounds,
        federation,
        shutdown: stopped,
    })
}

async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<AcceptCtx>) {
    let mut next_id = 0u64;
    while let Some(incoming) = endpoint.accept().await {
        next_id += 1;
        tokio::spawn(handshake(incoming, next_id, ctx.clone()));
    }
}

/// Authenticates one connection: the client's first frame is a hello carrying its identity key
/// and an Ed25519 signature over this TLS session's exporter; unknown keys are refused.
async fn handshake(incoming: quinn::Incoming, conn_id: u64, ctx: Arc<AcceptCtx>) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "handshake failed");
            return;
        }
    };
    let remote = conn.remote_address();
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let body = read_frame(&mut recv, MAX_HELLO_FRAME)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((send, recv, body))
    })
    .await;
    let (mut send, recv, body) = match first {
        Ok(Ok((send, recv, Some(body)))) => (send, recv, body),
        Ok(Ok((_, _, None))) => return,
        Ok(Err(e)) => {
            let _ = ctx
                .tx
                .send(Inbound::Refused {
                    remote,
                    reason: format!("bad hello: {e}"),
                })
                .await;
            conn.close(CLOSE_VIOLATION.into(), b"bad hello");
            return;
        }
        Err(_) => {
            conn.close(CLOSE_VIOLATION.into(), b"hello timeout");
            return;
        }
    };
    let verdict = check_hello(&conn, &ctx.registry, &body);
    match verdict {
        Ok((name, pk)) => {
            let welcome = Header {
                kind: Kind::Welcome,
                session: ctx.session,
                round: 0,
                stage: NO_STAGE,
                sender: SERVER,
            };
            if write_frame(&mut send, &welcome.encode(&ctx.session))
                .await
                .is_err()
            {
                return;
            }
            let (out_tx, out_rx) = mpsc::unbounded_channel();
            tokio::spawn(writer(send, out_rx));
            tokio::spawn(reader(
                recv,
                conn_id,
                ctx.max_frame,
                ctx.tx.clone(),
                conn.clone(),
                ctx.pacer.clone(),
            ));
            let _ = ctx
                .tx
                .send(Inbound::Joined {
                    conn_id,
                    name,
                    pk,
                    tx: out_tx,
                    conn,
                })
                .await;
        }
        Err(reason) => {
            let refused = Header {
                kind: Kind::Refused,
                session: ctx.session,
                round: 0,
                stage: NO_STAGE,
                sender: SERVER,
            };
            let _ = write_frame(&mut send, &refused.encode(reason.as_bytes())).await;
            let _ = send.finish();
            let _ = ctx
                .tx
                .send(Inbound::Refused {
                    remote,
                    reason: reason.clone(),
                })
                .await;
            // Let the client read the reason, then close.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
        }
    }
}

fn check_hello(
    conn: &quinn::Connection,
    registry: &Registry,
    body: &[u8],
) -> Result<(String, PublicIdentity), String> {
    let (h, payload) = Header::decode(body).map_err(|e| format!("bad hello: {e}"))?;
    if h.kind != Kind::Hello || payload.len() != 96 {
        return Err("bad hello: expected a hello frame of 96 bytes".into());
    }
    let mut pk = [0u8; 32];
    pk.copy_from_slice(&payload[..32]);
    let Some((name, key)) = registry.lookup(&pk) else {
        return Err(format!("unknown identity {}", hex::encode(pk)));
    };
    let ekm = exporter(conn).map_err(|e| format!("exporter: {e}"))?;
    if !key.verify(HELLO_CONTEXT, &ekm, &payload[32..]) {
        return Err(format!("bad hello signature for {name}"));
    }
    Ok((name.to_string(), key))
}

async fn writer(mut send: quinn::SendStream, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(body) = rx.recv().await {
        if write_frame(&mut send, &body).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn reader(
    mut recv: quinn::RecvStream,
    conn_id: u64,
    max_frame: u32,
    tx: mpsc::Sender<Inbound>,
    conn: quinn::Connection,
    pacer: Option<UploadPacer>,
) {
    let upload = Upload {
        conn: &conn,
        pacer: pacer.as_ref(),
        tx: &tx,
        conn_id,
    };
    loop {
        match read_frame_or_stream(&mut recv, max_frame, &upload).await {
            Ok(Some(ev)) => {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            Ok(None) | Err(FrameError::Io(_)) => break,
            Err(e) => {
                // Framing is lost (oversized length): the stream cannot be resynchronised.
                let _ = tx
                    .send(Inbound::Broken {
                        conn_id,
                        error: e.to_string(),
                    })
                    .await;
                conn.close(CLOSE_VIOLATION.into(), b"frame violation");
                break;
            }
        }
    }
    let _ = tx.send(Inbound::Left { conn_id }).await;
}

/// Frames at least this long whose message is a masked input are streamed into the sum piece by
/// piece (protocol-spec §4.3.2 streaming) instead of being read whole first.
const STREAM_FRAME_BYTES: u32 = 64 << 10;
/// Size of the pieces a streamed masked input is handed to the coordinator in.
const UPLOAD_PIECE_BYTES: usize = 64 << 10;

/// Reads one frame. A masked vector is streamed: its begin and pieces go to the coordinator as they
/// arrive (the returned event is its end), so its words are added while they are still in cache
/// and no second copy of the vector is made. Any other frame is read whole into a buffer of exactly
/// its length, without zero-filling it first.
/// Where a reader's streamed uploads go, and how they are paced.
struct Upload<'a> {
    conn: &'a quinn::Connection,
    pacer: Option<&'a UploadPacer>,
    tx: &'a mpsc::Sender<Inbound>,
    conn_id: u64,
}

async fn read_frame_or_stream(
    recv: &mut quinn::RecvStream,
    max_frame: u32,
    upload: &Upload<'_>,
) -> Result<Option<Inbound>, FrameError> {
    let Upload {
        conn,
        pacer,
        tx,
        conn_id,
    } = *upload;
    use bytes::BufMut;
    use tokio::io::AsyncReadExt;
    let Some((len, first_byte)) = read_frame_len(recv, max_frame).await? else {
        return Ok(None);
    };
    let head_len = HEADER_LEN + fedlora_wire::MASKED_INPUT_PREFIX_BYTES;
    let mut body = Vec::with_capacity(len as usize);
    if len >= STREAM_FRAME_BYTES {
        body.resize(head_len, 0);
        AsyncReadExt::read_exact(recv, &mut body).await?;
        let shape = fedlora_wire::masked_input_shape(
            &body[HEADER_LEN..],
            u64::from(len) - HEADER_LEN as u64,
        );
        if let Ok(Some((ring_bits, count))) = shape {
            let begin = Inbound::UploadBegin {
                conn_id,
                head: body,
                ring_bits,
                count,
                frame_len: len,
                first_byte,
            };
            if tx.send(begin).await.is_err() {
                return Ok(None);
            }
            // Held until the whole vector is in (`pacing`); dropped early if the client stalls.
            let mut slot = match pacer {
                Some(p) => p.admit(conn).await,
                None => None,
            };
            let mut left = len as usize - head_len;
            while left > 0 {
                let mut piece = bytes::BytesMut::with_capacity(left.min(UPLOAD_PIECE_BYTES));
                while piece.len() < piece.capacity().min(left) {
                    let room = piece.capacity().min(left) - piece.len();
                    let mut room = (&mut piece).limit(room);
                    let read = recv.read_buf(&mut room);
                    if read_holding(&mut slot, SLOT_STALL, read).await? == 0 {
                        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                left -= piece.len();
                let piece = Inbound::UploadPiece {
                    conn_id,
                    piece: piece.freeze(),
                };
                if tx.send(piece).await.is_err() {
                    return Ok(None);
                }
            }
            return Ok(Some(Inbound::UploadEnd { conn_id }));
        }
        // Not a well-formed masked input: read the rest and let the whole-frame checks say why.
    }
    // `limit`: the allocation may be larger than asked, and the next frame must stay unread.
    while body.len() < len as usize {
        let room = len as usize - body.len();
        if recv.read_buf(&mut (&mut body).limit(room)).await? == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(Some(Inbound::Frame {
        conn_id,
        body,
        first_byte,
    }))
}

/// Runs `f` without stalling other tasks on a multi-threaded runtime (secagg's unmasking is CPU work).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The checks every round frame passes before its message is looked at: the sender is a participant,
/// the header decodes, and it is bound to this session, round and open stage without replay
/// (protocol-spec §8.4). Returns the sender's client id, the header and the payload.
fn check_frame<'b>(
    run: &RoundRun,
    proto: &fedlora_secagg::Server,
    conn_id: u64,
    body: &'b [u8],
) -> Result<(u32, Header, &'b [u8]), String> {
    let &cid = run
        .by_conn
        .get(&conn_id)
        .ok_or_else(|| "not a participant of this round".to_string())?;
    let (h, payload) =
        Header::decode(body).map_err(|e| format!("client {cid}: malformed frame: {e}"))?;
    let open = proto.stage().map(stage_code).unwrap_or(NO_STAGE);
    run.guard
        .check(&h, cid, open)
        .map_err(|e| format!("client {cid}: {e}"))?;
    Ok((cid, h, payload))
}

/// The frame header's stage must be the stage of the message it carries.
fn check_frame_stage(cid: u32, h: &Header, msg_stage: Stage) -> Result<(), String> {
    if stage_code(msg_stage) == h.stage {
        Ok(())
    } else {
        Err(format!(
            "client {cid}: frame stage {} carries a {msg_stage} message",
            h.stage
        ))
    }
}

struct Coordinator {
    cfg: ServerConfig,
    store: Store,
    session: [u8; 16],
    conns: HashMap<u64, Conn>,
    rx: mpsc::Receiver<Inbound>,
    /// Accountant and budget across rounds, when a privacy section is configured.
    privacy: Option<fedlora_dp::ServerPrivacy>,
    /// The federated run (rule, global state), when a federation section is configured.
    fed: Option<ServerFederation>,
    /// Asks the server to stop (SIGINT/SIGTERM).
    shutdown: Shutdown,
}

/// What one round sums and how (a raw vector, a federated training round, an evaluation round).
struct RoundPlan {
    purpose: Purpose,
    manifest: Vec<TensorSpec>,
    clip: f32,
    weight_bound: u32,
    /// Differential privacy applies (vectors and training rounds, not evaluation).
    private: bool,
    /// Values the noise covers (the manifest less public weight words).
    noise_dim: u64,
    /// The encoded global state sent to the participants before the round start, and its hash.
    global: Option<(Arc<Vec<u8>>, String)>,
    /// Deadline of the masked-input stage (training rounds: local training happens before it).
    masked_input_timeout: Option<Duration>,
}

/// Per-round bookkeeping while the protocol runs.
struct RoundRun {
    round: u64,
    /// client id → connection id.
    members: Vec<u64>,
    names: Vec<String>,
    by_conn: HashMap<u64, u32>,
    guard: ReplayGuard,
    rejected: u32,
    dropped: BTreeMap<u32, String>,
    ingest_first: Option<Instant>,
    ingest_last: Option<Instant>,
    ingest_frames: u32,
    ingest_bytes: u64,
    ingest_words: u64,
    ring_bits: u8,
    /// Masked inputs being streamed, by connection.
    streams: HashMap<u64, Streaming>,
}

/// A masked input being streamed in (protocol-spec §4.3.2 streaming).
/// What the reader says when a streamed masked input begins.
struct UploadBegin<'a> {
    conn_id: u64,
    head: &'a [u8],
    ring_bits: u8,
    count: u32,
    frame_len: u32,
    first_byte: Instant,
}

enum Streaming {
    /// Admitted by the state machine: its pieces go into the sum.
    Accepted {
        cid: u32,
        header: Header,
        first_byte: Instant,
        frame_len: u32,
        words: u32,
    },
    /// Refused, and reported once: its remaining pieces are dropped.
    Refused,
}

impl RoundRun {
    /// Counts one accepted masked input in the round's ingest figure, which ends once its words
    /// are in the sum.
    fn record_ingest(&mut self, first_byte: Instant, wire_bytes: u64, words: u64) {
        let done = Instant::now();
        self.ingest_first = Some(self.ingest_first.map_or(first_byte, |f| f.min(first_byte)));
        self.ingest_last = Some(self.ingest_last.map_or(done, |l| l.max(done)));
        self.ingest_frames += 1;
        self.ingest_bytes += wire_bytes;
        self.ingest_words += words;
    }
}

impl Coordinator {
    /// Runs every round (federated: each training round followed by the evaluation of its
    /// result) until the last one or a shutdown request; returns the request, if one stopped it.
    async fn run_all(
        &mut self,
        rounds: &mut Vec<RoundSummary>,
    ) -> Result<Option<Stop>, ServerError> {
        let evaluates = |co: &Self| co.fed.as_ref().is_some_and(ServerFederation::evaluates);
        if evaluates(self) && self.fed.as_ref().is_some_and(|f| f.global.round == 0) {
            // The initial model's score, for comparison with every round after it.
            let plan = self.eval_plan();
            match self.run_round(plan).await {
                Ok(summary) => rounds.push(summary),
                Err(ServerError::Shutdown(stop)) => return Ok(Some(stop)),
                Err(e) => return Err(e),
            }
        }
        for _ in 0..self.cfg.rounds.count {
            let plan = self.next_plan();
            let summary = match self.run_round(plan).await {
                Ok(summary) => summary,
                Err(ServerError::Shutdown(stop)) => return Ok(Some(stop)),
                Err(e) => return Err(e),
            };
            let evaluate = summary.status == "finished"
                && summary.purpose == Purpose::Train
                && evaluates(self);
            rounds.push(summary);
            if let Some(stop) = self.shutdown.requested() {
                return Ok(Some(stop));
            }
            if evaluate {
                let plan = self.eval_plan();
                match self.run_round(plan).await {
                    Ok(summary) => rounds.push(summary),
                    Err(ServerError::Shutdown(stop)) => return Ok(Some(stop)),
                    Err(e) => return Err(e),
                }
                if let Some(stop) = self.shutdown.requested() {
                    return Ok(Some(stop));
                }
            }
        }
        Ok(None)
    }

    /// Handles an event that is not part of a running round.
    fn on_event(
        &mut self,
        ev: Inbound,
        mut round: Option<&mut RoundRun>,
        proto: Option<&mut fedlora_secagg::Server>,
    ) {
        match ev {
            Inbound::Joined {
                conn_id,
                name,
                pk,
                tx,
                conn,
            } => {
                if let Some(old) = self
                    .conns
                    .iter()
                    .find(|(_, c)| c.pk == pk)
                    .map(|(id, _)| *id)
                {
                    if let Some(c) = self.conns.remove(&old) {
                        c.conn
                            .close(CLOSE_OK.into(), b"replaced by a newer connection");
                    }
                }
                info!(client = %name, "client connected");
                self.audit(None, "client_connected", &name);
                self.conns.insert(conn_id, Conn { name, pk, tx, conn });
            }
            Inbound::Refused { remote, reason } => {
                warn!(%remote, %reason, "connection refused");
                self.audit(None, "connection_refused", &format!("{remote}: {reason}"));
            }
            Inbound::Left { conn_id } => {
                if let (Some(run), Some(proto)) = (round.as_deref_mut(), proto) {
                    if let Some(Streaming::Accepted { cid, .. }) = run.streams.remove(&conn_id) {
                        if proto.cancel_masked_input(cid) {
                            self.audit(
                                Some(run.round),
                                "upload_cancelled",
                                &format!("client {cid}: connection lost mid-upload"),
                            );
                        }
                    }
                }
                if let Some(c) = self.conns.remove(&conn_id) {
                    info!(client = %c.name, "client disconnected");
                    self.audit(
                        round.as_ref().map(|r| r.round),
                        "client_disconnected",
                        &c.name,
                    );
                }
            }
            Inbound::Broken { conn_id, error } => {
                let name = self
                    .conns
                    .get(&conn_id)
                    .map(|c| c.name.clone())
                    .unwrap_or_default();
                warn!(client = %name, %error, "frame violation; connection closed");
                self.audit(
                    round.as_ref().map(|r| r.round),
                    "frame_violation",
                    &format!("{name}: {error}"),
                );
            }
            Inbound::UploadBegin {
                conn_id,
                head,
                ring_bits,
                count,
                frame_len,
                first_byte,
            } => match (round, proto) {
                (Some(run), Some(proto)) => {
                    let begin = UploadBegin {
                        conn_id,
                        head: &head,
                        ring_bits,
                        count,
                        frame_len,
                        first_byte,
                    };
                    self.on_upload_begin(run, proto, begin)
                }
                _ => self.reject_outside_round(conn_id),
            },
            Inbound::UploadPiece { conn_id, piece } => {
                if let (Some(run), Some(proto)) = (round, proto) {
                    self.on_upload_piece(run, proto, conn_id, piece);
                }
            }
            Inbound::UploadEnd { conn_id } => {
                if let (Some(run), Some(proto)) = (round, proto) {
                    self.on_upload_end(run, proto, conn_id);
                }
            }
            Inbound::Frame {
                conn_id,
                body,
                first_byte,
            } => match (round, proto) {
                (Some(run), Some(proto)) => {
                    self.on_round_frame(run, proto, conn_id, &body, first_byte)
                }
                _ => self.reject_outside_round(conn_id),
            },
        }
    }

    fn conn_name(&self, conn_id: u64) -> String {
        self.conns
            .get(&conn_id)
            .map(|c| c.name.clone())
            .unwrap_or_default()
    }

    fn reject_outside_round(&self, conn_id: u64) {
        let name = self.conn_name(conn_id);
        warn!(client = %name, "frame outside a round rejected");
        self.audit(None, "rejected", &format!("{name}: frame outside a round"));
    }

    fn reject_in_round(&self, run: &mut RoundRun, conn_id: u64, why: String) {
        let name = self.conn_name(conn_id);
        run.rejected += 1;
        warn!(round = run.round, client = %name, reason = %why, "message rejected");
        self.audit(Some(run.round), "rejected", &format!("{name}: {why}"));
    }

    /// The start of a streamed masked input: the same membership, framing and replay checks as a
    /// whole frame, then the state machine's own admission from the header alone.
    fn on_upload_begin(
        &mut self,
        run: &mut RoundRun,
        proto: &mut fedlora_secagg::Server,
        begin: UploadBegin<'_>,
    ) {
        let conn_id = begin.conn_id;
        let admitted = check_frame(run, proto, conn_id, begin.head)
            .and_then(|(cid, h, _)| {
                check_frame_stage(cid, &h, Stage::MaskedInput)?;
                Ok((cid, h))
            })
            .and_then(|(cid, h)| {
                proto
                    .begin_masked_input(cid, begin.ring_bits, begin.count)
                    .map(|()| (cid, h))
                    .map_err(|e| e.to_string())
            });
        let stream = match admitted {
            Ok((cid, header)) => Streaming::Accepted {
                cid,
                header,
                first_byte: begin.first_byte,
                frame_len: begin.frame_len,
                words: begin.count,
            },
            Err(why) => {
                self.reject_in_round(run, conn_id, why);
                Streaming::Refused
            }
        };
        run.streams.insert(conn_id, stream);
    }

    fn on_upload_piece(
        &mut self,
        run: &mut RoundRun,
        proto: &mut fedlora_secagg::Server,
        conn_id: u64,
        piece: Bytes,
    ) {
        let Some(Streaming::Accepted { cid, .. }) = run.streams.get(&conn_id) else {
            return;
        };
        if let Err(e) = proto.masked_input_piece(*cid, piece) {
            // The stage closed under it, or it overran: the state machine has taken it back out.
            run.streams.insert(conn_id, Streaming::Refused);
            self.reject_in_round(run, conn_id, e.to_string());
        }
    }

    fn on_upload_end(
        &mut self,
        run: &mut RoundRun,
        proto: &mut fedlora_secagg::Server,
        conn_id: u64,
    ) {
        let Some(Streaming::Accepted {
            cid,
            header,
            first_byte,
            frame_len,
            words,
        }) = run.streams.remove(&conn_id)
        else {
            return;
        };
        match proto.end_masked_input(cid) {
            Ok(()) => {
                run.guard.accept(&header);
                run.record_ingest(first_byte, 4 + u64::from(frame_len), u64::from(words));
            }
            Err(e) => self.reject_in_round(run, conn_id, e.to_string()),
        }
    }

    fn on_round_frame(
        &mut self,
        run: &mut RoundRun,
        proto: &mut fedlora_secagg::Server,
        conn_id: u64,
        body: &[u8],
        first_byte: Instant,
    ) {
        let (cid, h, payload) = match check_frame(run, proto, conn_id, body) {
            Ok(x) => x,
            Err(why) => return self.reject_in_round(run, conn_id, why),
        };
        // A masked vector is checked in its wire form and added straight from these bytes
        // (`Server::handle_bytes`); everything else is decoded first.
        let (msg_stage, words, msg) = match fedlora_wire::view_masked_input(payload) {
            Ok(Some(packed)) => (Stage::MaskedInput, Some(u64::from(packed.count)), None),
            Ok(None) => match decode_client(payload) {
                Ok(m) => (m.stage(), None, Some(m)),
                Err(e) => {
                    let why = format!("client {cid}: malformed message: {e}");
                    return self.reject_in_round(run, conn_id, why);
                }
            },
            Err(e) => {
                let why = format!("client {cid}: malformed message: {e}");
                return self.reject_in_round(run, conn_id, why);
            }
        };
        if let Err(why) = check_frame_stage(cid, &h, msg_stage) {
            return self.reject_in_round(run, conn_id, why);
        }
        let handled = match msg {
            Some(msg) => blocking(|| proto.handle_message(cid, msg)),
            None => blocking(|| proto.handle_bytes(cid, payload)),
        };
        match handled {
            Ok(()) => {
                run.guard.accept(&h);
                if let Some(words) = words {
                    run.record_ingest(first_byte, 4 + body.len() as u64, words);
                }
            }
            Err(e) => self.reject_in_round(run, conn_id, e.to_string()),
        }
    }

    fn audit(&self, round: Option<u64>, event: &str, detail: &str) {
        if let Err(e) = self.store.audit(round, event, detail) {
            warn!(error = %e, "audit log write failed");
        }
    }

    /// Waits until enough enrolled clients are connected; returns the connection ids of the
    /// round's participants (sorted by identity name), or `None` at the join deadline.
    async fn gather(&mut self) -> Option<Vec<u64>> {
        let r = self.cfg.rounds.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(r.join_timeout_ms);
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let n = self.conns.len() as u32;
            if n >= r.max_clients {
                break;
            }
            if n >= r.min_clients {
                grace.get_or_insert_with(|| {
                    tokio::time::Instant::now() + Duration::from_millis(r.join_grace_ms)
                });
            } else {
                grace = None;
            }
            let wake = grace.map_or(deadline, |g| g.min(deadline));
            if tokio::time::Instant::now() >= wake {
                break;
            }
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some(ev) => self.on_event(ev, None, None),
                    None => return None,
                },
                _ = self.shutdown.wait() => return None,
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        if (self.conns.len() as u32) < r.min_clients {
            return None;
        }
        let mut ids: Vec<(String, u64)> = self
            .conns
            .iter()
            .map(|(id, c)| (c.name.clone(), *id))
            .collect();
        ids.sort();
        ids.truncate(r.max_clients as usize);
        Some(ids.into_iter().map(|(_, id)| id).collect())
    }

    /// The plan of the next round: a raw vector, or the federation's next training round.
    fn next_plan(&self) -> RoundPlan {
        let p = &self.cfg.protocol;
        match &self.fed {
            None => RoundPlan {
                purpose: Purpose::Vector,
                manifest: vec![TensorSpec {
                    name: "adapter".into(),
                    shape: vec![self.cfg.rounds.parameters],
                }],
                clip: p.clip,
                weight_bound: p.weight_bound,
                private: true,
                noise_dim: u64::from(self.cfg.rounds.parameters),
                global: None,
                masked_input_timeout: None,
            },
            Some(f) => {
                let bytes = f.global.encode();
                let sha = hex::encode(Sha256::digest(&bytes));
                RoundPlan {
                    purpose: Purpose::Train,
                    // A manifest the rule cannot express (a tensor beyond u32 sizes) is refused
                    // by the layout's validation first; an empty one aborts the round cleanly.
                    manifest: f.train_manifest().unwrap_or_default(),
                    clip: f.section().value_clip,
                    weight_bound: f.section().weight_bound,
                    private: true,
                    noise_dim: f.train_values() - f.public_tail() as u64,
                    global: Some((Arc::new(bytes), sha)),
                    masked_input_timeout: Some(Duration::from_millis(f.section().train_timeout_ms)),
                }
            }
        }
    }

    /// The plan of an evaluation round: clients score the current global state. Before any
    /// training round clients do not hold it yet, so it is sent with the round start.
    fn eval_plan(&self) -> RoundPlan {
        let (bytes, sha, weight_bound) =
            self.fed
                .as_ref()
                .map_or((Vec::new(), String::new(), 1), |f| {
                    let bytes = f.global.encode();
                    let sha = hex::encode(Sha256::digest(&bytes));
                    let send = if f.global.round == 0 {
                        bytes
                    } else {
                        Vec::new()
                    };
                    (send, sha, f.section().weight_bound)
                });
        RoundPlan {
            purpose: Purpose::Eval,
            manifest: ServerFederation::eval_manifest(),
            clip: EVAL_CLIP,
            weight_bound,
            private: false,
            noise_dim: 0,
            global: Some((Arc::new(bytes), sha)),
            masked_input_timeout: self
                .fed
                .as_ref()
                .map(|f| Duration::from_millis(f.section().train_timeout_ms)),
        }
    }

    async fn run_round(&mut self, plan: RoundPlan) -> Result<RoundSummary, ServerError> {
        let round = self.store.next_round()?;
        let started = Instant::now();
        info!(round, "waiting for clients");
        let gathered = self.gather().await;
        if let Some(stop) = self.shutdown.requested() {
            // Stopped before the round started: nothing to record but the reason.
            self.audit(
                None,
                "server_shutdown",
                &format!("{}: stopped while waiting for clients", stop.signal),
            );
            return Err(ServerError::Shutdown(stop));
        }
        let Some(members) = gathered else {
            let reason = AbortReason::Cancelled {
                detail: format!(
                    "only {} of {} required clients joined within {} ms",
                    self.conns.len(),
                    self.cfg.rounds.min_clients,
                    self.cfg.rounds.join_timeout_ms
                ),
            };
            return self.abort_before_start(
                round,
                plan.purpose,
                started,
                Vec::new(),
                reason.to_string(),
            );
        };
        let n = members.len() as u32;
        let names: Vec<String> = members
            .iter()
            .filter_map(|id| self.conns.get(id).map(|c| c.name.clone()))
            .collect();
        let roster: HashMap<u32, PublicIdentity> = members
            .iter()
            .enumerate()
            .filter_map(|(i, id)| self.conns.get(id).map(|c| (i as u32, c.pk)))
            .collect();
        let mut request = self.cfg.protocol.request(n);
        request.clip = plan.clip;
        request.weight_bound = plan.weight_bound;
        let mut params = match fedlora_secagg::derive(&request) {
            Ok(d) => d.params,
            Err(e) => {
                return self.abort_before_start(
                    round,
                    plan.purpose,
                    started,
                    names,
                    format!("parameters: {e}"),
                )
            }
        };
        if plan.manifest.is_empty() {
            return self.abort_before_start(
                round,
                plan.purpose,
                started,
                names,
                "the rule has nothing to upload".into(),
            );
        }
        // Differential privacy: leave ring headroom for the noise, then refuse a round the budget
        // cannot afford before anything is sent (protocol-spec §7.4–§7.5).
        let dim = plan.noise_dim;
        let noise_plan = match self.privacy.as_ref().filter(|_| plan.private) {
            None => None,
            Some(p) => {
                let planned = p
                    .fit_params(&mut params, n, dim)
                    .and_then(|()| p.plan_round(&params, n, dim));
                match planned {
                    Ok(planned) => {
                        self.audit(
                            Some(round),
                            "privacy_planned",
                            &serde_json::json!({
                                "mode": p.mode(),
                                "planned_round_epsilon": planned.planned.round_epsilon,
                                "planned_cumulative_epsilon": planned.planned.cumulative_epsilon,
                                "delta": planned.planned.delta,
                                "min_survivors": planned.plan.min_survivors,
                                "wrap_probability_bound": planned.plan.wrap_probability_bound,
                            })
                            .to_string(),
                        );
                        Some(planned.plan)
                    }
                    Err(e) => {
                        return self.abort_before_start(
                            round,
                            plan.purpose,
                            started,
                            names,
                            format!("privacy: {e}"),
                        )
                    }
                }
            }
        };
        let manifest = plan.manifest.clone();
        let config = RoundConfig {
            round,
            nonce: rand::random(),
            num_clients: n,
            params: params.clone(),
            manifest,
        };
        let mut proto = match fedlora_secagg::Server::new(config) {
            Ok(s) => s.with_verifier(Box::new(Ed25519Authenticator::verifier(roster.clone()))),
            Err(e) => {
                return self.abort_before_start(
                    round,
                    plan.purpose,
                    started,
                    names,
                    format!("round config: {e}"),
                )
            }
        };
        let params_json = serde_json::json!({
            "clients": n, "degree": params.degree, "threshold": params.threshold, "ring_bits": params.ring_bits,
            "quant_bits": params.quant_bits, "clip": params.clip, "weight_bound": params.weight_bound,
            "parameters": fedlora_secagg::manifest_len(&plan.manifest), "purpose": plan.purpose,
        })
        .to_string();
        let participants: Vec<(u32, String, String)> = (0..n)
            .filter_map(|i| {
                roster
                    .get(&i)
                    .map(|pk| (i, names[i as usize].clone(), pk.to_hex()))
            })
            .collect();
        self.store.begin_round(round, &params_json, &participants)?;
        self.audit(Some(round), "round_started", &params_json);
        info!(
            round,
            clients = n,
            threshold = params.threshold,
            degree = params.degree,
            ring_bits = params.ring_bits,
            "round started"
        );
        info!(
            target: "progress::server",
            "round {round} ({}) started with {n} clients: {}",
            plan.purpose.name(),
            names.join(", ")
        );

        let mut peers: Vec<(u32, String)> =
            roster.iter().map(|(i, pk)| (*i, pk.to_hex())).collect();
        peers.sort();
        let start_payload = serde_json::to_vec(&RoundStart {
            peers,
            purpose: plan.purpose,
            global_sha256: plan.global.as_ref().map(|(_, sha)| sha.clone()),
        })
        .unwrap_or_default();
        if let Some((bytes, _)) = plan.global.as_ref().filter(|(b, _)| !b.is_empty()) {
            // The state this round trains from, to every participant, before the round start.
            let mut payload = Vec::with_capacity(32 + bytes.len());
            payload.extend_from_slice(&Sha256::digest(bytes.as_slice()));
            payload.extend_from_slice(bytes);
            let frame = Arc::new(
                Header {
                    kind: Kind::GlobalState,
                    session: self.session,
                    round,
                    stage: NO_STAGE,
                    sender: SERVER,
                }
                .encode(&payload),
            );
            for conn_id in &members {
                self.send_to(*conn_id, frame.clone());
            }
        }
        for (i, conn_id) in members.iter().enumerate() {
            let h = Header {
                kind: Kind::RoundStart,
                session: self.session,
                round,
                stage: NO_STAGE,
                sender: i as u32,
            };
            self.send_to(*conn_id, Arc::new(h.encode(&start_payload)));
        }

        let mut run = RoundRun {
            round,
            by_conn: members
                .iter()
                .enumerate()
                .map(|(i, c)| (*c, i as u32))
                .collect(),
            members,
            names,
            guard: ReplayGuard::new(self.session, round),
            rejected: 0,
            dropped: BTreeMap::new(),
            ingest_first: None,
            ingest_last: None,
            ingest_frames: 0,
            ingest_bytes: 0,
            ingest_words: 0,
            streams: HashMap::new(),
            ring_bits: params.ring_bits,
        };
        self.flush(&run, &mut proto);
        let stage_timeout = Duration::from_millis(self.cfg.rounds.stage_timeout_ms);
        let timeout = |stage: Option<Stage>| match (stage, plan.masked_input_timeout) {
            (Some(Stage::MaskedInput), Some(t)) => t,
            _ => stage_timeout,
        };
        let mut stage = proto.stage();
        let mut deadline = tokio::time::Instant::now() + timeout(stage);
        let mut stage_opened = Instant::now();
        let mut next_progress = tokio::time::Instant::now() + PROGRESS_EVERY;
        if let Some(s) = stage {
            info!(round, stage = %s, expected = proto.waiting_for().len(), "stage open");
        }
        let outcome = loop {
            // Events first: the state machine may have closed a stage or ended the round.
            let mut end = None;
            while let Some(ev) = proto.poll_event() {
                match ev {
                    ServerEvent::StageClosed { stage, survivors } => {
                        info!(round, stage = %stage, survivors, "stage closed");
                    }
                    ServerEvent::Finished(agg) => end = Some(Ok(agg)),
                    ServerEvent::Aborted(reason) => end = Some(Err(reason)),
                }
            }
            if let Some(end) = end {
                self.flush(&run, &mut proto);
                break end;
            }
            if proto.stage() != stage {
                stage = proto.stage();
                deadline = tokio::time::Instant::now() + timeout(stage);
                stage_opened = Instant::now();
                if let Some(s) = stage {
                    info!(round, stage = %s, expected = proto.waiting_for().len(), "stage open");
                }
            }
            let Some(open) = stage else {
                // Over without an event should not happen; treat as cancelled.
                break Err(AbortReason::Cancelled {
                    detail: "round ended without an outcome".into(),
                });
            };
            let waiting = proto.waiting_for();
            let all_gone = !waiting.is_empty()
                && waiting
                    .iter()
                    .all(|id| !self.conns.contains_key(&run.members[*id as usize]));
            if all_gone {
                info!(round, stage = %open, missing = waiting.len(), "every missing client disconnected; closing stage");
                self.close_stage(&mut run, &mut proto, open);
                continue;
            }
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some(ev) => self.on_event(ev, Some(&mut run), Some(&mut proto)),
                    None => break Err(AbortReason::Cancelled { detail: "server shutting down".into() }),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    info!(round, stage = %open, missing = proto.waiting_for().len(), "stage deadline");
                    self.close_stage(&mut run, &mut proto, open);
                }
                stop = self.shutdown.wait() => {
                    let detail = format!("server shutting down ({})", stop.signal);
                    warn!(round, stage = %open, "{}: cancelling the round", stop.signal);
                    self.audit(
                        Some(round),
                        "server_shutdown",
                        &format!("{}: round cancelled at stage {open}", stop.signal),
                    );
                    proto.cancel(detail);
                }
                _ = tokio::time::sleep_until(next_progress) => {
                    next_progress += PROGRESS_EVERY;
                    let waiting: Vec<String> = proto
                        .waiting_for()
                        .iter()
                        .filter_map(|id| run.names.get(*id as usize).cloned())
                        .collect();
                    info!(
                        target: "progress::server",
                        "round {round}: stage {open} open for {:.0} s, waiting for {} of {n}: {}",
                        stage_opened.elapsed().as_secs_f64(),
                        waiting.len(),
                        waiting.join(", ")
                    );
                }
            }
            self.flush(&run, &mut proto);
        };

        let wall_ms = started.elapsed().as_millis() as u64;
        let ingest = run.ingest_first.zip(run.ingest_last).map(|(f, l)| {
            let seconds = l.duration_since(f).as_secs_f64();
            IngestStats {
                frames: run.ingest_frames,
                wire_bytes: run.ingest_bytes,
                quantized_bytes: run.ingest_words * u64::from(run.ring_bits / 8),
                seconds,
                bytes_per_sec: run.ingest_bytes as f64 / seconds.max(1e-9),
            }
        });
        let dropped: Vec<(u32, String)> =
            run.dropped.iter().map(|(k, v)| (*k, v.clone())).collect();
        match outcome {
            Ok(mut agg) => {
                if let (Some(p), Some(plan)) = (self.privacy.as_mut(), noise_plan.as_ref()) {
                    // Central mode only: the trusted server adds the noise after unmasking.
                    match p.central_noise(
                        plan,
                        &params,
                        &mut agg.sum,
                        agg.weight_sum,
                        &mut rand::rng(),
                    ) {
                        Ok(Some(mean)) => agg.mean = mean,
                        Ok(None) => {}
                        Err(e) => warn!(round, error = %e, "central noise failed"),
                    }
                    // The epsilon this round actually realised: dropouts mean fewer noise shares.
                    let survivors = agg.survivors.len() as u32;
                    let detail = match p.record_round(plan, survivors) {
                        Ok(r) => serde_json::json!({
                            "mode": p.mode(), "survivors": survivors, "round_epsilon": r.round_epsilon,
                            "cumulative_epsilon": r.cumulative_epsilon, "order": r.order, "delta": r.delta,
                            "over_budget": r.over_budget,
                        })
                        .to_string(),
                        Err(e) => format!("accounting failed: {e}"),
                    };
                    info!(round, %detail, "privacy realised");
                    self.audit(Some(round), "privacy_realised", &detail);
                }
                let mut bytes = Vec::with_capacity(agg.mean.len() * 4);
                for v in &agg.mean {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                match (plan.purpose, self.fed.as_mut()) {
                    (Purpose::Train, Some(fed)) => match fed.finish_train(&agg.mean) {
                        // What clients get and the store keeps: the new global state.
                        Ok(state) => {
                            info!(round, rounds_folded = fed.global.round, dir = %fed.dir().display(), "global adapter written");
                            bytes = state;
                        }
                        Err(e) => {
                            fed.skip_round();
                            let text = format!("the rule refused the revealed sum: {e}");
                            self.store.abort_round(round, &text)?;
                            self.audit(Some(round), "round_aborted", &text);
                            warn!(round, reason = %text, "round aborted");
                            return Ok(self.aborted_summary(
                                round,
                                plan.purpose,
                                run,
                                dropped,
                                &params,
                                text,
                                wall_ms,
                                ingest,
                            ));
                        }
                    },
                    (Purpose::Eval, Some(fed)) => match fed.finish_eval(&agg.mean) {
                        Ok((metric, loss)) => {
                            let folded = fed.global.round;
                            info!(
                                round,
                                metric,
                                loss,
                                rounds_folded = folded,
                                "held-out score of the global adapter (secure sum)"
                            );
                            self.audit(
                                Some(round),
                                "evaluation",
                                &serde_json::json!({"rounds_folded": folded, "metric": metric, "loss": loss, "examples": agg.weight_sum}).to_string(),
                            );
                        }
                        Err(e) => warn!(round, error = %e, "evaluation sum unusable"),
                    },
                    _ => {}
                }
                let hash = blocking(|| {
                    self.store
                        .finish_round(round, &bytes, agg.survivors.len() as u32)
                })?;
                self.audit(
                    Some(round),
                    "round_finished",
                    &format!("survivors={:?} sha256={hash}", agg.survivors),
                );
                info!(round, survivors = agg.survivors.len(), sha256 = %hash, wall_ms, "round finished; sending global state");
                let in_sum: Vec<String> = agg
                    .survivors
                    .iter()
                    .filter_map(|id| run.names.get(*id as usize).cloned())
                    .collect();
                let written = match (plan.purpose, self.fed.as_ref()) {
                    (Purpose::Train, Some(f)) => {
                        format!(
                            "global adapter written to {}",
                            f.dir().join("latest").display()
                        )
                    }
                    (Purpose::Eval, Some(f)) => f
                        .scores
                        .last()
                        .map(|(_, m, l)| format!("held-out metric {m:.4}, loss {l:.4}"))
                        .unwrap_or_default(),
                    _ => format!(
                        "aggregate written to {}",
                        self.store
                            .dir()
                            .join("aggregates")
                            .join(format!("round-{round:06}.bin"))
                            .display()
                    ),
                };
                info!(
                    target: "progress::server",
                    "round {round} ({}) finished in {:.1} s: {} of {n} clients in the sum ({}){}; {written}",
                    plan.purpose.name(),
                    wall_ms as f64 / 1000.0,
                    in_sum.len(),
                    in_sum.join(", "),
                    if dropped.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", dropped: {}",
                            dropped
                                .iter()
                                .map(|(id, stage)| format!(
                                    "{} at {stage}",
                                    run.names.get(*id as usize).cloned().unwrap_or_default()
                                ))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                );
                let mut payload = Vec::with_capacity(32 + bytes.len());
                payload.extend_from_slice(&Sha256::digest(&bytes));
                payload.extend_from_slice(&bytes);
                let ids: Vec<u64> = self.conns.keys().copied().collect();
                for conn_id in ids {
                    let h = Header {
                        kind: Kind::GlobalState,
                        session: self.session,
                        round,
                        stage: NO_STAGE,
                        sender: SERVER,
                    };
                    let mut body = Vec::with_capacity(crate::framing::HEADER_LEN + payload.len());
                    h.encode_into(&mut body);
                    body.extend_from_slice(&payload);
                    self.send_to(conn_id, Arc::new(body));
                }
                Ok(RoundSummary {
                    round,
                    purpose: plan.purpose,
                    status: "finished".into(),
                    participants: run.names,
                    survivors: agg.survivors.clone(),
                    dropped,
                    abort_reason: None,
                    aggregate_sha256: Some(hash),
                    threshold: Some(params.threshold),
                    ring_bits: Some(params.ring_bits),
                    error_bound: Some(agg.error_bound),
                    rejected: run.rejected,
                    wall_ms,
                    ingest,
                })
            }
            Err(reason) => {
                let text = reason.to_string();
                if plan.purpose == Purpose::Train {
                    if let Some(fed) = self.fed.as_mut() {
                        fed.skip_round();
                    }
                }
                self.store.abort_round(round, &text)?;
                self.audit(Some(round), "round_aborted", &text);
                warn!(round, reason = %text, "round aborted");
                Ok(RoundSummary {
                    round,
                    purpose: plan.purpose,
                    status: "aborted".into(),
                    participants: run.names,
                    survivors: Vec::new(),
                    dropped,
                    abort_reason: Some(text),
                    aggregate_sha256: None,
                    threshold: Some(params.threshold),
                    ring_bits: Some(params.ring_bits),
                    error_bound: None,
                    rejected: run.rejected,
                    wall_ms,
                    ingest,
                })
            }
        }
    }

    fn close_stage(&mut self, run: &mut RoundRun, proto: &mut fedlora_secagg::Server, open: Stage) {
        for id in proto.waiting_for() {
            run.dropped
                .entry(id)
                .or_insert_with(|| open.name().to_string());
            if let Err(e) = self.store.record_dropout(run.round, id, open.name()) {
                warn!(error = %e, "store write failed");
            }
            let name = run.names.get(id as usize).cloned().unwrap_or_default();
            info!(round = run.round, client = id, name = %name, stage = %open, "client dropped");
        }
        for id in proto.uploads_in_progress() {
            // Closing the stage takes these back out of the sum (protocol-spec §4.3.2 streaming).
            warn!(
                round = run.round,
                client = id,
                "unfinished upload discarded at the deadline"
            );
            self.audit(
                Some(run.round),
                "upload_discarded",
                &format!("client {id}: masked input unfinished when the stage closed"),
            );
        }
        blocking(|| proto.close_stage());
        self.flush(run, proto);
    }

    #[allow(clippy::too_many_arguments)]
    fn aborted_summary(
        &self,
        round: u64,
        purpose: Purpose,
        run: RoundRun,
        dropped: Vec<(u32, String)>,
        params: &fedlora_secagg::RoundParams,
        text: String,
        wall_ms: u64,
        ingest: Option<IngestStats>,
    ) -> RoundSummary {
        RoundSummary {
            round,
            purpose,
            status: "aborted".into(),
            participants: run.names,
            survivors: Vec::new(),
            dropped,
            abort_reason: Some(text),
            aggregate_sha256: None,
            threshold: Some(params.threshold),
            ring_bits: Some(params.ring_bits),
            error_bound: None,
            rejected: run.rejected,
            wall_ms,
            ingest,
        }
    }

    fn abort_before_start(
        &mut self,
        round: u64,
        purpose: Purpose,
        started: Instant,
        participants: Vec<String>,
        reason: String,
    ) -> Result<RoundSummary, ServerError> {
        self.store.begin_round(round, "{}", &[])?;
        self.store.abort_round(round, &reason)?;
        self.audit(Some(round), "round_aborted", &reason);
        warn!(round, %reason, "round aborted before start");
        if purpose == Purpose::Train {
            if let Some(fed) = self.fed.as_mut() {
                fed.skip_round();
            }
        }
        Ok(RoundSummary {
            round,
            purpose,
            status: "aborted".into(),
            participants,
            survivors: Vec::new(),
            dropped: Vec::new(),
            abort_reason: Some(reason),
            aggregate_sha256: None,
            threshold: None,
            ring_bits: None,
            error_bound: None,
            rejected: 0,
            wall_ms: started.elapsed().as_millis() as u64,
            ingest: None,
        })
    }

    fn send_to(&self, conn_id: u64, body: Outgoing) {
        if let Some(c) = self.conns.get(&conn_id) {
            let _ = c.tx.send(body);
        }
    }

    /// Sends everything the state machine queued.
    fn flush(&self, run: &RoundRun, proto: &mut fedlora_secagg::Server) {
        while let Some((id, msg)) = proto.poll_transmit() {
            let Some(&conn_id) = run.members.get(id as usize) else {
                continue;
            };
            if !self.conns.contains_key(&conn_id) {
                continue;
            }
            let payload = match encode_server(&msg) {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "could not encode a server message");
                    continue;
                }
            };
            let h = Header {
                kind: Kind::Protocol,
                session: self.session,
                round: run.round,
                stage: server_stage_code(&msg),
                sender: SERVER,
            };
            let mut body = Vec::with_capacity(crate::framing::HEADER_LEN + payload.len());
            h.encode_into(&mut body);
            body.extend_from_slice(&payload);
            if matches!(msg, ServerMessage::Abort(_)) {
                debug!(client = id, "sending abort");
            }
            self.send_to(conn_id, Arc::new(body));
        }
    }

    /// After a shutdown request: closes every connection with [`CLOSE_SHUTDOWN`] (clients reconnect
    /// to the next start instead of waiting for their idle timeout) and records why.
    async fn finish_shutdown(&mut self, stop: Stop) {
        // A moment for the abort frames already queued to the connection writers to reach the
        // wire: closing a QUIC connection discards unsent stream data.
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        let reason = format!("server shutting down ({})", stop.signal);
        for c in self.conns.values() {
            c.conn.close(CLOSE_SHUTDOWN.into(), reason.as_bytes());
        }
        self.conns.clear();
        self.audit(
            None,
            "server_stopped",
            &format!("{}: remaining rounds not run", stop.signal),
        );
    }

    /// Tells every client there are no more rounds and waits briefly for them to hang up.
    async fn finish(&mut self) {
        for c in self.conns.values() {
            let h = Header {
                kind: Kind::Done,
                session: self.session,
                round: 0,
                stage: NO_STAGE,
                sender: SERVER,
            };
            let _ = c.tx.send(Arc::new(h.encode(&[])));
        }
        let conns: Vec<quinn::Connection> = self.conns.values().map(|c| c.conn.clone()).collect();
        self.conns.clear();
        // Clients hang up once they have read everything up to the done frame; give the global
        // state downloads a stage deadline to finish before the endpoint closes.
        let _ = tokio::time::timeout(
            Duration::from_millis(self.cfg.rounds.stage_timeout_ms),
            async {
                for c in conns {
                    c.closed().await;
                }
            },
        )
        .await;
        self.audit(None, "server_done", "all rounds run");
    }
}
