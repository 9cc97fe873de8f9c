//! Raw quinn loopback throughput against the number of concurrent connections: 300 MB in all,
//! split over 100, 25, 10, 4 and 1 connections into one server socket, then one stream of 512 MiB
//! (the service-round benchmark's single-stream baseline). The measurement behind upload pacing
//! (`fedlora_service::pacing`). Prints a line per shape on stderr; with `--json`, one JSON object
//! on stdout as its last line.
//!
//! `cargo run --release -p fedlora-service --example raw_quinn_shape -- --json`

use fedlora_service::throughput::{
    raw_quinn_loopback, raw_quinn_loopback_from, raw_quinn_loopback_many, Source,
};

const TOTAL_BYTES: u64 = 300_000_000;

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let rt = match fedlora_service::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let mut shapes = Vec::new();
    for conns in [100u32, 25, 10, 4, 1] {
        match rt.block_on(raw_quinn_loopback_many(
            conns,
            TOTAL_BYTES / u64::from(conns),
        )) {
            Ok(r) => {
                eprintln!("{conns:>3} connections: {:.1} MB/s", r.bytes_per_sec / 1e6);
                shapes.push(
                    serde_json::json!({"connections": conns, "bytes_per_sec": r.bytes_per_sec}),
                );
            }
            Err(e) => {
                eprintln!("{conns} connections: {e}");
                std::process::exit(1);
            }
        }
    }
    let single = match rt.block_on(raw_quinn_loopback(512 << 20)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("one stream: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "one stream, 512 MiB: {:.1} MB/s",
        single.bytes_per_sec / 1e6
    );
    let distinct = match rt.block_on(raw_quinn_loopback_from(512 << 20, Source::Distinct)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("one stream of distinct bytes: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "one stream, 512 MiB of distinct bytes: {:.1} MB/s",
        distinct.bytes_per_sec / 1e6
    );
    if json {
        println!(
            "{}",
            serde_json::json!({
                "total_bytes": TOTAL_BYTES,
                "shapes": shapes,
                "single_stream_bytes_per_sec": single.bytes_per_sec,
                "single_stream_distinct_bytes_per_sec": distinct.bytes_per_sec,
            })
        );
    }
}
