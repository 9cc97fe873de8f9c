//! `fedlora layout`: writes the adapter layout a federation agrees on (model, LoRA rank and alpha,
//! the clients' ranks, every adapted projection's shape, the head), the file the server's
//! `[federation] layout` names. The server has no model of its own: this file is how it knows what
//! the adapter looks like.

use std::path::PathBuf;

use clap::Args;
use fedlora_train::candle_device::Device;
use fedlora_train::federated::adapter_layout;
use fedlora_train::model::{LoadedModel, ModelSpec};
use fedlora_train::run::TaskSpec;
use fedlora_train::LoraConfig;

use crate::exit;
use crate::output::emit;
use crate::ranges;

/// Arguments of `fedlora layout`.
#[derive(Debug, Args)]
pub struct LayoutArgs {
    /// Task the federation trains (spam, gsm or a .jsonl file): sets the classifier head's labels
    /// and the default model.
    #[arg(long)]
    pub task: String,
    /// Model (default: the task's).
    #[arg(long)]
    pub model: Option<String>,
    /// LoRA rank (the largest of --ranks when given).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Clients' ranks for zero-pad / rank-partitioned (e.g. 4,8,16).
    #[arg(long)]
    pub ranks: Option<String>,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// LoRA targets, comma-separated.
    #[arg(long, default_value = "q,v")]
    pub targets: String,
    /// Where to write the layout (JSON).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `fedlora layout`.
pub fn run(args: LayoutArgs, json: bool) -> anyhow::Result<()> {
    let ranks: Vec<usize> = match &args.ranks {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                exit::refuse(format!(
                    "--ranks `{list}` is not a comma-separated list of ranks"
                ))
            })?,
        None => vec![args.rank],
    };
    for &r in &ranks {
        ranges::rank(
            if args.ranks.is_some() {
                "each of --ranks"
            } else {
                "--rank"
            },
            r,
        )?;
    }
    let rank = ranks.iter().copied().max().unwrap_or(args.rank);
    let lora = LoraConfig {
        r: rank,
        alpha: args.alpha,
        dropout: 0.0,
        targets: LoraConfig::parse_targets(&args.targets).map_err(exit::refused)?,
    };
    lora.validate().map_err(exit::refused)?;
    ranges::out_file("--out", &args.out)?;
    let task = TaskSpec::parse(&args.task).map_err(exit::refused)?;
    let data = task.load(0).map_err(exit::refused)?;
    let spec = args
        .model
        .as_deref()
        .map(ModelSpec::parse)
        .unwrap_or_else(|| task.default_model(&data));
    let model = LoadedModel::load(&spec, data.labels.len().max(2), 0, &Device::Cpu)
        .map_err(exit::refused)?;
    model.check_task(&data).map_err(exit::refused)?;
    let layout = adapter_layout(&model, &lora, &ranks).map_err(exit::refused)?;
    super::store::write_atomic(&args.out, serde_json::to_string_pretty(&layout)?.as_bytes())?;
    let value = serde_json::json!({
        "layout": args.out.display().to_string(), "model": layout.model, "rank": layout.rank,
        "partitions": layout.partitions, "layers": layout.layers.len(),
        "factor_values": layout.factor_values(), "head_values": layout.head_values(),
    });
    emit(
        json,
        || {
            format!(
                "wrote {}: {} with {} adapted projections at rank {} ({} factor values, {} head values)",
                args.out.display(),
                layout.model,
                layout.layers.len(),
                layout.rank,
                layout.factor_values(),
                layout.head_values()
            )
        },
        &value,
    )
}
