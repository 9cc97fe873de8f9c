//! Upload pacing: at most `upload_slots` clients stream their masked vector into the server at
//! once; the others wait with their small flow-control credit spent.
//!
//! Why: one server socket shared by many concurrent QUIC flows costs more CPU per byte than a few
//! (raw quinn on the 2-core loopback, 300 MB in all: 100 connections at once ≈ 650 MB/s, 10 ≈
//! 870 MB/s, 4 ≈ 960 MB/s), and every upload in flight holds its pieces in memory until it is
//! complete. The protocol is not involved: pacing is QUIC flow control. Every connection starts
//! with a small connection-level receive window (`idle`), enough for the other stages' small
//! messages; a reader that meets a masked vector takes a slot, opens that connection's window to
//! `active`, streams the vector in and gives both back. A client without a slot spends its small
//! credit and waits. Measured effect: `benches/service-round/RESULTS.md`.
//!
//! A slot holder that sends nothing for [`SLOT_STALL`] gives its slot up and is read on without
//! one, so a stalled or malicious client delays the others by at most that much; whether it is
//! dropped from the round is still the stage deadline's decision.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A slot holder that sends nothing for this long gives its slot up.
pub const SLOT_STALL: Duration = Duration::from_secs(10);

/// Default number of concurrent uploads (`upload_slots` in the server config), chosen by the
/// measurement in `benches/service-round/RESULTS.md`.
pub const DEFAULT_UPLOAD_SLOTS: u32 = 16;

/// Most slots a config may ask for; more is no pacing at all (use 0).
pub const MAX_UPLOAD_SLOTS: u32 = 4096;

/// Receive windows of a server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Per-stream receive window: the most a connection can be given.
    pub stream: u32,
    /// Connection-level receive window a connection starts with and returns to.
    pub idle: u32,
    /// Connection-level receive window while the connection holds an upload slot.
    pub active: u32,
}

impl Windows {
    /// One window for everything (no pacing).
    pub fn uniform(window: u32) -> Self {
        Self {
            stream: window,
            idle: window,
            active: window,
        }
    }

    /// Windows for `slots` concurrent uploads with `idle` credit for every other client: the
    /// active uploads together fit in half the socket buffer, as the idle credit of all clients
    /// does (`quic::server_window`), so together they cannot overflow the kernel's queue.
    pub fn paced(slots: u32, idle: u32) -> Self {
        let share = crate::quic::SOCKET_BUFFER_BYTES as u64 / 2 / u64::from(slots.max(1));
        let active = share.clamp(u64::from(idle), 16 << 20) as u32;
        Self {
            stream: active,
            idle,
            active,
        }
    }
}

/// Hands out upload slots; one per server, cheap to clone.
#[derive(Debug, Clone)]
pub struct UploadPacer {
    slots: Arc<Semaphore>,
    windows: Windows,
}

impl UploadPacer {
    /// A pacer with `slots` (at least 1) concurrent uploads.
    pub fn new(slots: u32, windows: Windows) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1) as usize)),
            windows,
        }
    }

    /// Waits for a slot, then opens `conn`'s window for the upload; the window closes again when
    /// the slot is dropped.
    pub async fn admit(&self, conn: &quinn::Connection) -> Option<UploadSlot> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        conn.set_receive_window(quinn::VarInt::from_u32(self.windows.active));
        Some(UploadSlot {
            _permit: permit,
            conn: conn.clone(),
            idle: self.windows.idle,
        })
    }
}

/// One admitted upload; dropping it returns the slot and closes the connection's window.
#[derive(Debug)]
pub struct UploadSlot {
    _permit: OwnedSemaphorePermit,
    conn: quinn::Connection,
    idle: u32,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.conn
            .set_receive_window(quinn::VarInt::from_u32(self.idle));
    }
}

/// Runs one read of an upload. While `slot` holds something, the read must make progress within
/// `stall`; if it does not, the slot is dropped (handed to the next client) and the read goes on
/// without it.
pub async fn read_holding<S, T, F>(slot: &mut Option<S>, stall: Duration, read: F) -> T
where
    F: std::future::Future<Output = T>,
{
    tokio::pin!(read);
    if slot.is_some() {
        match tokio::time::timeout(stall, &mut read).await {
            Ok(out) => return out,
            Err(_) => {
                tracing::warn!("upload stalled; its slot goes to the next client");
                *slot = None;
            }
        }
    }
    read.await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_windows_share_the_socket_buffer() {
        let w = Windows::paced(16, 41_943);
        assert_eq!(w.active, 256 << 10);
        assert_eq!(w.stream, w.active);
        assert_eq!(w.idle, 41_943);
        // Never below the idle window, never above 16 MiB.
        assert_eq!(Windows::paced(1000, 64 << 10).active, 64 << 10);
        assert_eq!(Windows::paced(0, 16 << 10).active, 4 << 20);
        assert_eq!(Windows::uniform(7).active, 7);
    }

    #[tokio::test]
    async fn a_stalled_read_gives_its_slot_up_and_still_completes() {
        let slots = Arc::new(Semaphore::new(1));
        let mut slot = Some(slots.clone().acquire_owned().await.expect("permit"));
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move {
                let p = slots.acquire_owned().await.expect("permit");
                drop(p);
                tx.send(7).expect("send");
            })
        };
        // The read only completes once the slot has gone to the waiter.
        let got = read_holding(&mut slot, Duration::from_millis(50), async {
            rx.await.expect("value")
        })
        .await;
        assert_eq!(got, 7);
        assert!(slot.is_none(), "the stalled holder lost its slot");
        waiter.await.expect("join");
    }

    #[tokio::test]
    async fn a_prompt_read_keeps_its_slot() {
        let slots = Arc::new(Semaphore::new(1));
        let mut slot = Some(slots.clone().acquire_owned().await.expect("permit"));
        let got = read_holding(&mut slot, Duration::from_secs(5), async { 3 }).await;
        assert_eq!(got, 3);
        assert!(slot.is_some());
    }
}
