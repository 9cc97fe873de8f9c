//! `fedlora federate`: N clients in one process fine-tune LoRA adapters federatedly on one task,
//! each on its own IID share of the data, for R rounds, with a chosen aggregation rule and privacy
//! (plain sums, SecAgg+, or SecAgg+ with distributed DP). Records every round, keeps a checkpoint
//! to continue an interrupted run, and writes the global adapter in PEFT format.

pub mod args;
pub mod contributor;
pub mod demo;
pub mod layout_cmd;
pub mod store;
pub mod trainer;

use std::time::Instant;

use anyhow::Context;
use fedlora_federation::{
    Federation, FederationConfig, LocalTrainer, Privacy, Progress as RoundProgress, RoundRecord,
};
use fedlora_train::federated::{adapter_layout, export_peft, ExportReport, FederatedModel};
use fedlora_train::model::{LoadedModel, ModelSpec};
use fedlora_train::run::TaskSpec;
use fedlora_train::TrainConfig;
use serde::Serialize;

use crate::exit;
use crate::output::emit_outcome;
use crate::progress::Progress;
use args::{FederateArgs, Plan, PrivacyChoice};
use store::{Baseline, Fingerprint, RunDir};
use trainer::{CandleTrainer, ClientData, LocalSettings};

/// The final report (`--json`: one object; these field names are a contract).
#[derive(Debug, Serialize)]
struct Report {
    task: String,
    model: String,
    rule: String,
    clients: usize,
    rounds: u64,
    privacy: String,
    epsilon_target: Option<f64>,
    delta: Option<f64>,
    metric_name: String,
    baseline_metric: f64,
    metric_per_round: Vec<f64>,
    final_metric: f64,
    loss_per_round: Vec<f64>,
    epsilon: Option<f64>,
    upload_bytes_per_client: u64,
    raw_upload_bytes_per_client: u64,
    upload_values: usize,
    aborted_rounds: Vec<u64>,
    clipped_values: usize,
    train_seconds: f64,
    aggregate_seconds: f64,
    eval_seconds: f64,
    aggregate_share: f64,
    wall_seconds: f64,
    resumed_from_round: u64,
    out: String,
    global_adapter: String,
    merged_delta: Option<String>,
    truncation_error: Option<f64>,
    threads: usize,
}

/// Runs `fedlora federate`.
pub fn run(args: FederateArgs, json: bool) -> anyhow::Result<()> {
    let wall = Instant::now();
    let plan = args.plan().map_err(exit::refused)?;
    let (threads, dev) = args.common.threads_and_device().map_err(exit::refused)?;
    let task = TaskSpec::parse(&args.task).map_err(exit::refused)?;
    let max_len = args.common.max_len_for(&task);
    let seed = args.common.seed;
    let mut data = task.load(seed).map_err(exit::refused)?;
    data.truncate(args.train_examples, args.eval_examples);
    if data.test.is_empty() {
        return Err(exit::refuse(format!(
            "task {} has no held-out examples to score the global model",
            data.name
        )));
    }
    let spec = args
        .common
        .model
        .as_deref()
        .map(ModelSpec::parse)
        .unwrap_or_else(|| task.default_model(&data));
    let model =
        LoadedModel::load(&spec, data.labels.len().max(2), seed, &dev).map_err(exit::refused)?;
    model.check_task(&data).map_err(exit::refused)?;
    let layout = adapter_layout(&model, &plan.lora, &plan.partitions).map_err(exit::refused)?;
    let fm =
        FederatedModel::new(model, layout.clone(), plan.lora.dropout).map_err(exit::refused)?;
    let client_data = ClientData::split(
        &data,
        &fm,
        args.clients,
        None,
        max_len,
        args.loss_on_prompt,
        seed,
    )
    .map_err(exit::refused)?;
    let privacy = match &plan.privacy {
        PrivacyChoice::None => Privacy::None,
        PrivacyChoice::SecAgg => Privacy::SecAgg,
        PrivacyChoice::Dp {
            epsilon,
            delta,
            clip_norm,
        } => Privacy::distributed(
            *epsilon,
            delta.unwrap_or(1.0 / data.train.len() as f64),
            *clip_norm,
            args.rounds,
        )
        .map_err(exit::refused)?,
    };
    let cfg = FederationConfig {
        rule: plan.rule,
        ranks: plan.ranks.clone(),
        rounds: args.rounds,
        privacy: privacy.clone(),
        dropout: args.dropout,
        seed,
        value_clip: args.value_clip,
    };
    let fingerprint = fingerprint(&args, &plan, &data.name, &fm.model.name, &privacy);
    let run_dir = RunDir::new(&args.out);
    let resume = run_dir.has_run() && !args.restart;
    if resume {
        run_dir
            .check_fingerprint(&fingerprint)
            .map_err(exit::refused)?;
    }
    let train = TrainConfig {
        steps: 1,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup_steps: args.warmup,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        seed,
        pad_to: None,
        progress: false,
    };
    train.validate().map_err(exit::refused)?;
    let settings = LocalSettings {
        train,
        epochs: args.local_epochs,
        eval_batch: args.batch_size,
        generate: args.generate,
        max_new_tokens: args.max_new_tokens,
        lora: plan.lora.clone(),
        keep_client_adapters: args
            .keep_client_adapters
            .then(|| (run_dir.clients_dir(), args.rounds - 1)),
    };
    let model_name = fm.model.name.clone();
    // Everything is checked: from here on the run writes.
    let (mut fed, baseline, resumed_from) = if resume {
        let (cp, baseline) = run_dir.load(args.clients)?;
        let done = cp.records.len() as u64;
        (Federation::resume(cfg, cp)?, baseline, done)
    } else {
        (
            Federation::new(cfg, layout)?,
            Baseline {
                metric: 0.0,
                loss: 0.0,
                examples: 0,
            },
            0,
        )
    };
    if args.keep_client_adapters {
        eprintln!(
            "WARNING: --keep-client-adapters writes every client's raw adapter to {}: research only, never with real institutions' data",
            run_dir.clients_dir().display()
        );
    }
    let mut trainer = CandleTrainer::new(fm, client_data, settings, seed);
    // Progress always goes to stderr (a bar on a terminal, a line every 30 s otherwise), so a long
    // run under a supervisor shows it is moving; `--json` keeps stdout to one object.
    let quiet = false;
    let baseline = if resume {
        eprintln!(
            "continuing the run in {} after round {resumed_from} of {}",
            run_dir.root().display(),
            args.rounds
        );
        baseline
    } else {
        run_dir.create(args.restart)?;
        if !quiet {
            eprintln!(
                "scoring the initial model on {} held-out examples",
                data.test.len()
            );
        }
        let s = fed.evaluate(&mut trainer)?;
        let b = Baseline {
            metric: s.metric,
            loss: s.loss,
            examples: s.examples,
        };
        run_dir.start(&fingerprint, &b, fed.global())?;
        b
    };
    let total = args.rounds * args.clients as u64;
    let mut bar = Progress::new("federate", total, quiet);
    bar.set(resumed_from * args.clients as u64, "");
    let metric_name = trainer.metric_name();
    if !quiet {
        bar.println(&format!(
            "{} on {}: {} clients, rule {}, privacy {}, {} round(s) of {} local epoch(s); {} before training {:.4}",
            model_name, data.name, args.clients, plan.rule, privacy.name(), args.rounds,
            args.local_epochs, metric_name, baseline.metric
        ));
    }
    let mut export = None;
    while !fed.is_done() {
        let rec = {
            let clients = args.clients as u64;
            let mut on_progress = |p: RoundProgress| match p {
                RoundProgress::Trained { round, done, .. } => bar.set(
                    (round - 1) * clients + done as u64,
                    &format!("round {round}: trained client {done}"),
                ),
                RoundProgress::Evaluating { round } => {
                    bar.set(round * clients, &format!("round {round}: scoring"))
                }
            };
            fed.run_round(&mut trainer, &mut on_progress)?
        };
        run_dir.save_round(&fed.checkpoint(), &baseline)?;
        export = Some(write_global(&fed, &plan, &run_dir)?);
        if !quiet {
            bar.println(&round_line(&rec));
        }
    }
    bar.finish();
    let export = match export {
        Some(e) => e,
        None => write_global(&fed, &plan, &run_dir)?,
    };
    let report = build_report(
        &args,
        &plan,
        &data.name,
        &model_name,
        &privacy,
        baseline.metric,
        fed.records(),
        &export,
        resumed_from,
        threads,
        wall.elapsed().as_secs_f64(),
        metric_name,
    );
    let code = if report.aborted_rounds.is_empty() {
        exit::OK
    } else {
        exit::ROUNDS_ABORTED
    };
    emit_outcome(
        json,
        || human(&report),
        &report,
        code,
        || {
            format!(
            "{} of {} rounds aborted (rounds {}); the global adapter holds the rounds that finished",
            report.aborted_rounds.len(),
            args.rounds,
            report
                .aborted_rounds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
        },
    )
}

/// Writes the global adapter (PEFT) of the run so far.
fn write_global(fed: &Federation, plan: &Plan, run_dir: &RunDir) -> anyhow::Result<ExportReport> {
    let dir = run_dir.global_dir();
    export_peft(fed.global(), &plan.lora, &dir)
        .with_context(|| format!("writing the global adapter to {}", dir.display()))
}

fn round_line(r: &RoundRecord) -> String {
    let eps = r
        .epsilon
        .map_or(String::new(), |e| format!(", epsilon spent {e:.3}"));
    if r.status != "finished" {
        return format!(
            "round {}: ABORTED ({}); {} {:.4}",
            r.round,
            r.abort_reason.clone().unwrap_or_default(),
            r.metric_name,
            r.metric
        );
    }
    format!(
        "round {}: {} {:.4} (loss {:.4}) with {}/{} clients, {} bytes up per client{}; train {:.1}s, secure sum {:.2}s",
        r.round, r.metric_name, r.metric, r.loss, r.survivors, r.clients, r.upload_bytes_per_client,
        eps, r.train_seconds, r.aggregate_seconds
    )
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    args: &FederateArgs,
    plan: &Plan,
    task: &str,
    model: &str,
    privacy: &Privacy,
    baseline: f64,
    records: &[RoundRecord],
    export: &ExportReport,
    resumed_from: u64,
    threads: usize,
    wall_seconds: f64,
    metric_name: &str,
) -> Report {
    let sum = |f: fn(&RoundRecord) -> f64| records.iter().map(f).sum::<f64>();
    let (train_s, agg_s) = (sum(|r| r.train_seconds), sum(|r| r.aggregate_seconds));
    let (epsilon_target, delta) = match privacy {
        Privacy::Dp(p) => (p.target_epsilon, Some(p.delta)),
        _ => (None, None),
    };
    Report {
        task: task.into(),
        model: model.into(),
        rule: plan.rule.name().into(),
        clients: args.clients,
        rounds: args.rounds,
        privacy: privacy.name().into(),
        epsilon_target,
        delta,
        metric_name: metric_name.into(),
        baseline_metric: baseline,
        metric_per_round: records.iter().map(|r| r.metric).collect(),
        final_metric: records.last().map_or(baseline, |r| r.metric),
        loss_per_round: records.iter().map(|r| r.loss).collect(),
        epsilon: records.iter().rev().find_map(|r| r.epsilon),
        upload_bytes_per_client: records.last().map_or(0, |r| r.upload_bytes_per_client),
        raw_upload_bytes_per_client: records.last().map_or(0, |r| r.raw_upload_bytes),
        upload_values: records.last().map_or(0, |r| r.upload_values),
        aborted_rounds: records
            .iter()
            .filter(|r| r.status != "finished")
            .map(|r| r.round)
            .collect(),
        clipped_values: records.iter().map(|r| r.clipped_values).sum(),
        train_seconds: train_s,
        aggregate_seconds: agg_s,
        eval_seconds: sum(|r| r.eval_seconds),
        aggregate_share: agg_s / (train_s + agg_s).max(1e-9),
        wall_seconds,
        resumed_from_round: resumed_from,
        out: args.out.display().to_string(),
        global_adapter: export.dir.display().to_string(),
        merged_delta: export
            .merged_delta
            .as_ref()
            .map(|p| p.display().to_string()),
        truncation_error: export.truncation_error,
        threads,
    }
}

fn human(r: &Report) -> String {
    let mut s = format!(
        "federated {} on {} ({}): {} clients, rule {}, privacy {}\n  {} before training {:.4}; after each round {}\n  upload per client {} bytes (raw f32 {} bytes, {} values); secure aggregation {:.1}% of train+aggregate time\n  global adapter (PEFT) in {}",
        r.model, r.task, r.out, r.clients, r.rule, r.privacy, r.metric_name, r.baseline_metric,
        r.metric_per_round.iter().map(|m| format!("{m:.4}")).collect::<Vec<_>>().join(", "),
        r.upload_bytes_per_client, r.raw_upload_bytes_per_client, r.upload_values,
        100.0 * r.aggregate_share, r.global_adapter
    );
    if let Some(e) = r.epsilon {
        s.push_str(&format!(
            "\n  epsilon spent {e:.3} (target {}, delta {})",
            r.epsilon_target.map_or("none".into(), |t| t.to_string()),
            r.delta.map_or("none".into(), |d| d.to_string())
        ));
    }
    if let Some(t) = r.truncation_error {
        s.push_str(&format!(
            "\n  exact rule: merged update in {}; the PEFT adapter is its rank-r truncation (relative error {t:.4})",
            r.merged_delta.clone().unwrap_or_default()
        ));
    }
    if r.clipped_values > 0 {
        s.push_str(&format!(
            "\n  WARNING: {} upload values exceeded --value-clip and were clipped",
            r.clipped_values
        ));
    }
    s
}

fn fingerprint(
    args: &FederateArgs,
    plan: &Plan,
    task: &str,
    model: &str,
    privacy: &Privacy,
) -> Fingerprint {
    Fingerprint {
        settings: serde_json::json!({
            "task": task, "model": model, "rule": plan.rule.name(), "clients": args.clients,
            "rounds": args.rounds, "local_epochs": args.local_epochs, "ranks": plan.ranks,
            "privacy": privacy.name(), "epsilon": args.epsilon, "delta": args.delta,
            "clip_norm": args.clip_norm, "value_clip": args.value_clip, "dropout": args.dropout,
            "seed": args.common.seed, "max_len": args.common.max_len, "rank": plan.lora.r,
            "alpha": plan.lora.alpha, "lora_dropout": plan.lora.dropout,
            "targets": plan.lora.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm, "batch_size": args.batch_size,
            "train_examples": args.train_examples, "eval_examples": args.eval_examples,
            "generate": args.generate, "max_new_tokens": args.max_new_tokens,
            "loss_on_prompt": args.loss_on_prompt,
        }),
    }
}
