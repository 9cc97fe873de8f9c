//! Raw quinn loopback throughput: one connection, one unidirectional stream, `bytes` pushed
//! through with the same TLS and transport settings as the service. The benchmark's baseline for
//! server ingest throughput.

use std::time::Instant;

use crate::pacing::Windows;
use crate::quic::{client_endpoint, connect, server_endpoint, QuicError};
use crate::tls::{ServerCert, ServerTrust};

/// One measurement.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RawThroughput {
    /// Bytes sent.
    pub bytes: u64,
    /// Seconds from the first byte written to the last byte read.
    pub seconds: f64,
    /// Bytes per second.
    pub bytes_per_sec: f64,
}

/// Errors measuring.
#[derive(Debug, thiserror::Error)]
pub enum ThroughputError {
    /// Endpoint setup or connection failed.
    #[error(transparent)]
    Quic(#[from] QuicError),
    /// Certificate generation failed.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Stream i/o failed.
    #[error("stream: {0}")]
    Io(String),
    /// The receiver got a different byte count.
    #[error("received {got} bytes, sent {sent}")]
    Short {
        /// Received.
        got: u64,
        /// Sent.
        sent: u64,
    },
}

/// What the sender of a raw measurement sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// One 64 KiB buffer written again and again: always in cache, so the sender costs least
    /// (quinn's best case on one machine).
    RepeatedChunk,
    /// `bytes` distinct bytes from memory, handed to quinn as one buffer without a copy, as the
    /// service's clients send their masked vectors (`ClientSession::send_owned`).
    Distinct,
}

/// Measures raw quinn loopback throughput for `bytes` bytes on 127.0.0.1 (one stream of
/// [`Source::RepeatedChunk`]).
pub async fn raw_quinn_loopback(bytes: u64) -> Result<RawThroughput, ThroughputError> {
    raw_quinn_loopback_from(bytes, Source::RepeatedChunk).await
}

/// [`raw_quinn_loopback`] with the sender's data as `source` says.
pub async fn raw_quinn_loopback_from(
    bytes: u64,
    source: Source,
) -> Result<RawThroughput, ThroughputError> {
    let cert = ServerCert::generate(&["localhost".into()])?;
    let server = server_endpoint(
        ([127, 0, 0, 1], 0).into(),
        &cert,
        Windows::uniform(crate::quic::server_window(1)),
    )?;
    let addr = server
        .local_addr()
        .map_err(|e| ThroughputError::Io(e.to_string()))?;
    let receiver = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .ok_or_else(|| ThroughputError::Io("no connection".into()))?;
        let conn = conn.await.map_err(QuicError::from)?;
        let mut recv = conn.accept_uni().await.map_err(QuicError::from)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match recv.read(&mut buf).await {
                Ok(None) => break,
                Ok(Some(n)) => got += n as u64,
                Err(e) => return Err(ThroughputError::Io(e.to_string())),
            }
        }
        let end = Instant::now();
        conn.close(0u32.into(), b"done");
        Ok::<_, ThroughputError>((got, end))
    });
    let client = client_endpoint(addr, &ServerTrust::Pin(cert.fingerprint()))?;
    let conn = connect(&client, addr, "localhost").await?;
    let mut send = conn.open_uni().await.map_err(QuicError::from)?;
    let distinct = match source {
        Source::Distinct => Some(distinct_bytes(bytes)),
        Source::RepeatedChunk => None,
    };
    let chunk = vec![0x5au8; 1 << 16];
    let start = Instant::now();
    if let Some(data) = distinct {
        send.write_chunk(bytes::Bytes::from(data))
            .await
            .map_err(|e| ThroughputError::Io(e.to_string()))?;
    } else {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            send.write_all(&chunk[..n])
                .await
                .map_err(|e| ThroughputError::Io(e.to_string()))?;
            left -= n as u64;
        }
    }
    send.finish()
        .map_err(|e| ThroughputError::Io(e.to_string()))?;
    let (got, end) = receiver
        .await
        .map_err(|e| ThroughputError::Io(e.to_string()))??;
    if got != bytes {
        return Err(ThroughputError::Short { got, sent: bytes });
    }
    let seconds = end.duration_since(start).as_secs_f64();
    conn.close(0u32.into(), b"done");
    // Bounded: if the server's close was never sent, waiting for idle would take the idle timeout.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), client.wait_idle()).await;
    Ok(RawThroughput {
        bytes,
        seconds,
        bytes_per_sec: bytes as f64 / seconds.max(1e-9),
    })
}

/// `len` bytes that differ (a xorshift stream), filled before the clock starts.
fn distinct_bytes(len: u64) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (len - out.len() as u64).min(8) as usize;
        out.extend_from_slice(&state.to_le_bytes()[..take]);
    }
    out
}

/// Raw quinn loopback throughput with `conns` client endpoints sending `bytes_each` bytes each,
/// concurrently, to one server endpoint (same TLS and transport settings as the service, receive
/// window shared as for `conns` clients, server on its own runtime thread like the benchmark's).
/// Measured from the first byte received to the last.
pub async fn raw_quinn_loopback_many(
    conns: u32,
    bytes_each: u64,
) -> Result<RawThroughput, ThroughputError> {
    let cert = ServerCert::generate(&["localhost".into()])?;
    let window = Windows::uniform(crate::quic::server_window(conns));
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let server = std::thread::spawn(move || -> Result<(u64, f64), ThroughputError> {
        let rt = crate::runtime_named("raw-quinn-server")
            .map_err(|e| ThroughputError::Io(e.to_string()))?;
        rt.block_on(async move {
            let server = server_endpoint(([127, 0, 0, 1], 0).into(), &cert, window)?;
            let addr = server
                .local_addr()
                .map_err(|e| ThroughputError::Io(e.to_string()))?;
            let _ = addr_tx.send((addr, cert.fingerprint()));
            let mut tasks = Vec::new();
            for _ in 0..conns {
                let inc = server
                    .accept()
                    .await
                    .ok_or_else(|| ThroughputError::Io("no connection".into()))?;
                tasks.push(tokio::spawn(async move {
                    let conn = inc.await.map_err(QuicError::from)?;
                    let mut recv = conn.accept_uni().await.map_err(QuicError::from)?;
                    let mut buf = vec![0u8; 1 << 20];
                    let mut got = 0u64;
                    let mut first = None;
                    while let Some(n) = recv
                        .read(&mut buf)
                        .await
                        .map_err(|e| ThroughputError::Io(e.to_string()))?
                    {
                        first.get_or_insert_with(Instant::now);
                        got += n as u64;
                    }
                    let end = Instant::now();
                    conn.close(0u32.into(), b"done");
                    Ok::<_, ThroughputError>((got, first.unwrap_or(end), end))
                }));
            }
            let (mut total, mut start, mut end) = (0u64, None::<Instant>, None::<Instant>);
            for t in tasks {
                let (got, f, e) = t.await.map_err(|e| ThroughputError::Io(e.to_string()))??;
                total += got;
                start = Some(start.map_or(f, |s| s.min(f)));
                end = Some(end.map_or(e, |x| x.max(e)));
            }
            let secs = match (start, end) {
                (Some(s), Some(e)) => e.duration_since(s).as_secs_f64(),
                _ => 0.0,
            };
            Ok((total, secs))
        })
    });
    let (addr, fp) = addr_rx
        .await
        .map_err(|_| ThroughputError::Io("server did not start".into()))?;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(conns as usize));
    let mut senders = Vec::new();
    for _ in 0..conns {
        let barrier = barrier.clone();
        senders.push(tokio::spawn(async move {
            let ep = client_endpoint(addr, &ServerTrust::Pin(fp))?;
            let conn = connect(&ep, addr, "localhost").await?;
            let mut send = conn.open_uni().await.map_err(QuicError::from)?;
            let payload = vec![0x5au8; bytes_each as usize];
            barrier.wait().await;
            send.write_all(&payload)
                .await
                .map_err(|e| ThroughputError::Io(e.to_string()))?;
            send.finish()
                .map_err(|e| ThroughputError::Io(e.to_string()))?;
            // Resolves once the peer has read the stream to its end (or stopped it).
            let _ = send.stopped().await;
            conn.close(0u32.into(), b"done");
            Ok::<_, ThroughputError>(())
        }));
    }
    for s in senders {
        s.await.map_err(|e| ThroughputError::Io(e.to_string()))??;
    }
    let (got, seconds) = tokio::task::spawn_blocking(move || server.join())
        .await
        .map_err(|e| ThroughputError::Io(e.to_string()))?
        .map_err(|_| ThroughputError::Io("server thread panicked".into()))??;
    let sent = bytes_each * u64::from(conns);
    if got != sent {
        return Err(ThroughputError::Short { got, sent });
    }
    Ok(RawThroughput {
        bytes: got,
        seconds,
        bytes_per_sec: got as f64 / seconds.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn measures_many_connections() {
        let r = raw_quinn_loopback_many(4, 256 << 10)
            .await
            .expect("measure");
        assert_eq!(r.bytes, 4 * (256 << 10));
        assert!(r.bytes_per_sec > 0.0);
    }

    #[tokio::test]
    async fn measures_a_small_transfer() {
        let r = raw_quinn_loopback(4 << 20).await.expect("measure");
        assert_eq!(r.bytes, 4 << 20);
        assert!(r.seconds > 0.0 && r.bytes_per_sec > 0.0);
    }
}
