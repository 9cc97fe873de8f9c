//! `fedlora train`, `fedlora eval`, `fedlora generate`: one client's local LoRA fine-tuning,
//! held-out evaluation and greedy generation (crate `fedlora-train`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use fedlora_train::adapter::{load_adapter, save_adapter};
use fedlora_train::model::{LoadedModel, ModelSpec};
use fedlora_train::run::{evaluate, run_client, ClientJob, EvalConfig, TaskSpec};
use fedlora_train::threads::configure_threads;
use fedlora_train::{LoraConfig, TrainConfig};

use crate::exit;
use crate::output::emit;
use crate::ranges;

/// Model and runtime options shared by the three commands.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Model: `smollm2` (SmolLM2-135M-Instruct GGUF), `minilm` (all-MiniLM-L6-v2), a `.gguf` file or a
    /// Hugging Face directory (config.json, *.safetensors, tokenizer.json). Default: minilm for
    /// classification tasks, smollm2 for generation tasks.
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// CPU threads for candle (default: 1 on machines with up to 4 cores, where more threads are
    /// slower; half the cores above that). RAYON_NUM_THREADS is honoured when this is absent.
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Device: cpu, or cuda (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Seed for the data split, adapter initialisation, shuffling and dropout.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Token limit per example (longer inputs are truncated).
    #[arg(long)]
    pub(crate) max_len: Option<usize>,
}

impl CommonArgs {
    /// Checks `--threads` and `--max-len`, configures candle's CPU threads and opens `--device`.
    pub(crate) fn threads_and_device(&self) -> anyhow::Result<(usize, candle_device::Device)> {
        ranges::threads(self.threads)?;
        ranges::max_len(self.max_len)?;
        let threads = configure_threads(self.threads);
        Ok((threads, device(&self.device)?))
    }

    /// `--max-len`, or the task's default.
    pub(crate) fn max_len_for(&self, task: &TaskSpec) -> usize {
        self.max_len.unwrap_or_else(|| default_max_len(task))
    }
}

fn device(name: &str) -> anyhow::Result<candle_device::Device> {
    match name {
        "cpu" => Ok(candle_device::Device::Cpu),
        "cuda" => candle_device::Device::new_cuda(0)
            .context("opening CUDA device 0 (build with --features cuda)"),
        other => Err(exit::refuse(format!(
            "unknown --device `{other}` (cpu or cuda)"
        ))),
    }
}

// The device type, re-exported by fedlora-train so the CLI needs no direct candle dependency.
use fedlora_train::candle_device;

/// Arguments of `fedlora train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Task: `spam` (SpamAssassin classification), `gsm` (GSM-Symbolic math) or a .jsonl file
    /// (`{"text","label"}` or `{"prompt","completion"}` per line).
    #[arg(long)]
    task: String,
    #[command(flatten)]
    common: CommonArgs,
    /// Where to write the adapter (PEFT format: adapter_model.safetensors + adapter_config.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Warmup steps (default: 10% of the steps).
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Gradient clipping by global norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.05)]
    dropout: f32,
    /// LoRA target projections, comma-separated: q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,v")]
    targets: String,
    /// Use at most this many training examples.
    #[arg(long)]
    train_examples: Option<usize>,
    /// Use at most this many held-out examples.
    #[arg(long)]
    eval_examples: Option<usize>,
    /// Generation tasks: how many held-out questions to answer greedily for exact match.
    #[arg(long, default_value_t = 20)]
    generate: usize,
    /// Generation tasks: token limit of each generated answer.
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// Also evaluate the untrained model first and report it as `before`.
    #[arg(long)]
    baseline: bool,
    /// Pad every batch to --max-len (fixed shapes, for benchmarks).
    #[arg(long)]
    pad_to_max_len: bool,
    /// Generation tasks: put the loss on every token, prompt included (default: the completion).
    #[arg(long)]
    loss_on_prompt: bool,
}

fn default_max_len(task: &TaskSpec) -> usize {
    match task {
        TaskSpec::Gsm => 320,
        _ => 128,
    }
}

/// Checks every flag of `fedlora train` that needs no data, and `--out`, before anything runs.
fn check_train_args(args: &TrainArgs) -> anyhow::Result<()> {
    ranges::int("--steps", args.steps as u64, 1, 10_000_000)?;
    ranges::batch("--batch-size", args.batch_size)?;
    ranges::lr("--lr", args.lr)?;
    ranges::rank("--rank", args.rank)?;
    ranges::fraction("--dropout", f64::from(args.dropout))?;
    if let Some(w) = args.warmup {
        ranges::int("--warmup", w as u64, 0, args.steps as u64)?;
    }
    if let Some(out) = &args.out {
        ranges::out_dir("--out", out)?;
    }
    Ok(())
}

/// Held-out loss after training above this multiple of the starting loss (plus one) is taken as
/// divergence: the adapter is not saved.
const DIVERGED_RATIO: f64 = 4.0;

/// The losses a finished run is judged by.
#[derive(Debug, Clone, Copy)]
struct Losses {
    /// Held-out loss before training (`--baseline`), else the first step's training loss.
    start: f64,
    /// Held-out loss after training.
    end: f64,
    /// The last step's training loss.
    last_step: f64,
}

impl Losses {
    fn of(report: &fedlora_train::run::ClientReport) -> Self {
        Losses {
            start: report
                .before
                .as_ref()
                .map_or(report.train.first_loss, |b| b.loss),
            end: report.after.loss,
            last_step: report.final_loss,
        }
    }
}

/// Refuses the result of a run that diverged: a non-finite loss or adapter value, or a held-out
/// loss that grew far beyond where it started.
fn check_converged(l: Losses, adapter: &[f32], lr: f64) -> anyhow::Result<()> {
    let bad_values = adapter.iter().filter(|v| !v.is_finite()).count();
    if bad_values > 0 || !l.end.is_finite() || !l.last_step.is_finite() {
        anyhow::bail!(
            "training diverged: {bad_values} of {} adapter values are not finite, held-out loss {}, last training loss {}; the adapter was not saved: lower --lr (now {lr})",
            adapter.len(),
            l.end,
            l.last_step
        );
    }
    if l.end > DIVERGED_RATIO * l.start.max(0.0) + 1.0 {
        anyhow::bail!(
            "training diverged: held-out loss rose from {:.4} to {:.4} (last training loss {:.4}); the adapter was not saved: lower --lr (now {lr})",
            l.start,
            l.end,
            l.last_step
        );
    }
    Ok(())
}

/// Runs `fedlora train`.
pub fn run_train(args: TrainArgs, json: bool) -> anyhow::Result<()> {
    check_train_args(&args)?;
    let (threads, dev) = args.common.threads_and_device()?;
    let task = TaskSpec::parse(&args.task).map_err(exit::refused)?;
    let max_len = args.common.max_len_for(&task);
    let lora = LoraConfig {
        r: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        targets: LoraConfig::parse_targets(&args.targets).map_err(exit::refused)?,
    };
    lora.validate().map_err(exit::refused)?;
    let train = TrainConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup_steps: args.warmup.unwrap_or(args.steps / 10),
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        seed: args.common.seed,
        pad_to: args.pad_to_max_len.then_some(max_len),
        progress: true,
    };
    train.validate().map_err(exit::refused)?;
    let job = ClientJob {
        task,
        model: args.common.model.as_deref().map(ModelSpec::parse),
        lora: lora.clone(),
        train,
        max_len,
        train_examples: args.train_examples,
        eval_examples: args.eval_examples,
        eval: EvalConfig {
            batch_size: args.batch_size,
            generate: args.generate,
            max_new_tokens: args.max_new_tokens,
            progress: true,
        },
        eval_before: args.baseline,
        loss_on_prompt: args.loss_on_prompt,
    };
    let (model, report) = run_client(&job, threads, &dev)?;
    let values = fedlora_train::adapter::flatten(&fedlora_train::adapter::adapter_tensors(&model))?;
    check_converged(Losses::of(&report), &values, args.lr)?;
    if let Some(out) = &args.out {
        save_adapter(&model, &lora, out)
            .with_context(|| format!("saving the adapter to {}", out.display()))?;
    }
    let mut value = serde_json::to_value(&report)?;
    if let Some(out) = &args.out {
        value["adapter"] = serde_json::Value::from(out.display().to_string());
    }
    emit(
        json,
        || {
            let metric = match (report.accuracy, report.exact_match) {
                (Some(a), _) => format!("accuracy {:.3}", a),
                (_, Some(e)) => format!(
                    "exact match {:.3} ({} answers generated)",
                    e,
                    report.after.generated.unwrap_or(0)
                ),
                _ => String::new(),
            };
            let before = report.before.as_ref().map_or(String::new(), |b| {
                match (b.accuracy, b.exact_match) {
                    (Some(a), _) => format!(" (untrained: {a:.3})"),
                    (_, Some(e)) => format!(" (untrained: {e:.3})"),
                    _ => String::new(),
                }
            });
            format!(
                "{} on {}: {} steps over {} examples, loss {:.4} -> {:.4}, {:.0} tokens/s ({} thread(s)); held-out {}{}{}",
                report.model,
                report.task,
                report.steps,
                report.examples,
                report.train.first_loss,
                report.final_loss,
                report.tokens_per_second,
                report.threads,
                metric,
                before,
                args.out.as_ref().map_or(String::new(), |o| format!("; adapter saved to {}", o.display()))
            )
        },
        &value,
    )
}

/// Arguments of `fedlora eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Task: `spam`, `gsm` or a .jsonl file.
    #[arg(long)]
    task: String,
    #[command(flatten)]
    common: CommonArgs,
    /// Adapter directory written by `fedlora train --out` (or PEFT); without it the base model is
    /// scored (for classification, with an untrained head).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Use at most this many held-out examples.
    #[arg(long)]
    eval_examples: Option<usize>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Generation tasks: how many held-out questions to answer greedily for exact match.
    #[arg(long, default_value_t = 20)]
    generate: usize,
    /// Generation tasks: token limit of each generated answer.
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// Classification: write each held-out example with its label and the predicted label here
    /// (JSONL `{"text", "label", "prediction"}`), to check the adapter in another implementation.
    #[arg(long)]
    predictions: Option<PathBuf>,
}

/// Runs `fedlora eval`.
pub fn run_eval(args: EvalArgs, json: bool) -> anyhow::Result<()> {
    let start = Instant::now();
    ranges::batch("--batch-size", args.batch_size)?;
    if let Some(p) = &args.predictions {
        ranges::out_file("--predictions", p)?;
    }
    if let Some(a) = &args.adapter {
        if !a.is_dir() {
            return Err(exit::refuse(format!(
                "--adapter {}: not a directory (an adapter directory holds adapter_model.safetensors and adapter_config.json)",
                a.display()
            )));
        }
    }
    let (threads, dev) = args.common.threads_and_device()?;
    let task = TaskSpec::parse(&args.task).map_err(exit::refused)?;
    let max_len = args.common.max_len_for(&task);
    let mut data = task.load(args.common.seed)?;
    data.truncate(None, args.eval_examples);
    let spec = args
        .common
        .model
        .as_deref()
        .map(ModelSpec::parse)
        .unwrap_or_else(|| task.default_model(&data));
    let mut model = LoadedModel::load(&spec, data.labels.len().max(2), args.common.seed, &dev)?;
    model.check_task(&data)?;
    if let Some(a) = &args.adapter {
        load_adapter(&mut model, a)
            .with_context(|| format!("loading the adapter {}", a.display()))?;
        let values =
            fedlora_train::adapter::flatten(&fedlora_train::adapter::adapter_tensors(&model))?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            anyhow::bail!(
                "the adapter {} has {bad} non-finite values (NaN or infinite) of {}: it cannot be scored; it comes from a run that diverged",
                a.display(),
                values.len()
            );
        }
    }
    let test = model.encode(&data.test, max_len)?;
    let cfg = EvalConfig {
        batch_size: args.batch_size,
        generate: args.generate,
        max_new_tokens: args.max_new_tokens,
        progress: true,
    };
    if args.predictions.is_some() && !model.is_classifier() {
        anyhow::bail!("--predictions is for classification tasks");
    }
    let eval_start = Instant::now();
    let mut preds = Vec::new();
    let rep = if args.predictions.is_some() {
        fedlora_train::eval::classify_with_predictions(
            &model,
            &test,
            cfg.batch_size,
            cfg.progress,
            Some(&mut preds),
        )?
    } else {
        evaluate(&model, &data, &test, &cfg)?
    };
    let secs = eval_start.elapsed().as_secs_f64();
    if !rep.loss.is_finite() {
        anyhow::bail!(
            "held-out loss is {}: the model's weights are not finite; no score is reported",
            rep.loss
        );
    }
    if let Some(path) = &args.predictions {
        write_predictions(path, &data, &preds)?;
    }
    let tokens: usize = test.iter().map(|e| e.ids.len()).sum();
    let value = serde_json::json!({
        "task": data.name,
        "model": model.name,
        "adapter": args.adapter.as_ref().map(|a| a.display().to_string()),
        "examples": rep.examples,
        // Evaluation throughput: real tokens scored per second, generation included.
        "tokens_per_second": tokens as f64 / secs.max(1e-9),
        "loss": rep.loss,
        "accuracy": rep.accuracy,
        "exact_match": rep.exact_match,
        "generated": rep.generated,
        "threads": threads,
        "total_seconds": start.elapsed().as_secs_f64(),
    });
    emit(
        json,
        || {
            let metric = match (rep.accuracy, rep.exact_match) {
                (Some(a), _) => format!("accuracy {a:.3}"),
                (_, Some(e)) => format!(
                    "exact match {e:.3} over {} generated answers",
                    rep.generated.unwrap_or(0)
                ),
                _ => String::new(),
            };
            format!(
                "{} on {} ({} held-out examples): loss {:.4}, {metric}",
                model.name, data.name, rep.examples, rep.loss
            )
        },
        &value,
    )
}

/// Writes `{"text", "label", "prediction"}` per held-out example, atomically.
fn write_predictions(
    path: &std::path::Path,
    data: &fedlora_train::data::Dataset,
    preds: &[u32],
) -> anyhow::Result<()> {
    use fedlora_train::data::Example;
    let mut out = String::new();
    for (ex, p) in data.test.iter().zip(preds) {
        if let Example::Class { text, label } = ex {
            out.push_str(&serde_json::to_string(&serde_json::json!({
                "text": text, "label": label, "prediction": p,
            }))?);
            out.push('\n');
        }
    }
    crate::federate::store::write_atomic(path, out.as_bytes())
}

/// Arguments of `fedlora generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The question or instruction.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    common: CommonArgs,
    /// Adapter directory to merge into the base model first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Token limit of the answer.
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
}

/// Runs `fedlora generate`.
pub fn run_generate(args: GenerateArgs, json: bool) -> anyhow::Result<()> {
    ranges::int("--max-new-tokens", args.max_new_tokens as u64, 1, 1 << 16)?;
    let (threads, dev) = args.common.threads_and_device()?;
    let spec = args
        .common
        .model
        .as_deref()
        .map(ModelSpec::parse)
        .unwrap_or(ModelSpec::SmolLm2);
    let mut model = LoadedModel::load(&spec, 2, args.common.seed, &dev)?;
    if model.is_classifier() {
        anyhow::bail!("`generate` needs a causal LM (e.g. --model smollm2), not a BERT classifier");
    }
    if let Some(a) = &args.adapter {
        load_adapter(&mut model, a)
            .with_context(|| format!("loading the adapter {}", a.display()))?;
    }
    model.merge_lora()?;
    let start = Instant::now();
    let text = fedlora_train::generate::generate(&model, &args.prompt, args.max_new_tokens)?;
    let secs = start.elapsed().as_secs_f64();
    let value = serde_json::json!({
        "model": model.name,
        "adapter": args.adapter.as_ref().map(|a| a.display().to_string()),
        "prompt": args.prompt,
        "completion": text,
        "final_answer": fedlora_train::data::final_answer(&text),
        "seconds": secs,
        "threads": threads,
    });
    emit(json, || text.clone(), &value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diverged_run_is_refused_and_a_sound_one_kept() {
        let sound = Losses {
            start: 0.69,
            end: 0.31,
            last_step: 0.2,
        };
        assert!(check_converged(sound, &[0.1, -0.2], 1e-3).is_ok());
        // The issue's `--lr 1e30` run: a loss of 1e29.
        let blown = Losses {
            end: 1e29,
            last_step: 1e29,
            ..sound
        };
        let e = check_converged(blown, &[0.1], 1e-3).expect_err("diverged");
        assert!(e.to_string().contains("not saved"), "{e}");
        let nan = check_converged(sound, &[f32::NAN, 0.0], 1e-3).expect_err("nan");
        assert!(nan.to_string().contains("1 of 2 adapter values"), "{nan}");
        let inf = Losses {
            end: f64::INFINITY,
            ..sound
        };
        assert!(check_converged(inf, &[0.0], 1e-3).is_err());
    }
}
