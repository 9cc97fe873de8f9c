//! The flags of `fedlora federate`, and their validation (before anything is loaded or written).

use std::path::PathBuf;

use clap::Args;
use fedlora_aggregate::RuleKind;
use fedlora_train::LoraConfig;

use crate::ranges;
use crate::train_cmd::CommonArgs;

/// Arguments of `fedlora federate`.
#[derive(Debug, Args)]
pub struct FederateArgs {
    /// Task: `spam` (SpamAssassin classification), `gsm` (GSM-Symbolic math) or a .jsonl file.
    #[arg(long)]
    pub task: String,
    /// Clients; each gets a disjoint, equal (±1), random (IID) share of the training data.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Federated rounds.
    #[arg(long, default_value_t = 1)]
    pub rounds: u64,
    /// Aggregation rule: fedavg, frozen-a, exact, share-a, zero-pad, rank-partitioned, alternate.
    #[arg(long, default_value = "fedavg")]
    pub rule: String,
    /// Passes over its own data each client makes per round (total compute is the same for every
    /// number of clients).
    #[arg(long, default_value_t = 1.0)]
    pub local_epochs: f64,
    /// Clients' LoRA ranks for zero-pad and rank-partitioned, dealt round-robin (e.g. 4,8,16).
    #[arg(long)]
    pub ranks: Option<String>,
    /// How uploads are summed: none (plain sums, the reference), secagg (SecAgg+: masks,
    /// quantization, dropouts) or dp (SecAgg+ with distributed differential privacy).
    #[arg(long, default_value = "secagg")]
    pub privacy: String,
    /// dp: the epsilon spent over all rounds.
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// dp: delta (default: 1 / training examples).
    #[arg(long)]
    pub delta: Option<f64>,
    /// dp: L2 norm each client's update is clipped to.
    #[arg(long, default_value_t = 1.0)]
    pub clip_norm: f64,
    /// Secure aggregation's per-value range [-v, v]: larger values are clipped (and counted).
    #[arg(long, default_value_t = 4.0)]
    pub value_clip: f32,
    /// Probability that a client drops out of a round, at a random protocol stage.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Where the records, the checkpoint and the global adapter go; an interrupted run in it
    /// continues from its last finished round.
    #[arg(long, default_value = "federated")]
    pub out: PathBuf,
    /// Discard a previous run in --out instead of continuing it.
    #[arg(long)]
    pub restart: bool,
    /// Research only: also write every client's adapter (PEFT format) to DIR/clients/<index>/.
    /// This writes the raw adapters that secure aggregation exists to hide.
    #[arg(long)]
    pub keep_client_adapters: bool,
    #[command(flatten)]
    pub common: CommonArgs,
    /// LoRA rank r (the largest of --ranks when they are given).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (updates are scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// LoRA target projections, comma-separated: q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,v")]
    pub targets: String,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Warmup steps of each client's local schedule (capped at a tenth of its steps).
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Gradient clipping by global norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Examples per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Use at most this many training examples (split among the clients).
    #[arg(long)]
    pub train_examples: Option<usize>,
    /// Use at most this many held-out examples.
    #[arg(long)]
    pub eval_examples: Option<usize>,
    /// Generation tasks: held-out questions answered greedily for exact match.
    #[arg(long, default_value_t = 20)]
    pub generate: usize,
    /// Generation tasks: token limit of each answer.
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Generation tasks: loss on every token, prompt included.
    #[arg(long)]
    pub loss_on_prompt: bool,
}

/// Privacy as the flags give it (the DP delta may still depend on the data).
#[derive(Debug, Clone, PartialEq)]
pub enum PrivacyChoice {
    /// Plain sums.
    None,
    /// SecAgg+.
    SecAgg,
    /// SecAgg+ and distributed DP.
    Dp {
        /// Target epsilon over the run.
        epsilon: f64,
        /// delta, if given.
        delta: Option<f64>,
        /// L2 clip.
        clip_norm: f64,
    },
}

/// The validated, parsed flags.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The rule.
    pub rule: RuleKind,
    /// LoRA settings (`r` is the global rank).
    pub lora: LoraConfig,
    /// Each client's rank.
    pub ranks: Vec<usize>,
    /// The federation's distinct ranks, ascending.
    pub partitions: Vec<usize>,
    /// Privacy.
    pub privacy: PrivacyChoice,
}

fn bad(msg: String) -> anyhow::Error {
    anyhow::anyhow!(msg)
}

impl FederateArgs {
    /// Checks every flag that needs no data, before anything is loaded or written.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let rule: RuleKind = self.rule.parse()?;
        ranges::int("--clients", self.clients as u64, 1, 100_000)?;
        ranges::rounds("--rounds", self.rounds)?;
        ranges::epochs("--local-epochs", self.local_epochs)?;
        ranges::fraction("--dropout", self.dropout)?;
        ranges::lr("--lr", self.lr)?;
        if !(self.value_clip.is_finite() && self.value_clip > 0.0 && self.value_clip <= 1e6) {
            return Err(bad(format!(
                "--value-clip must be in (0, 1e6], got {}",
                self.value_clip
            )));
        }
        ranges::batch("--batch-size", self.batch_size)?;
        ranges::rank("--rank", self.rank)?;
        let targets = LoraConfig::parse_targets(&self.targets)?;
        let (ranks, partitions) = match (&self.ranks, rule.uses_ranks()) {
            (Some(_), false) => {
                return Err(bad(format!(
                    "--ranks is for zero-pad and rank-partitioned; rule {rule} trains every client at --rank"
                )))
            }
            (None, true) => {
                return Err(bad(format!(
                    "rule {rule} needs --ranks (the clients' ranks, e.g. 4,8,16)"
                )))
            }
            (None, false) => (vec![self.rank; self.clients], vec![self.rank]),
            (Some(list), true) => {
                let given: Vec<usize> = list
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad(format!("--ranks `{list}` is not a comma-separated list of ranks")))?;
                for &r in &given {
                    ranges::rank("each of --ranks", r)?;
                }
                let mut parts = given.clone();
                parts.sort_unstable();
                parts.dedup();
                let per_client = (0..self.clients).map(|i| given[i % given.len()]).collect();
                (per_client, parts)
            }
        };
        let global_rank = *partitions.last().unwrap_or(&self.rank);
        let lora = LoraConfig {
            r: global_rank,
            alpha: self.alpha,
            dropout: self.lora_dropout,
            targets,
        };
        lora.validate()?;
        let privacy = match self.privacy.as_str() {
            "none" => PrivacyChoice::None,
            "secagg" => PrivacyChoice::SecAgg,
            "dp" => {
                let epsilon = self
                    .epsilon
                    .ok_or_else(|| bad("--privacy dp needs --epsilon".into()))?;
                if !(epsilon.is_finite() && epsilon > 0.0) {
                    return Err(bad(format!(
                        "--epsilon must be a positive number, got {epsilon}"
                    )));
                }
                if let Some(d) = self.delta {
                    if !(d > 0.0 && d < 1.0) {
                        return Err(bad(format!("--delta must be in (0, 1), got {d}")));
                    }
                }
                if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
                    return Err(bad(format!(
                        "--clip-norm must be a positive number, got {}",
                        self.clip_norm
                    )));
                }
                PrivacyChoice::Dp {
                    epsilon,
                    delta: self.delta,
                    clip_norm: self.clip_norm,
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown --privacy `{other}` (use none, secagg or dp)"
                )))
            }
        };
        if !matches!(privacy, PrivacyChoice::Dp { .. })
            && (self.epsilon.is_some() || self.delta.is_some())
        {
            return Err(bad("--epsilon and --delta are for --privacy dp".into()));
        }
        if privacy != PrivacyChoice::None && self.clients < 2 {
            return Err(bad(
                "secure aggregation needs at least 2 clients (use --privacy none for one)".into(),
            ));
        }
        ranges::out_dir("--out", &self.out)?;
        Ok(Plan {
            rule,
            lora,
            ranks,
            partitions,
            privacy,
        })
    }
}
