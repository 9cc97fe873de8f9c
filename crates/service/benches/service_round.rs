//! Benchmark: one secure round with N clients (tasks, each with its own QUIC endpoint) and L
//! parameters over loopback QUIC, reporting wall time, bytes on the wire per client against the
//! quantized payload, and the server's upload ingest against raw quinn loopback throughput
//! measured in the same run. Prints a table on stderr and one JSON object on stdout.
//!
//! Environment: FEDLORA_BENCH_CLIENTS (100), FEDLORA_BENCH_PARAMS (1000000),
//! FEDLORA_BENCH_BASELINE_MB (512), FEDLORA_BENCH_WINDOW (server receive window, bytes; default
//! derived), FEDLORA_BENCH_SYNC (1: clients finish masking before anyone uploads, so the ingest
//! window measures the server, not the clients' CPU; 0: natural).

use fedlora_service::demo::{run_demo, DemoOptions};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benches; nothing to list here.
    }
    fedlora_service::logging::init("warn");
    let clients: u32 = env_or("FEDLORA_BENCH_CLIENTS", 100);
    let parameters: u32 = env_or("FEDLORA_BENCH_PARAMS", 1_000_000);
    let baseline_mb: u64 = env_or("FEDLORA_BENCH_BASELINE_MB", 512);
    let window: Option<u32> = std::env::var("FEDLORA_BENCH_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok());
    let sync: u32 = env_or("FEDLORA_BENCH_SYNC", 1);
    let rt = match fedlora_service::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let opts = DemoOptions {
        clients,
        parameters,
        rounds: 1,
        dir: None,
        stage_timeout_ms: 300_000,
        baseline_bytes: Some(baseline_mb << 20),
        synchronized_upload: sync != 0,
        baseline_many_bytes_each: Some(u64::from(parameters) * 3),
        receive_window_bytes: window,
        privacy: None,
    };
    let report = match rt.block_on(run_demo(opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    };
    let _ = std::fs::remove_dir_all(&report.dir);
    let Some(round) = report.server.rounds.first() else {
        eprintln!("no round ran");
        std::process::exit(1);
    };
    let raw = report.baseline.map(|b| b.bytes_per_sec).unwrap_or(f64::NAN);
    let ingest = round
        .ingest
        .as_ref()
        .map(|i| i.bytes_per_sec)
        .unwrap_or(f64::NAN);
    let bytes = report.client_bytes.first();
    let mb = |b: f64| b / 1e6;
    eprintln!(
        "service-round: N={clients} L={parameters} ring_bits={:?} sync_upload={}",
        round.ring_bits,
        sync != 0
    );
    eprintln!(
        "  round status           {} (exact: {})",
        round.status,
        report.rounds.first().is_some_and(|r| r.exact)
    );
    eprintln!(
        "  round wall time        {:.3} s",
        round.wall_ms as f64 / 1e3
    );
    if let Some(b) = bytes {
        eprintln!(
            "  wire bytes per client  {:.0} (UDP, all stages) vs quantized {} -> {:.4}x (lost packets: {})",
            b.udp_tx_mean, b.quantized_bytes, b.ratio, b.lost_packets
        );
    }
    if let Some(i) = &round.ingest {
        eprintln!(
            "  server ingest          {:.1} MB/s ({:.1} MB in {:.3} s)",
            mb(ingest),
            mb(i.wire_bytes as f64),
            i.seconds
        );
    }
    eprintln!(
        "  raw quinn loopback     {:.1} MB/s ({baseline_mb} MiB, one stream)",
        mb(raw)
    );
    eprintln!("  ingest / raw           {:.1} %", 100.0 * ingest / raw);
    let many = report
        .baseline_many
        .map(|b| b.bytes_per_sec)
        .unwrap_or(f64::NAN);
    eprintln!(
        "  raw quinn, {clients} conns   {:.1} MB/s ({} bytes each, concurrently)",
        mb(many),
        u64::from(parameters) * 3
    );
    eprintln!(
        "  ingest / raw {clients} conns {:.1} %",
        100.0 * ingest / many
    );
    let json = serde_json::json!({
        "clients": clients,
        "parameters": parameters,
        "sync_upload": sync != 0,
        "status": round.status,
        "exact": report.rounds.first().is_some_and(|r| r.exact),
        "round_wall_s": round.wall_ms as f64 / 1e3,
        "client_bytes": bytes,
        "ingest": round.ingest,
        "raw_quinn": report.baseline,
        "ingest_over_raw": ingest / raw,
        "raw_quinn_many": report.baseline_many,
        "ingest_over_raw_many": ingest / many,
    });
    println!("{json}");
}
