//! Graceful shutdown. The first SIGINT or SIGTERM asks the server to stop: it cancels the round
//! under way (every participant gets the protocol's typed `Cancelled` abort), records it in the
//! store and the audit log, closes each connection with [`crate::session::CLOSE_SHUTDOWN`] so that
//! clients reconnect to its successor instead of waiting for their idle timeout, and returns its
//! report. A second signal ends the process at once. The exit status is the shell's `128 + signal`
//! (130 for SIGINT, 143 for SIGTERM).

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

/// Why the process is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stop {
    /// `SIGINT` or `SIGTERM`.
    pub signal: &'static str,
    /// The exit status that reports it: 128 + the signal's number.
    pub exit_code: u8,
}

impl Stop {
    /// SIGINT (Ctrl-C).
    pub const INTERRUPT: Stop = Stop {
        signal: "SIGINT",
        exit_code: 130,
    };
    /// SIGTERM (systemd stop, `docker stop`, Kubernetes pod termination).
    pub const TERMINATE: Stop = Stop {
        signal: "SIGTERM",
        exit_code: 143,
    };
}

/// A shutdown request that the server polls and awaits; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Option<Stop>>,
    // Keeps the channel open for `never()`, so waiting on it pends forever.
    _keep: Option<Arc<watch::Sender<Option<Stop>>>>,
}

/// The side that fires a [`Shutdown`].
#[derive(Debug)]
pub struct Trigger(watch::Sender<Option<Stop>>);

impl Trigger {
    /// Requests the shutdown (later requests keep the first reason).
    pub fn fire(&self, stop: Stop) {
        self.0.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(stop);
                true
            } else {
                false
            }
        });
    }
}

/// A connected trigger and shutdown.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(None);
    (Trigger(tx), Shutdown { rx, _keep: None })
}

impl Shutdown {
    /// A shutdown that never comes (library callers, tests, benchmarks).
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(None);
        Shutdown {
            rx,
            _keep: Some(Arc::new(tx)),
        }
    }

    /// The request, if one was made.
    pub fn requested(&self) -> Option<Stop> {
        *self.rx.borrow()
    }

    /// Waits for the request.
    pub async fn wait(&self) -> Stop {
        let mut rx = self.rx.clone();
        loop {
            if let Some(stop) = *rx.borrow_and_update() {
                return stop;
            }
            if rx.changed().await.is_err() {
                // The trigger is gone without firing: no shutdown will come.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Listens for SIGINT and SIGTERM on the current tokio runtime. The first one fires the returned
/// shutdown (after calling `on_first`, e.g. to print what happens next); a second one exits the
/// process at once with `128 + signal`.
pub fn on_signals(on_first: impl Fn(Stop) + Send + 'static) -> std::io::Result<Shutdown> {
    let (trigger, shutdown) = channel();
    let mut signals = Signals::new()?;
    tokio::spawn(async move {
        let first = signals.next().await;
        on_first(first);
        trigger.fire(first);
        let second = signals.next().await;
        eprintln!("{}: second signal, exiting at once", second.signal);
        std::process::exit(i32::from(second.exit_code));
    });
    Ok(shutdown)
}

#[cfg(unix)]
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> Stop {
        tokio::select! {
            _ = self.int.recv() => Stop::INTERRUPT,
            _ = self.term.recv() => Stop::TERMINATE,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn next(&mut self) -> Stop {
        let _ = tokio::signal::ctrl_c().await;
        Stop::INTERRUPT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_request_wins_and_never_pends() {
        let (trigger, shutdown) = channel();
        assert_eq!(shutdown.requested(), None);
        trigger.fire(Stop::TERMINATE);
        trigger.fire(Stop::INTERRUPT);
        assert_eq!(shutdown.wait().await, Stop::TERMINATE);
        assert_eq!(shutdown.clone().requested(), Some(Stop::TERMINATE));
        let never = Shutdown::never();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), never.wait()).await;
        assert!(waited.is_err());
    }
}
