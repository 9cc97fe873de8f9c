//! `fedlora simulate`: one secure-aggregation round, every party in this process.
//!
//! Real crypto, every message encoded and decoded, dropouts injected at a chosen stage. Reports the
//! aggregate's error against the plaintext weighted mean, time per stage, bytes per client, the
//! derived parameters, and the server's time as a ratio to the PRG+sum bound measured in the same
//! process (see `fedlora limits`).

use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{seq::index::sample, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use fedlora_secagg::harness::{Clock, Harness, Outcome};
use fedlora_secagg::{derive, ClientInput, ParamRequest, RoundConfig, Stage, TensorSpec};

use crate::exit;
use crate::output::emit;

/// The stage at which dropped clients stop (they send nothing for it or later).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DropStage {
    /// Before advertising keys.
    Advertise,
    /// Before sending shares.
    Share,
    /// Before uploading the masked input (the server must remove their pairwise masks).
    Upload,
    /// After uploading, before answering the unmask request.
    Unmask,
}

impl From<DropStage> for Stage {
    fn from(s: DropStage) -> Stage {
        match s {
            DropStage::Advertise => Stage::AdvertiseKeys,
            DropStage::Share => Stage::ShareKeys,
            DropStage::Upload => Stage::MaskedInput,
            DropStage::Unmask => Stage::Unmask,
        }
    }
}

/// Run one secure-aggregation round in memory and report error, time and bytes.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Clients in the round.
    #[arg(long, default_value_t = 100)]
    pub clients: u32,
    /// Parameters (f32 values) per client, split into a LoRA A and B tensor.
    #[arg(long, default_value_t = 100_000)]
    pub params: u32,
    /// Fraction of clients that drop out.
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
    /// Stage at which the dropped clients stop.
    #[arg(long, value_enum, default_value_t = DropStage::Upload)]
    pub drop_stage: DropStage,
    /// Seed for inputs, dropout choice and every party's randomness.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Dropout rate the parameters are chosen for (default: the larger of --dropout and 0.1).
    #[arg(long)]
    pub expected_dropout: Option<f64>,
    /// Assumed fraction of clients colluding with the server.
    #[arg(long, default_value_t = 0.05)]
    pub corrupt: f64,
    /// Largest client weight; client weights are drawn from 1..=this.
    #[arg(long, default_value_t = 100)]
    pub weight_bound: u32,
    /// Values are clipped to [-clip, clip]; inputs are drawn from that range.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// Minimum fixed-point precision in bits.
    #[arg(long, default_value_t = 16)]
    pub min_quant_bits: u8,
    /// Force the ring width (8, 16, 24 or 32).
    #[arg(long)]
    pub ring_bits: Option<u8>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Megabytes per throughput measurement for the bound.
    #[arg(long, default_value_t = 128)]
    pub bound_megabytes: usize,
}

struct StdClock(Instant);

impl Clock for StdClock {
    fn now_nanos(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// Per-stage times in the report.
#[derive(Debug, Serialize)]
struct StageReport {
    stage: &'static str,
    server_seconds: f64,
    client_seconds: f64,
}

/// The `--json` report; field names are a contract (issue: simulator).
#[derive(Debug, Serialize)]
struct Report {
    clients: u32,
    params: u32,
    dropped: u32,
    drop_stage: &'static str,
    survivors: u32,
    degree: u32,
    threshold: u32,
    ring_bits: u8,
    quant_bits: u8,
    complete_graph: bool,
    log2_failure: f64,
    max_abs_error: f64,
    error_bound: f64,
    server_seconds: f64,
    client_seconds: f64,
    bound_seconds: f64,
    server_to_bound: f64,
    upload_bytes_per_client: f64,
    quantized_bytes_per_client: u64,
    upload_to_quantized: f64,
    raw_f32_bytes_per_client: u64,
    download_bytes_per_client: f64,
    masks_removed: u64,
    threads: usize,
    aes_ctr_bytes_per_sec: f64,
    sum_bytes_per_sec: f64,
    stages: Vec<StageReport>,
}

fn client_input(seed: u64, i: u32, len: u32, clip: f32, weight_bound: u32) -> ClientInput {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(i));
    let weight = rng.random_range(1..=weight_bound);
    ClientInput {
        values: (0..len).map(|_| rng.random_range(-clip..=clip)).collect(),
        weight,
    }
}

/// A stable word for the kind of abort (JSON `reason`), next to its text (`aborted`).
fn abort_kind(reason: &fedlora_secagg::AbortReason) -> &'static str {
    use fedlora_secagg::AbortReason as A;
    match reason {
        A::TooFewSurvivors { .. } => "too_few_survivors",
        A::NeighbourhoodBelowThreshold { .. } => "neighbourhood_below_threshold",
        A::ReconstructionFailed { .. } => "reconstruction_failed",
        A::Cancelled { .. } => "cancelled",
    }
}

/// Runs `fedlora simulate`.
pub fn run(args: SimulateArgs, json: bool) -> anyhow::Result<()> {
    crate::threads::init(args.threads)?;
    if !(0.0..=1.0).contains(&args.dropout) {
        return Err(exit::refuse(format!(
            "--dropout must be in [0, 1], got {}",
            args.dropout
        )));
    }
    crate::ranges::int("--clients", u64::from(args.clients), 2, 1 << 20)?;
    crate::ranges::int(
        "--params",
        u64::from(args.params),
        1,
        fedlora_service::preflight::max_values(),
    )?;
    crate::ranges::int("--bound-megabytes", args.bound_megabytes as u64, 1, 1 << 16)?;
    if !(args.clip.is_finite() && args.clip > 0.0) {
        return Err(exit::refuse(format!(
            "--clip must be positive and finite, got {}",
            args.clip
        )));
    }
    let n = args.clients;
    let mut req = ParamRequest::new(n);
    req.expected_dropout = args.expected_dropout.unwrap_or(args.dropout.max(0.1));
    req.corrupt_fraction = args.corrupt;
    req.clip = args.clip;
    req.weight_bound = args.weight_bound;
    req.min_quant_bits = args.min_quant_bits;
    req.ring_bits = args.ring_bits;
    let derivation = derive(&req).context("choosing round parameters")?;
    let params = derivation.params.clone();
    let len = args.params;
    let manifest = vec![
        TensorSpec {
            name: "lora_A".into(),
            shape: vec![len / 2],
        },
        TensorSpec {
            name: "lora_B".into(),
            shape: vec![len - len / 2],
        },
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let dropped_count = (args.dropout * f64::from(n)).round() as u32;
    let mut drop_at = vec![None; n as usize];
    for i in sample(&mut rng, n as usize, dropped_count as usize) {
        drop_at[i] = Some(Stage::from(args.drop_stage));
    }
    let mut nonce = [0u8; 32];
    rng.fill(&mut nonce);

    eprintln!(
        "round: {n} clients x {len} params, {dropped_count} drop at '{}'; degree {} threshold {} ring {} bits ({} bits precision){}",
        Stage::from(args.drop_stage),
        params.degree,
        params.threshold,
        params.ring_bits,
        params.quant_bits,
        if derivation.complete_graph { ", complete graph" } else { "" }
    );
    eprintln!("measuring the PRG+sum bound ...");
    let limits = crate::limits::measure(args.bound_megabytes);

    let bar = ProgressBar::new(u64::from(n) * 5);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:>10} [{bar:40}] {pos}/{len} client-steps {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Without a terminal (CI logs, pipes) the bar is hidden and each stage prints one line instead.
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    if plain {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_message("inputs");
    let inputs: Vec<ClientInput> = (0..n)
        .map(|i| {
            bar.inc(1);
            client_input(args.seed, i, len, args.clip, args.weight_bound)
        })
        .collect();
    let config = RoundConfig {
        round: 1,
        nonce,
        num_clients: n,
        params: params.clone(),
        manifest,
    };
    let mut harness = Harness::new(config, inputs, drop_at, args.seed)?;
    let progress_bar = bar.clone();
    let mut stage_base = 0u64;
    let mut last_stage = None;
    harness.on_progress(move |p| {
        if p.stage != last_stage {
            last_stage = p.stage;
            stage_base += u64::from(n);
            let name = p.stage.map_or("done", |s| s.name());
            progress_bar.set_message(name);
            if plain {
                eprintln!("stage {name} ...");
            }
        }
        progress_bar.set_position(stage_base + p.done as u64);
    });
    let clock = StdClock(Instant::now());
    let outcome = harness.run(Some(&clock));
    bar.finish_and_clear();
    eprintln!("measuring the PRG+sum bound again (the faster of the two is used) ...");
    let limits = limits.best(crate::limits::measure(args.bound_megabytes));

    if !harness.server_errors.is_empty() || !harness.client_errors.is_empty() {
        let first = |e: Option<String>| e.unwrap_or_else(|| "none".into());
        anyhow::bail!(
            "protocol errors in simulation: server: {}; clients: {}",
            first(
                harness
                    .server_errors
                    .first()
                    .map(|(c, e)| format!("client {c}: {e}"))
            ),
            first(
                harness
                    .client_errors
                    .first()
                    .map(|(c, e)| format!("client {c}: {e}"))
            )
        );
    }
    let agg = match outcome {
        Outcome::Finished(agg) => agg,
        Outcome::Aborted(reason) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "aborted": reason.to_string(),
                        "reason": abort_kind(&reason),
                        "outcome": exit::outcome(exit::ROUNDS_ABORTED),
                        "exit_code": exit::ROUNDS_ABORTED,
                    })
                );
            }
            return exit::reported(exit::ROUNDS_ABORTED, format!("round aborted: {reason}"));
        }
    };

    // Plaintext reference, regenerated from the same seeds: the weighted mean of survivors' inputs.
    let mut reference = vec![0f64; len as usize];
    let mut weight_sum = 0f64;
    for &i in &agg.survivors {
        let input = client_input(args.seed, i, len, args.clip, args.weight_bound);
        let w = f64::from(input.weight);
        for (r, v) in reference.iter_mut().zip(&input.values) {
            *r += w * f64::from(*v);
        }
        weight_sum += w;
    }
    let max_abs_error = agg
        .mean
        .iter()
        .zip(&reference)
        .map(|(m, r)| (f64::from(*m) - r / weight_sum).abs())
        .fold(0.0, f64::max);

    let survivors = agg.survivors.len() as u64;
    let masks_removed = agg.masks_removed;
    let words = u64::from(len) + 1;
    let bound_seconds = limits.bound_seconds(masks_removed * words, survivors * words);
    let mut stages = Vec::new();
    let (mut server_seconds, mut client_seconds) = (0.0, 0.0);
    for (stage, t) in &harness.stage_times {
        let s = t.server_nanos as f64 / 1e9;
        let c = if t.clients_active > 0 {
            t.client_nanos_total as f64 / 1e9 / f64::from(t.clients_active)
        } else {
            0.0
        };
        server_seconds += s;
        client_seconds += c;
        stages.push(StageReport {
            stage: stage.name(),
            server_seconds: s,
            client_seconds: c,
        });
    }
    let full: Vec<usize> = (0..n as usize)
        .filter(|&i| agg.survivors.binary_search(&(i as u32)).is_ok())
        .collect();
    let mean_of =
        |v: &[u64]| full.iter().map(|&i| v[i] as f64).sum::<f64>() / full.len().max(1) as f64;
    let upload = mean_of(&harness.bytes_up);
    let quantized = words * u64::from(params.ring_bits / 8);
    let report = Report {
        clients: n,
        params: len,
        dropped: dropped_count,
        drop_stage: Stage::from(args.drop_stage).name(),
        survivors: survivors as u32,
        degree: params.degree,
        threshold: params.threshold,
        ring_bits: params.ring_bits,
        quant_bits: params.quant_bits,
        complete_graph: derivation.complete_graph,
        log2_failure: derivation.log2_failure,
        max_abs_error,
        error_bound: agg.error_bound,
        server_seconds,
        client_seconds,
        bound_seconds,
        server_to_bound: server_seconds / bound_seconds,
        upload_bytes_per_client: upload,
        quantized_bytes_per_client: quantized,
        upload_to_quantized: upload / quantized as f64,
        raw_f32_bytes_per_client: u64::from(len) * 4,
        download_bytes_per_client: mean_of(&harness.bytes_down),
        masks_removed,
        threads: limits.threads,
        aes_ctr_bytes_per_sec: limits.aes_ctr_bytes_per_sec,
        sum_bytes_per_sec: limits.sum_bytes_per_sec,
        stages,
    };
    emit(json, || human(&report), &report)
}

fn human(r: &Report) -> String {
    let mut s = format!(
        "clients {} x params {}: {} dropped at '{}', {} survivors\n\
         parameters: degree {} threshold {} ring {} bits, precision {} bits{}\n\
         max |error| vs plaintext weighted mean: {:.3e} (bound {:.3e})\n\
         server {:.3} s = {:.2}x the PRG+sum bound ({:.3} s, {} masks removed, {} threads); client {:.3} s\n\
         upload per client {:.0} B = {:.4}x the quantized payload ({} B; raw f32 {} B)\n",
        r.clients, r.params, r.dropped, r.drop_stage, r.survivors, r.degree, r.threshold, r.ring_bits,
        r.quant_bits, if r.complete_graph { " (complete graph)" } else { "" }, r.max_abs_error,
        r.error_bound, r.server_seconds, r.server_to_bound, r.bound_seconds, r.masks_removed, r.threads,
        r.client_seconds, r.upload_bytes_per_client, r.upload_to_quantized, r.quantized_bytes_per_client,
        r.raw_f32_bytes_per_client,
    );
    for st in &r.stages {
        s += &format!(
            "  stage {:>9}: server {:.4} s, client {:.4} s\n",
            st.stage, st.server_seconds, st.client_seconds
        );
    }
    s.trim_end().to_string()
}
