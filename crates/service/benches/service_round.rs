//! Benchmark: one secure round with N clients (tasks, each with its own QUIC endpoint) and L
//! parameters over loopback QUIC, reporting wall time, bytes on the wire per client against the
//! quantized payload, and the server's upload ingest against raw quinn loopback throughput
//! measured in the same run. Prints a table on stderr and one JSON object on stdout.
//!
//! Environment: FEDLORA_BENCH_CLIENTS (100), FEDLORA_BENCH_PARAMS (1000000),
//! FEDLORA_BENCH_BASELINE_MB (512), FEDLORA_BENCH_WINDOW (server receive window, bytes; default
//! derived), FEDLORA_BENCH_SYNC (1: clients finish masking before anyone uploads, so the ingest
//! window measures the server, not the clients' CPU; 0: natural), FEDLORA_BENCH_SLOTS (concurrent
//! uploads the server admits, `pacing`; default 16, 0 = all at once), FEDLORA_BENCH_REPEATS (3:
//! the round and both baselines are run this many times, one after the other, and the ratios are
//! reported per run and as their median, because this machine's load moves single runs by ±15 %).

use fedlora_service::demo::{run_demo, DemoOptions, DemoReport};

/// The allocator the `fedlora` binary ships with (crates/cli/src/main.rs), so that the benchmark
/// measures the server as deployed: with glibc malloc, every 256 KiB upload piece was a fresh
/// mapping (page faults, and TLB shootdowns when it was unmapped).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One run's figures.
struct Run {
    report: DemoReport,
    ingest: f64,
    raw: f64,
    many: f64,
}

impl Run {
    fn over_raw(&self) -> f64 {
        self.ingest / self.raw
    }
    fn over_many(&self) -> f64 {
        self.ingest / self.many
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("{what}: {e}");
    std::process::exit(1);
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
    let upload_slots: u32 = env_or(
        "FEDLORA_BENCH_SLOTS",
        fedlora_service::pacing::DEFAULT_UPLOAD_SLOTS,
    );
    let repeats: u32 = env_or("FEDLORA_BENCH_REPEATS", 3).max(1);
    let rt = fedlora_service::runtime().unwrap_or_else(|e| fail("runtime", e));
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
        upload_slots,
        privacy: None,
    };
    eprintln!(
        "service-round: N={clients} L={parameters} sync_upload={} upload_slots={upload_slots} repeats={repeats}",
        sync != 0
    );
    let mut runs = Vec::new();
    for i in 1..=repeats {
        let report = rt
            .block_on(run_demo(opts.clone()))
            .unwrap_or_else(|e| fail("benchmark failed", e));
        let _ = std::fs::remove_dir_all(&report.dir);
        let Some(round) = report.server.rounds.first() else {
            fail("benchmark failed", "no round ran");
        };
        let ingest = round.ingest.as_ref().map_or(f64::NAN, |i| i.bytes_per_sec);
        let raw = report.baseline.map_or(f64::NAN, |b| b.bytes_per_sec);
        let many = report.baseline_many.map_or(f64::NAN, |b| b.bytes_per_sec);
        let run = Run {
            ingest,
            raw,
            many,
            report,
        };
        print_run(i, &run, clients, baseline_mb, parameters);
        runs.push(run);
    }
    let over_raw = median(runs.iter().map(Run::over_raw).collect());
    let over_many = median(runs.iter().map(Run::over_many).collect());
    eprintln!(
        "median of {repeats}: ingest / raw quinn (one stream) {:.1} %, ingest / raw quinn ({clients} conns) {:.1} %",
        100.0 * over_raw,
        100.0 * over_many
    );
    // The run whose single-stream ratio is the median stands for the others in the flat fields.
    let mut by_ratio: Vec<&Run> = runs.iter().collect();
    by_ratio.sort_by(|a, b| a.over_raw().total_cmp(&b.over_raw()));
    let mid = by_ratio[by_ratio.len() / 2];
    let round = &mid.report.server.rounds[0];
    let per_run: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            let round = &r.report.server.rounds[0];
            serde_json::json!({
                "status": round.status,
                "exact": r.report.rounds.first().is_some_and(|x| x.exact),
                "round_wall_s": round.wall_ms as f64 / 1e3,
                "ingest_bytes_per_sec": r.ingest,
                "raw_quinn_bytes_per_sec": r.raw,
                "raw_quinn_many_bytes_per_sec": r.many,
                "ingest_over_raw": r.over_raw(),
                "ingest_over_raw_many": r.over_many(),
                "wire_over_quantized": r.report.client_bytes.first().map(|b| b.ratio),
                "lost_packets": r.report.client_bytes.first().map(|b| b.lost_packets),
            })
        })
        .collect();
    let json = serde_json::json!({
        "clients": clients,
        "parameters": parameters,
        "sync_upload": sync != 0,
        "upload_slots": upload_slots,
        "repeats": repeats,
        "status": round.status,
        "exact": runs.iter().all(|r| r.report.rounds.first().is_some_and(|x| x.exact)),
        "round_wall_s": round.wall_ms as f64 / 1e3,
        "client_bytes": mid.report.client_bytes.first(),
        "ingest": round.ingest,
        "raw_quinn": mid.report.baseline,
        "ingest_over_raw": over_raw,
        "raw_quinn_many": mid.report.baseline_many,
        "ingest_over_raw_many": over_many,
        "runs": per_run,
    });
    println!("{json}");
}

fn print_run(i: u32, run: &Run, clients: u32, baseline_mb: u64, parameters: u32) {
    let mb = |b: f64| b / 1e6;
    let report = &run.report;
    let round = &report.server.rounds[0];
    eprintln!("run {i}: ring_bits={:?}", round.ring_bits);
    eprintln!(
        "  round status           {} (exact: {})",
        round.status,
        report.rounds.first().is_some_and(|r| r.exact)
    );
    eprintln!(
        "  round wall time        {:.3} s",
        round.wall_ms as f64 / 1e3
    );
    if let Some(b) = report.client_bytes.first() {
        eprintln!(
            "  wire bytes per client  {:.0} (UDP, all stages) vs quantized {} -> {:.4}x (lost packets: {})",
            b.udp_tx_mean, b.quantized_bytes, b.ratio, b.lost_packets
        );
    }
    if let Some(i) = &round.ingest {
        eprintln!(
            "  server ingest          {:.1} MB/s ({:.1} MB in {:.3} s)",
            mb(run.ingest),
            mb(i.wire_bytes as f64),
            i.seconds
        );
    }
    eprintln!(
        "  raw quinn loopback     {:.1} MB/s ({baseline_mb} MiB, one stream)",
        mb(run.raw)
    );
    eprintln!("  ingest / raw           {:.1} %", 100.0 * run.over_raw());
    eprintln!(
        "  raw quinn, {clients} conns   {:.1} MB/s ({} bytes each, concurrently)",
        mb(run.many),
        u64::from(parameters) * 3
    );
    eprintln!(
        "  ingest / raw {clients} conns {:.1} %",
        100.0 * run.over_many()
    );
}
