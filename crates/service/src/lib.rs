//! fedlora's networked service: a SecAgg+ server and its clients over QUIC.
//!
//! The protocol itself lives in `fedlora-secagg` (sans-IO state machines); this crate is the thin
//! driver around it: QUIC transport with TLS 1.3 and certificate pinning ([`tls`], [`quic`]),
//! length-prefixed frames bound to (session, round, stage, sender) with replay rejection
//! ([`framing`]), Ed25519 identities and enrollment ([`identity`]), TOML configuration
//! ([`config`]), the SQLite store and audit log ([`store`]), and the clock ([`clock`]).
//! See `protocol-spec/08-transport.md`.

pub mod addr;
pub mod auth;
pub mod client;
pub mod clock;
pub mod config;
pub mod contribution;
pub mod demo;
pub mod federated;
pub mod federated_client;
pub mod framing;
pub mod identity;
pub mod logging;
pub mod pacing;
pub mod paths;
pub mod preflight;
pub mod quic;
pub mod ranges;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod throughput;
pub mod tls;

/// The async runtime the service runs on, re-exported for callers (the CLI, tests) that drive it.
pub use tokio;

/// ALPN protocol identifier spoken on every fedlora QUIC connection.
pub const ALPN: &[u8] = b"fedlora/1";

/// The multi-threaded tokio runtime the CLI runs the service on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_named("tokio-rt-worker")
}

/// [`runtime`] with its worker threads named `name`, so that a profile (`perf report --sort comm`)
/// tells the server's threads from the clients' when both run in one process (demo, benchmark).
pub fn runtime_named(name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .build()
}
