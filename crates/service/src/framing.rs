//! Frames: every message on a fedlora stream is `len: u32 (big-endian) || body`, with `len` checked
//! against a hard maximum before anything is allocated. The body starts with a fixed header that
//! binds the payload to (session, round, stage, sender); [`ReplayGuard`] rejects anything replayed,
//! out of order, from another round or session, or claiming another sender.

use std::collections::HashSet;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frame format version carried in every header.
pub const VERSION: u8 = 1;
/// Header size in bytes: version, kind, session (16), round (8), stage, sender (4).
pub const HEADER_LEN: usize = 1 + 1 + 16 + 8 + 1 + 4;
/// Default hard maximum body size: 64 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 64 << 20;

/// Errors reading or decoding frames. None of them panics on peer input.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended in the middle of a frame.
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The declared length exceeds the hard maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversized {
        /// Declared length.
        len: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The body is shorter than the header.
    #[error("frame of {0} bytes is shorter than the header")]
    Truncated(usize),
    /// Unknown frame version.
    #[error("unsupported frame version {0}")]
    Version(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Client → server, first frame: identity public key and signature over the TLS exporter.
    Hello = 1,
    /// Server → client: identity accepted; payload is the session id.
    Welcome = 2,
    /// Server → client: refused (UTF-8 reason); the connection closes.
    Refused = 3,
    /// Server → client: a round starts; `sender` field of the header is the recipient's client id
    /// and the payload lists the round's peers and their identity keys.
    RoundStart = 4,
    /// A SecAgg+ protocol message (fedlora-wire encoding) in either direction.
    Protocol = 5,
    /// Server → client: the new global state (aggregate) after a finished round.
    GlobalState = 6,
    /// Server → client: no more rounds.
    Done = 7,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Hello => "hello",
            Kind::Welcome => "welcome",
            Kind::Refused => "refused",
            Kind::RoundStart => "round-start",
            Kind::Protocol => "protocol",
            Kind::GlobalState => "global-state",
            Kind::Done => "done",
        })
    }
}

impl TryFrom<u8> for Kind {
    type Error = FrameError;
    fn try_from(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Refused,
            4 => Kind::RoundStart,
            5 => Kind::Protocol,
            6 => Kind::GlobalState,
            7 => Kind::Done,
            other => return Err(FrameError::Kind(other)),
        })
    }
}

/// The binding every frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub kind: Kind,
    /// The server's session id (fixed per server deployment, from the store).
    pub session: [u8; 16],
    /// The round number.
    pub round: u64,
    /// The protocol stage the message belongs to.
    pub stage: u8,
    /// The sender's client id for this round (`SERVER` for the server).
    pub sender: u32,
}

/// Sender id used by the server.
pub const SERVER: u32 = u32::MAX;

impl Header {
    /// Writes the header followed by `payload` into a fresh body.
    pub fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        self.encode_into(&mut out);
        out.extend_from_slice(payload);
        out
    }

    /// Appends the header bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.session);
        out.extend_from_slice(&self.round.to_be_bytes());
        out.push(self.stage);
        out.extend_from_slice(&self.sender.to_be_bytes());
    }

    /// Splits a body into its header and payload.
    pub fn decode(body: &[u8]) -> Result<(Header, &[u8]), FrameError> {
        if body.len() < HEADER_LEN {
            return Err(FrameError::Truncated(body.len()));
        }
        let (h, payload) = body.split_at(HEADER_LEN);
        if h[0] != VERSION {
            return Err(FrameError::Version(h[0]));
        }
        let kind = Kind::try_from(h[1])?;
        let mut session = [0u8; 16];
        session.copy_from_slice(&h[2..18]);
        let mut round = [0u8; 8];
        round.copy_from_slice(&h[18..26]);
        let stage = h[26];
        let mut sender = [0u8; 4];
        sender.copy_from_slice(&h[27..31]);
        Ok((
            Header {
                kind,
                session,
                round: u64::from_be_bytes(round),
                stage,
                sender: u32::from_be_bytes(sender),
            },
            payload,
        ))
    }
}

/// Writes one frame: the length prefix, then the body.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(body.len()).map_err(|_| FrameError::Oversized {
        len: u32::MAX,
        max: u32::MAX,
    })?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(body).await?;
    Ok(())
}

/// Writes one frame from a header and a payload without concatenating them first (a masked vector
/// goes from its encoding buffer straight to the stream).
pub async fn write_frame_parts<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &Header,
    payload: &[u8],
) -> Result<(), FrameError> {
    let head = frame_head(header, payload.len())?;
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    Ok(())
}

/// The bytes that go before a payload of `payload_len` bytes: the length prefix and the header.
pub fn frame_head(header: &Header, payload_len: usize) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(HEADER_LEN + payload_len).map_err(|_| FrameError::Oversized {
        len: u32::MAX,
        max: u32::MAX,
    })?;
    let mut head = Vec::with_capacity(4 + HEADER_LEN);
    head.extend_from_slice(&len.to_be_bytes());
    header.encode_into(&mut head);
    Ok(head)
}

/// Reads one frame body of at most `max` bytes. `Ok(None)` on a clean end of stream between frames.
/// The length is checked before any allocation, and the body is read straight into one buffer of
/// exactly that size.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<Option<Vec<u8>>, FrameError> {
    let Some((len, _)) = read_frame_len(r, max).await? else {
        return Ok(None);
    };
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Reads one frame's length prefix and checks it against `max` before anything is allocated;
/// also returns when it arrived. `Ok(None)` on a clean end of stream between frames. The caller
/// reads the body (the server streams a masked vector in pieces, see `server::read_frame_or_stream`).
pub async fn read_frame_len<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<Option<(u32, std::time::Instant)>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    let first = std::time::Instant::now();
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    Ok(Some((len, first)))
}

/// Why the server rejected an otherwise well-formed frame. The round goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The frame names another session.
    #[error("wrong session")]
    WrongSession,
    /// The frame names another round.
    #[error("round {got} while round {expected} is running")]
    WrongRound {
        /// Round in the frame.
        got: u64,
        /// Current round.
        expected: u64,
    },
    /// The frame belongs to another stage (late, early or out of order).
    #[error("stage {got} while stage {expected} is open")]
    WrongStage {
        /// Stage in the frame.
        got: u8,
        /// Current stage.
        expected: u8,
    },
    /// The claimed sender is not the id assigned to this connection.
    #[error("sender {claimed} forged on the connection of client {actual}")]
    ForgedSender {
        /// Claimed sender.
        claimed: u32,
        /// The connection's client id.
        actual: u32,
    },
    /// This (round, stage, sender) was already accepted.
    #[error("replay of round {round} stage {stage} from client {sender}")]
    Replay {
        /// Round.
        round: u64,
        /// Stage.
        stage: u8,
        /// Sender.
        sender: u32,
    },
    /// A frame kind a client may not send here.
    #[error("unexpected frame kind {0:?}")]
    UnexpectedKind(Kind),
}

/// Server-side check of each client protocol frame: binding to the current (session, round,
/// stage), to the connection's authenticated client id, and at most one message per stage.
#[derive(Debug)]
pub struct ReplayGuard {
    session: [u8; 16],
    round: u64,
    seen: HashSet<(u8, u32)>,
}

impl ReplayGuard {
    /// A guard for one round.
    pub fn new(session: [u8; 16], round: u64) -> Self {
        Self {
            session,
            round,
            seen: HashSet::new(),
        }
    }

    /// Checks the frame's binding; [`ReplayGuard::accept`] records it once the protocol took it.
    pub fn check(
        &self,
        h: &Header,
        connection_client: u32,
        open_stage: u8,
    ) -> Result<(), Rejection> {
        if h.kind != Kind::Protocol {
            return Err(Rejection::UnexpectedKind(h.kind));
        }
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            &h.session[..],
            &self.session[..],
        )) {
            return Err(Rejection::WrongSession);
        }
        if h.round != self.round {
            return Err(Rejection::WrongRound {
                got: h.round,
                expected: self.round,
            });
        }
        if h.sender != connection_client {
            return Err(Rejection::ForgedSender {
                claimed: h.sender,
                actual: connection_client,
            });
        }
        if self.seen.contains(&(h.stage, h.sender)) {
            return Err(Rejection::Replay {
                round: h.round,
                stage: h.stage,
                sender: h.sender,
            });
        }
        if h.stage != open_stage {
            return Err(Rejection::WrongStage {
                got: h.stage,
                expected: open_stage,
            });
        }
        Ok(())
    }

    /// Records an accepted frame: any later frame for the same (stage, sender) is a replay.
    pub fn accept(&mut self, h: &Header) {
        self.seen.insert((h.stage, h.sender));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(stage: u8, sender: u32) -> Header {
        Header {
            kind: Kind::Protocol,
            session: [9; 16],
            round: 3,
            stage,
            sender,
        }
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            kind: Kind::GlobalState,
            session: [1; 16],
            round: u64::MAX - 1,
            stage: 4,
            sender: 77,
        };
        let body = h.encode(b"payload");
        let (back, payload) = Header::decode(&body).expect("decode");
        assert_eq!(back, h);
        assert_eq!(payload, b"payload");
        let mut framed = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        rt.block_on(write_frame_parts(&mut framed, &h, b"payload"))
            .expect("parts");
        assert_eq!(&framed[4..], &body[..]);
        assert_eq!(
            u32::from_be_bytes([framed[0], framed[1], framed[2], framed[3]]) as usize,
            body.len()
        );
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert!(matches!(
            Header::decode(&[1, 2, 3]),
            Err(FrameError::Truncated(3))
        ));
        let mut body = hdr(0, 0).encode(b"");
        body[0] = 9;
        assert!(matches!(Header::decode(&body), Err(FrameError::Version(9))));
        body[0] = VERSION;
        body[1] = 200;
        assert!(matches!(Header::decode(&body), Err(FrameError::Kind(200))));
    }

    #[test]
    fn every_byte_string_decodes_or_errors() {
        // Exhaustive over short prefixes + random longer bodies: never a panic.
        for len in 0..HEADER_LEN + 2 {
            for fill in [0u8, 1, 6, 0xff] {
                let _ = Header::decode(&vec![fill; len]);
            }
        }
        for _ in 0..1000 {
            let len = rand::random::<u8>() as usize;
            let body: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            let _ = Header::decode(&body);
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_eof() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").await.expect("write");
        write_frame(&mut buf, b"").await.expect("write");
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r, 16).await.expect("read").as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(
            read_frame(&mut r, 16).await.expect("read").as_deref(),
            Some(&b""[..])
        );
        assert!(read_frame(&mut r, 16).await.expect("eof").is_none());
    }

    #[tokio::test]
    async fn oversized_is_refused_before_allocating() {
        let bytes = u32::MAX.to_be_bytes();
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame(&mut r, DEFAULT_MAX_FRAME).await,
            Err(FrameError::Oversized {
                len: u32::MAX,
                max: DEFAULT_MAX_FRAME
            })
        ));
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello world").await.expect("write");
        for cut in [2, 4, 8] {
            let mut r = &buf[..cut];
            assert!(
                matches!(read_frame(&mut r, 64).await, Err(FrameError::Io(_))),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn replay_guard() {
        let mut g = ReplayGuard::new([9; 16], 3);
        assert_eq!(g.check(&hdr(1, 5), 5, 1), Ok(()));
        g.accept(&hdr(1, 5));
        assert_eq!(
            g.check(&hdr(1, 5), 5, 1),
            Err(Rejection::Replay {
                round: 3,
                stage: 1,
                sender: 5
            })
        );
        assert_eq!(
            g.check(&hdr(1, 5), 5, 2),
            Err(Rejection::Replay {
                round: 3,
                stage: 1,
                sender: 5
            })
        );
        assert_eq!(
            g.check(&hdr(3, 5), 5, 2),
            Err(Rejection::WrongStage {
                got: 3,
                expected: 2
            })
        );
        assert_eq!(
            g.check(&hdr(2, 6), 5, 2),
            Err(Rejection::ForgedSender {
                claimed: 6,
                actual: 5
            })
        );
        let mut other_round = hdr(2, 5);
        other_round.round = 2;
        assert_eq!(
            g.check(&other_round, 5, 2),
            Err(Rejection::WrongRound {
                got: 2,
                expected: 3
            })
        );
        let mut other_session = hdr(2, 5);
        other_session.session = [8; 16];
        assert_eq!(g.check(&other_session, 5, 2), Err(Rejection::WrongSession));
        let mut hello = hdr(2, 5);
        hello.kind = Kind::Hello;
        assert_eq!(Kind::try_from(Kind::Done as u8).expect("kind"), Kind::Done);
        assert_eq!(
            g.check(&hello, 5, 2),
            Err(Rejection::UnexpectedKind(Kind::Hello))
        );
        assert_eq!(g.check(&hdr(2, 5), 5, 2), Ok(()));
    }
}
