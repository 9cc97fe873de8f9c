//! Structured logs (tracing) on standard error; `RUST_LOG` overrides the default filter.
//!
//! Quiet by default: warnings, plus the progress lines of target [`PROGRESS`] (one or two lines per
//! round and one a minute while a long stage waits, so a job under systemd or in a container shows
//! it is moving). `-v` shows every protocol step (`info`), `-vv` debug detail.

/// Target of the concise progress lines shown by default (`info!(target: "progress::server", ..)`).
pub const PROGRESS: &str = "progress";

/// Installs the global tracing subscriber once; later calls are no-ops.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The default filter for a verbosity (`-v` count): 0 is warnings and progress lines.
pub fn filter_for(verbosity: u8) -> &'static str {
    match verbosity {
        0 => "warn,progress=info",
        1 => "info",
        _ => "debug",
    }
}
