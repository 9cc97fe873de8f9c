//! The human summaries of `fedlora server` and `fedlora client`: rounds by enrolled name, whether
//! DP noise and clipping applied, where the results were written, and why the run stopped; and
//! the exit codes their reports stand for.

use fedlora_service::client::ClientReport;
use fedlora_service::config::{ClientConfig, InputConfig, ServerConfig};
use fedlora_service::server::{RoundSummary, ServerReport};

use crate::exit;

/// The server's exit code: interrupted by a signal, some rounds aborted, or all finished.
pub fn server_code(report: &ServerReport) -> u8 {
    match report.shutdown {
        Some(stop) => stop.exit_code,
        None if report.rounds.iter().any(|r| r.status != "finished") => exit::ROUNDS_ABORTED,
        None => exit::OK,
    }
}

/// The client's exit code: some rounds not finished, or all finished.
pub fn client_code(report: &ClientReport) -> u8 {
    if report.rounds.iter().any(|r| r.outcome != "finished") {
        exit::ROUNDS_ABORTED
    } else {
        exit::OK
    }
}

fn name_of(r: &RoundSummary, id: u32) -> String {
    r.participants
        .get(id as usize)
        .cloned()
        .unwrap_or_else(|| format!("client {id}"))
}

fn privacy_line(p: Option<&fedlora_dp::PrivacyConfig>) -> String {
    let Some(p) = p else {
        return "no DP noise (no [privacy] section)".into();
    };
    let mode = serde_json::to_value(p.mode)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    if mode == "none" {
        return "no DP noise ([privacy] mode = \"none\")".into();
    }
    let noise = match (p.noise_multiplier, p.target_epsilon) {
        (Some(z), _) => format!("noise multiplier {z}"),
        (None, Some(e)) => format!(
            "calibrated to epsilon {e} over {} rounds",
            p.rounds.unwrap_or(0)
        ),
        _ => String::new(),
    };
    let clip = p
        .clip_norm
        .map_or(String::new(), |c| format!(", updates L2-clipped to {c}"));
    format!("DP noise: {mode} ({noise}, delta {}){clip}", p.delta)
}

/// The server's summary.
pub fn server(report: &ServerReport, cfg: &ServerConfig) -> String {
    let finished = report
        .rounds
        .iter()
        .filter(|r| r.status == "finished")
        .count();
    let mut s = format!(
        "fedlora server on {}: {finished} of {} round(s) finished",
        report.listen,
        report.rounds.len()
    );
    for r in &report.rounds {
        let in_sum: Vec<String> = r.survivors.iter().map(|id| name_of(r, *id)).collect();
        s.push_str(&format!(
            "\n  round {} ({}): {}",
            r.round,
            r.purpose.name(),
            r.status
        ));
        if r.status == "finished" {
            s.push_str(&format!(
                ", {} of {} clients in the sum: {}",
                in_sum.len(),
                r.participants.len(),
                in_sum.join(", ")
            ));
        }
        if !r.dropped.is_empty() {
            let dropped: Vec<String> = r
                .dropped
                .iter()
                .map(|(id, stage)| format!("{} at {stage}", name_of(r, *id)))
                .collect();
            s.push_str(&format!("; dropped: {}", dropped.join(", ")));
        }
        if let Some(reason) = &r.abort_reason {
            s.push_str(&format!("; reason: {reason}"));
        }
    }
    let clip = match &cfg.federation {
        Some(f) => format!(
            "per-value clip ±{} (federation.value_clip), weights capped at {}",
            f.value_clip, f.weight_bound
        ),
        None => format!(
            "per-value clip ±{} (protocol.clip), weights capped at {}",
            cfg.protocol.clip, cfg.protocol.weight_bound
        ),
    };
    s.push_str(&format!(
        "\n  privacy: {}; {clip} (clients warn when they clip)",
        privacy_line(cfg.privacy.as_ref())
    ));
    let data = cfg.data_dir.display();
    match &report.federation {
        Some(f) => s.push_str(&format!(
            "\n  written: global adapter (PEFT, {} rounds folded in) {}; store and audit log {data}/fedlora.sqlite3",
            f.rounds_folded, f.global_dir
        )),
        None => s.push_str(&format!(
            "\n  written: aggregates {data}/aggregates/round-NNNNNN.bin; store and audit log {data}/fedlora.sqlite3"
        )),
    }
    if !report.interrupted_rounds.is_empty() {
        s.push_str(&format!(
            "\n  found interrupted by an earlier stop and recorded as aborted: rounds {}",
            join(&report.interrupted_rounds)
        ));
    }
    if let Some(stop) = report.shutdown {
        s.push_str(&format!(
            "\n  stopped by {}: the round under way was cancelled and recorded; the remaining rounds were not run",
            stop.signal
        ));
    }
    s
}

/// The client's summary.
pub fn client(report: &ClientReport, cfg: &ClientConfig) -> String {
    let finished = report
        .rounds
        .iter()
        .filter(|r| r.outcome == "finished")
        .count();
    let mut s = format!(
        "fedlora client of {}: {finished} of {} round(s) finished{}",
        cfg.server,
        report.rounds.len(),
        if report.server_done {
            "; the server said it is done"
        } else {
            ""
        }
    );
    for r in &report.rounds {
        s.push_str(&format!(
            "\n  round {} (as client {}): {}",
            r.round, r.client_id, r.outcome
        ));
        if let Some(reason) = &r.reason {
            s.push_str(&format!(": {reason}"));
        }
        if r.clipped_values > 0 {
            s.push_str(&format!(
                "; {} values clipped by the round's per-value range",
                r.clipped_values
            ));
        }
    }
    let input = match (&cfg.input, &cfg.train) {
        (_, Some(t)) => format!("trained locally on {}", t.task),
        (Some(InputConfig::File { path, .. }), None) => format!("from {}", path.display()),
        (Some(InputConfig::Synthetic { .. }), None) => {
            "SYNTHETIC values ([input] kind = \"synthetic\": tests and demos only)".into()
        }
        (None, None) => "none".into(),
    };
    s.push_str(&format!(
        "\n  contribution: {input}\n  privacy: {}",
        privacy_line(cfg.privacy.as_ref())
    ));
    match &cfg.state_dir {
        Some(d) => s.push_str(&format!("\n  global states written to {}", d.display())),
        None => s.push_str("\n  global states not written (no state_dir)"),
    }
    s
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}
