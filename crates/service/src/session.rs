//! One client's connection to the server: QUIC connect with the configured trust, one
//! bidirectional stream, the identity hello bound to the TLS session, then frames both ways.
//! Used by the client driver, and by tests that need to misbehave at the frame level.

use std::net::SocketAddr;
use std::time::Duration;

use fedlora_secagg::wire::{ServerMessage, Stage};
use serde::{Deserialize, Serialize};

use crate::framing::{
    frame_head, read_frame, write_frame_parts, FrameError, Header, Kind, HEADER_LEN, SERVER,
};
use crate::identity::{IdentityKey, HELLO_CONTEXT};
use crate::quic::{client_endpoint_seen, connect, QuicError};
use crate::tls::{Presented, ServerTrust};

/// TLS exporter label for the hello signature (RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-fedlora-hello-v1";
/// Largest frame accepted before the peer is authenticated.
pub const MAX_HELLO_FRAME: u32 = 1024;
/// Stage byte of frames that belong to no stage (abort, control).
pub const NO_STAGE: u8 = 0xff;
/// QUIC application close code: normal end.
pub const CLOSE_OK: u32 = 0;
/// QUIC application close code: refused (unknown identity, bad hello).
pub const CLOSE_REFUSED: u32 = 1;
/// QUIC application close code: protocol violation (oversized or undecodable frame).
pub const CLOSE_VIOLATION: u32 = 2;
/// QUIC application close code: the server is shutting down (SIGINT/SIGTERM); the round under way
/// was cancelled. Clients reconnect (`reconnect_attempts`) to the server's next start.
pub const CLOSE_SHUTDOWN: u32 = 3;

/// Errors on a client session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// QUIC setup or connection failed (includes a server certificate that does not match).
    #[error(transparent)]
    Quic(#[from] QuicError),
    /// Connecting took longer than the deadline.
    #[error("timed out connecting to {0}")]
    ConnectTimeout(SocketAddr),
    /// Opening the stream failed.
    #[error("stream: {0}")]
    Stream(String),
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The server refused this client.
    #[error("refused by server: {0}")]
    Refused(String),
    /// The server broke the protocol (unexpected or malformed frame).
    #[error("server protocol violation: {0}")]
    Violation(String),
    /// The connection ended.
    #[error("connection closed by server")]
    Closed,
    /// The server presented a certificate other than the pinned one.
    #[error("the server at {server} presented a certificate with fingerprint {presented}, but trust.server_fingerprint pins {expected}: if the server's certificate was replaced, pin the new fingerprint (the server prints it at start-up and writes it to data_dir/server.fingerprint); otherwise this is not your server")]
    FingerprintMismatch {
        /// Address connected to.
        server: SocketAddr,
        /// The pinned fingerprint (hex).
        expected: String,
        /// The presented certificate's fingerprint (hex).
        presented: String,
    },
}

impl SessionError {
    /// Whether the connection was lost or could not be made (timed out, reset, closed by the
    /// server, stream ended), as opposed to being refused or breaking the protocol: the failures
    /// after which a client may try again (`reconnect_attempts`).
    pub fn is_connection_loss(&self) -> bool {
        use quinn::ConnectionError as C;
        match self {
            Self::ConnectTimeout(_) | Self::Closed | Self::Stream(_) => true,
            Self::Frame(FrameError::Io(_)) => true,
            Self::Quic(QuicError::Connection(e)) => matches!(
                e,
                C::TimedOut | C::Reset | C::ConnectionClosed(_) | C::ApplicationClosed(_)
            ),
            _ => false,
        }
    }
}

/// The TLS exporter value both ends derive for this connection.
pub fn exporter(conn: &quinn::Connection) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| "the TLS session exports no keying material".to_string())?;
    Ok(out)
}

/// The stage byte for a protocol stage (its index in protocol order).
pub fn stage_code(stage: Stage) -> u8 {
    Stage::ALL
        .iter()
        .position(|s| *s == stage)
        .map(|p| p as u8)
        .unwrap_or(NO_STAGE)
}

/// The stage byte of a server message: the stage it opens.
pub fn server_stage_code(msg: &ServerMessage) -> u8 {
    match msg {
        ServerMessage::Setup(_) => stage_code(Stage::AdvertiseKeys),
        ServerMessage::Abort(_) => NO_STAGE,
        other => other.stage().map(stage_code).unwrap_or(NO_STAGE),
    }
}

/// Payload of a [`Kind::RoundStart`] frame: the round's roster (client id → identity key hex).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoundStart {
    /// Every invited client's id and Ed25519 identity key (hex), sorted by id.
    pub peers: Vec<(u32, String)>,
    /// What the round is for (federated fine-tuning: training or evaluation).
    #[serde(default)]
    pub purpose: crate::federated::Purpose,
    /// Federated rounds: SHA-256 (hex) of the global state the round trains from or scores; the
    /// client refuses a round whose state it was not sent.
    #[serde(default)]
    pub global_sha256: Option<String>,
}

/// An authenticated client connection.
#[derive(Debug)]
pub struct ClientSession {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The server's session id from the welcome.
    pub session: [u8; 16],
    max_frame: u32,
    endpoint: quinn::Endpoint,
}

impl ClientSession {
    /// Connects, checks the server certificate, and authenticates with `identity`.
    pub async fn connect(
        server: SocketAddr,
        server_name: &str,
        trust: &ServerTrust,
        identity: &IdentityKey,
        max_frame: u32,
        timeout: Duration,
    ) -> Result<Self, SessionError> {
        let seen = Presented::default();
        let endpoint = client_endpoint_seen(server, trust, &seen)?;
        let conn = tokio::time::timeout(timeout, connect(&endpoint, server, server_name))
            .await
            .map_err(|_| SessionError::ConnectTimeout(server))?
            .map_err(|e| match (trust, seen.get()) {
                (ServerTrust::Pin(pin), Some(presented)) if presented != *pin => {
                    SessionError::FingerprintMismatch {
                        server,
                        expected: hex::encode(pin),
                        presented: hex::encode(presented),
                    }
                }
                _ => SessionError::from(e),
            })?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| SessionError::Stream(e.to_string()))?;
        let ekm = exporter(&conn).map_err(SessionError::Stream)?;
        let sig = identity.sign(HELLO_CONTEXT, &ekm);
        let mut payload = Vec::with_capacity(96);
        payload.extend_from_slice(&identity.public().to_bytes());
        payload.extend_from_slice(&sig);
        let hello = Header {
            kind: Kind::Hello,
            session: [0; 16],
            round: 0,
            stage: NO_STAGE,
            sender: 0,
        };
        write_frame_parts(&mut send, &hello, &payload).await?;
        let body = tokio::time::timeout(timeout, read_frame(&mut recv, MAX_HELLO_FRAME))
            .await
            .map_err(|_| SessionError::ConnectTimeout(server))?;
        let body = match body {
            Ok(Some(b)) => b,
            Ok(None) => return Err(SessionError::Closed),
            Err(e) => {
                if let Some(reason) = conn.close_reason() {
                    return Err(SessionError::Refused(reason.to_string()));
                }
                return Err(e.into());
            }
        };
        let (h, payload) = Header::decode(&body)?;
        match h.kind {
            Kind::Welcome if payload.len() == 16 && h.sender == SERVER => {
                let mut session = [0u8; 16];
                session.copy_from_slice(payload);
                Ok(Self {
                    conn,
                    send,
                    recv,
                    session,
                    max_frame,
                    endpoint,
                })
            }
            Kind::Refused => Err(SessionError::Refused(
                String::from_utf8_lossy(payload).into_owned(),
            )),
            other => Err(SessionError::Violation(format!(
                "expected a welcome frame, got a {other} frame"
            ))),
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, header: &Header, payload: &[u8]) -> Result<(), SessionError> {
        Ok(write_frame_parts(&mut self.send, header, payload).await?)
    }

    /// [`Self::send`] for a payload the caller gives up: quinn takes the buffer as it is instead of
    /// copying it into its send buffer (a masked vector is megabytes that would be read cold from
    /// memory; measured as the largest single cost on the client side of an upload).
    pub async fn send_owned(
        &mut self,
        header: &Header,
        payload: Vec<u8>,
    ) -> Result<(), SessionError> {
        let head = frame_head(header, payload.len())?;
        let mut chunks = [bytes::Bytes::from(head), bytes::Bytes::from(payload)];
        self.send
            .write_all_chunks(&mut chunks)
            .await
            .map_err(|e| SessionError::Frame(FrameError::Io(e.into())))
    }

    /// Writes raw bytes on the stream (tests that forge framing).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|e| SessionError::Stream(e.to_string()))
    }

    /// Receives one frame: its header and its whole body (payload at `HEADER_LEN..`).
    /// `Ok(None)` when the server closed the stream cleanly.
    pub async fn recv(&mut self) -> Result<Option<(Header, Vec<u8>)>, SessionError> {
        let Some(body) = read_frame(&mut self.recv, self.max_frame).await? else {
            return Ok(None);
        };
        let (h, _) = Header::decode(&body)?;
        Ok(Some((h, body)))
    }

    /// A header from this client for `round`/`stage`.
    pub fn header(&self, kind: Kind, round: u64, stage: u8, sender: u32) -> Header {
        Header {
            kind,
            session: self.session,
            round,
            stage,
            sender,
        }
    }

    /// Closes the connection gracefully and waits (briefly) for the close to be sent.
    pub async fn close(self) {
        let Self {
            conn,
            mut send,
            endpoint,
            ..
        } = self;
        let _ = send.finish();
        conn.close(CLOSE_OK.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}

/// Byte offset of the payload in a frame body.
pub const PAYLOAD_OFFSET: usize = HEADER_LEN;
