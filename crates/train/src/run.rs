//! One client's local job, end to end: load a task and a model, optionally score the untrained
//! model, train the adapter, score it, return figures. The CLI and federated clients call this.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use crate::data::{gsm_task, jsonl_task, spam_task, Dataset, Encoded};
use crate::eval::{classify, generative, EvalReport};
use crate::lora::LoraConfig;
use crate::model::{LoadedModel, ModelSpec};
use crate::trainer::{train, TrainConfig, TrainReport};
use crate::{Result, TrainError};

/// A task: built-in or a user file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskSpec {
    /// SpamAssassin classification.
    Spam,
    /// GSM-Symbolic math (generation).
    Gsm,
    /// A JSONL file.
    Jsonl(PathBuf),
}

impl TaskSpec {
    /// `spam`, `gsm`, or a path to a `.jsonl` file.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "spam" => Ok(TaskSpec::Spam),
            "gsm" | "gsm8k" | "math" => Ok(TaskSpec::Gsm),
            p if p.ends_with(".jsonl") || std::path::Path::new(p).is_file() => {
                Ok(TaskSpec::Jsonl(PathBuf::from(p)))
            }
            other => Err(TrainError::invalid(format!(
                "unknown task `{other}`: use spam, gsm or a .jsonl file"
            ))),
        }
    }

    /// Loads the examples.
    pub fn load(&self, seed: u64) -> Result<Dataset> {
        match self {
            TaskSpec::Spam => spam_task(seed),
            TaskSpec::Gsm => gsm_task(seed),
            TaskSpec::Jsonl(p) => {
                if !p.exists() {
                    return Err(TrainError::invalid(format!(
                        "task file {} does not exist",
                        p.display()
                    )));
                }
                jsonl_task(p, seed)
            }
        }
    }

    /// The model a task uses when none is given.
    pub fn default_model(&self, data: &Dataset) -> ModelSpec {
        if data.is_classification() {
            ModelSpec::MiniLm
        } else {
            ModelSpec::SmolLm2
        }
    }
}

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalConfig {
    /// Examples per forward pass.
    pub batch_size: usize,
    /// Generation tasks: how many held-out examples get a greedy answer for exact match.
    pub generate: usize,
    /// Generation length limit.
    pub max_new_tokens: usize,
    /// Progress bars on stderr.
    pub progress: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            batch_size: 16,
            generate: 20,
            max_new_tokens: 200,
            progress: false,
        }
    }
}

/// Scores a model on encoded held-out examples.
pub fn evaluate(
    model: &LoadedModel,
    data: &Dataset,
    test: &[Encoded],
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    if test.is_empty() {
        return Err(TrainError::invalid("no held-out examples to evaluate"));
    }
    if model.is_classifier() {
        classify(model, test, cfg.batch_size, cfg.progress)
    } else {
        generative(
            model,
            test,
            &data.test,
            cfg.batch_size,
            cfg.generate,
            cfg.max_new_tokens,
            cfg.progress,
        )
    }
}

/// Everything a client run needs.
#[derive(Debug, Clone)]
pub struct ClientJob {
    /// Task.
    pub task: TaskSpec,
    /// Model; `None` picks the task's default.
    pub model: Option<ModelSpec>,
    /// Adapter settings.
    pub lora: LoraConfig,
    /// Optimisation settings (its seed also drives the data split and the adapter init).
    pub train: TrainConfig,
    /// Token limit per example.
    pub max_len: usize,
    /// Use at most this many training examples.
    pub train_examples: Option<usize>,
    /// Use at most this many held-out examples.
    pub eval_examples: Option<usize>,
    /// Evaluation settings.
    pub eval: EvalConfig,
    /// Also score the untrained model first (the baseline).
    pub eval_before: bool,
    /// Generation tasks: train on every token, prompt included (default: completion only).
    pub loss_on_prompt: bool,
}

/// What a client run did.
#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    /// Task name.
    pub task: String,
    /// Model name.
    pub model: String,
    /// Training examples available.
    pub examples: usize,
    /// Held-out examples scored.
    pub eval_examples: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Training throughput, positions (padding included) per second.
    pub tokens_per_second: f64,
    /// Mean loss of the last steps.
    pub final_loss: f64,
    /// Held-out accuracy after training (classification).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Held-out exact match after training (generation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Held-out figures before training, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<EvalReport>,
    /// Held-out figures after training.
    pub after: EvalReport,
    /// Training details.
    pub train: TrainSummary,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// CPU threads used.
    pub threads: usize,
    /// Wall time of the whole job, seconds.
    pub total_seconds: f64,
}

/// [`TrainReport`] without the per-step losses.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Positions processed (padding included).
    pub tokens: usize,
    /// Real tokens processed.
    pub real_tokens: usize,
    /// Training wall time, seconds.
    pub seconds: f64,
    /// First step's loss.
    pub first_loss: f64,
    /// Batch size.
    pub batch_size: usize,
    /// Token limit per example.
    pub max_len: usize,
}

/// Loads the task and model (with fresh adapters) for a job.
pub fn prepare(job: &ClientJob, device: &Device) -> Result<(Dataset, LoadedModel)> {
    let mut data = job.task.load(job.train.seed)?;
    data.truncate(job.train_examples, job.eval_examples);
    let spec = job
        .model
        .clone()
        .unwrap_or_else(|| job.task.default_model(&data));
    let mut model = LoadedModel::load(&spec, data.labels.len().max(2), job.train.seed, device)?;
    model.check_task(&data)?;
    model.attach_lora(&job.lora, job.train.seed)?;
    Ok((data, model))
}

/// Runs a client job and returns the trained model and the report.
pub fn run_client(
    job: &ClientJob,
    threads: usize,
    device: &Device,
) -> Result<(LoadedModel, ClientReport)> {
    let start = Instant::now();
    let (data, model) = prepare(job, device)?;
    let train_set = model.encode_with(&data.train, job.max_len, !job.loss_on_prompt)?;
    let test_set = model.encode(&data.test, job.max_len)?;
    let before = if job.eval_before {
        Some(evaluate(&model, &data, &test_set, &job.eval)?)
    } else {
        None
    };
    let rep: TrainReport = train(&model, &train_set, &job.train)?;
    let after = evaluate(&model, &data, &test_set, &job.eval)?;
    let trainable_params = model.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    let report = ClientReport {
        task: data.name.clone(),
        model: model.name.clone(),
        examples: train_set.len(),
        eval_examples: test_set.len(),
        steps: rep.steps,
        tokens_per_second: rep.tokens_per_second,
        final_loss: rep.final_loss,
        accuracy: after.accuracy,
        exact_match: after.exact_match,
        before,
        after,
        train: TrainSummary {
            tokens: rep.tokens,
            real_tokens: rep.real_tokens,
            seconds: rep.seconds,
            first_loss: rep.first_loss,
            batch_size: job.train.batch_size,
            max_len: job.max_len,
        },
        trainable_params,
        threads,
        total_seconds: start.elapsed().as_secs_f64(),
    };
    Ok((model, report))
}
