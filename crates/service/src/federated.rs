//! Federated fine-tuning over the service: the server's `[federation]` section, the global state it
//! keeps between rounds (written as a PEFT adapter after every round), the plans of its training
//! and evaluation rounds, and the [`Contributor`] trait through which a client trains.
//!
//! The service never sees candle: training comes in through [`Contributor`], which the CLI
//! implements with fedlora-train. The round logic is `fedlora-federation`'s, the same the
//! in-process simulator runs (`server_step` here, `client_step` inside the contributor).
//!
//! A training round `r` (protocol-spec §9): the server sends every participant the global state
//! `G_r` (a [`crate::framing::Kind::GlobalState`] frame), then the round start naming its SHA-256;
//! each client trains from `G_r` while the setup, key and share stages run, and provides its update
//! when its masked input is due (the masked-input stage has the long `train_timeout_ms`
//! deadline). The revealed weighted mean gives `G_{r+1}`, which is stored, exported and sent. An
//! evaluation round follows: each client scores `G_{r+1}` on its own held-out data and the secure
//! sum of `(metric, loss)`, weighted by held-out examples, is all the server learns.

use std::path::{Path, PathBuf};

use fedlora_aggregate::{
    manifest_values, AdapterLayout, GlobalState, RuleKind, Upload, PARTITION_WEIGHTS,
};
use fedlora_secagg::wire::TensorSpec;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

fn default_value_clip() -> f32 {
    4.0
}
fn default_weight_bound() -> u32 {
    100_000
}
fn default_train_timeout_ms() -> u64 {
    3_600_000
}
fn default_true() -> bool {
    true
}

/// The server's `[federation]` section: with it, rounds fine-tune an adapter instead of summing
/// raw vectors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    /// Aggregation rule: fedavg, frozen-a, exact, share-a, zero-pad, rank-partitioned, alternate.
    pub rule: String,
    /// JSON file with the adapter layout (`fedlora layout --out FILE`): the model, LoRA rank,
    /// alpha, the clients' ranks and every adapted projection's shape.
    pub layout: PathBuf,
    /// Public seed of the initial adapter (A drawn from it, B = 0).
    #[serde(default)]
    pub seed: u64,
    /// Secure aggregation's per-value range: update values beyond ±value_clip are clipped (and
    /// clients warn). LoRA updates are small; zero-pad uploads whole factors (≈ N(0, 1/r)).
    #[serde(default = "default_value_clip")]
    pub value_clip: f32,
    /// Largest client weight (its number of training examples); bigger weights are capped.
    #[serde(default = "default_weight_bound")]
    pub weight_bound: u32,
    /// After every training round, a secure sum of the clients' held-out scores of the new global
    /// adapter (the server learns only the example-weighted mean).
    #[serde(default = "default_true")]
    pub evaluate: bool,
    /// Deadline of the masked-input stage of a training round, which covers local training.
    #[serde(default = "default_train_timeout_ms")]
    pub train_timeout_ms: u64,
}

impl FederationSection {
    /// Resolves `layout` against the config file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        self.layout = base.join(&self.layout);
    }

    /// Checks the section and reads the layout (no side effect).
    pub fn validate(&self) -> Result<(RuleKind, AdapterLayout), ConfigError> {
        let rule: RuleKind = self
            .rule
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("federation.rule: {e}")))?;
        if !(self.value_clip.is_finite() && self.value_clip > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "federation.value_clip must be a positive number, got {}",
                self.value_clip
            )));
        }
        if self.weight_bound == 0 {
            return Err(ConfigError::Invalid(
                "federation.weight_bound must be at least 1".into(),
            ));
        }
        crate::ranges::timeout_ms("federation.train_timeout_ms", self.train_timeout_ms)
            .map_err(ConfigError::Invalid)?;
        let layout = read_layout(&self.layout)?;
        if !rule.uses_ranks() && layout.partitions.len() > 1 {
            return Err(ConfigError::Invalid(format!(
                "federation.layout {} has clients of ranks {:?}, which rule {rule} ignores (use zero-pad or rank-partitioned)",
                self.layout.display(),
                layout.partitions
            )));
        }
        Ok((rule, layout))
    }
}

/// Reads an adapter layout file.
pub fn read_layout(path: &Path) -> Result<AdapterLayout, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let layout: AdapterLayout = serde_json::from_str(&text).map_err(|e| {
        ConfigError::Invalid(format!("{}: not an adapter layout: {e}", path.display()))
    })?;
    layout
        .validate()
        .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(layout)
}

fn default_shards() -> usize {
    1
}
fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> String {
    "q,v".into()
}
fn default_lora_dropout() -> f32 {
    0.05
}
fn default_epochs() -> f64 {
    1.0
}
fn default_lr() -> f64 {
    1e-3
}
fn default_batch() -> usize {
    16
}

/// A client's `[train]` section: what it trains each federated round on, and how. Plain data: the
/// service does not train; the command line builds the [`Contributor`] from it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// `spam`, `gsm`, or a JSONL file of this institution's examples (`{"text", "label"}` or
    /// `{"prompt", "completion"}` per line).
    pub task: String,
    /// Base model: `minilm`, `smollm2`, a `.gguf` file or a Hugging Face directory; default: the
    /// task's.
    #[serde(default)]
    pub model: Option<String>,
    /// This client's share of the task's training and held-out data (demos and reproductions of
    /// an in-process run: `shard` of `shards` IID shares); an institution with its own file keeps
    /// `shards = 1`.
    #[serde(default)]
    pub shard: usize,
    /// Number of shares the task's data is dealt into.
    #[serde(default = "default_shards")]
    pub shards: usize,
    /// LoRA rank of this client (one of the federation's ranks).
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// LoRA alpha (must match the federation's layout).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// LoRA targets, comma-separated (q,k,v,o,gate,up,down).
    #[serde(default = "default_targets")]
    pub targets: String,
    /// LoRA dropout.
    #[serde(default = "default_lora_dropout")]
    pub lora_dropout: f32,
    /// Passes over the local data per round.
    #[serde(default = "default_epochs")]
    pub local_epochs: f64,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Examples per step.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Token limit per example (default: 128, 320 for gsm).
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Use at most this many of the task's training examples (before sharding).
    #[serde(default)]
    pub train_examples: Option<usize>,
    /// Use at most this many held-out examples (before sharding).
    #[serde(default)]
    pub eval_examples: Option<usize>,
    /// Seed of the data split, shuffling and dropout.
    #[serde(default)]
    pub seed: u64,
    /// CPU threads for training (default: fedlora-train's choice).
    #[serde(default)]
    pub threads: Option<usize>,
}

impl TrainSection {
    /// Checks what needs no data.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("train.{m}")));
        if self.shards == 0 || self.shard >= self.shards {
            return bad(format!(
                "shard {} must be below shards {}",
                self.shard, self.shards
            ));
        }
        let r = |res: Result<(), String>| res.map_err(ConfigError::Invalid);
        r(crate::ranges::rank("train.rank", self.rank))?;
        r(crate::ranges::epochs(
            "train.local_epochs",
            self.local_epochs,
        ))?;
        r(crate::ranges::lr("train.lr", self.lr))?;
        r(crate::ranges::batch("train.batch_size", self.batch_size))?;
        if let Some(t) = self.threads {
            r(crate::ranges::threads("train.threads", t))?;
        }
        if let Some(m) = self.max_len {
            r(crate::ranges::max_len("train.max_len", m))?;
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        Ok(())
    }
}

/// What a round is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Sum raw vectors (no federation section).
    #[default]
    Vector,
    /// Train: clients upload their rule-encoded update of the global state named in the start.
    Train,
    /// Evaluate: clients upload `(metric, loss)` of the global state named in the start, weighted
    /// by their held-out examples.
    Eval,
}

impl Purpose {
    /// `vector`, `train` or `eval`.
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Vector => "vector",
            Purpose::Train => "train",
            Purpose::Eval => "eval",
        }
    }
}

/// Manifest name of an evaluation round's values.
pub const EVAL_TENSOR: &str = "fedlora.eval";
/// Per-value range of evaluation rounds: metrics are in [0, 1], losses well below this.
pub const EVAL_CLIP: f32 = 64.0;

/// A client's score of a global state, as it contributes it to an evaluation round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalContribution {
    /// Accuracy or exact match in [0, 1].
    pub metric: f64,
    /// Mean held-out loss.
    pub loss: f64,
    /// Held-out examples scored (the weight).
    pub examples: usize,
}

impl EvalContribution {
    /// The upload of an evaluation round (`[metric, loss]`, weight = examples, capped).
    pub fn upload(&self, weight_bound: u32) -> Upload {
        Upload {
            values: vec![self.metric as f32, (self.loss as f32).min(EVAL_CLIP)],
            weight: (self.examples as u64).clamp(1, u64::from(weight_bound)) as u32,
            public_tail: 0,
        }
    }
}

/// How a client trains and scores: implemented by the CLI with fedlora-train.
pub trait Contributor: Send {
    /// This client's update of `global` for training round `round` (0-based): start from the
    /// global state, train on local data, encode with the state's rule. Runs on a blocking
    /// thread; may take minutes.
    fn contribute(&mut self, round: u64, global: &GlobalState) -> Result<Upload, String>;

    /// This client's score of `global` on its own held-out data.
    fn evaluate(&mut self, global: &GlobalState) -> Result<EvalContribution, String>;
}

/// The server's side of a federated run.
#[derive(Debug)]
pub struct ServerFederation {
    section: FederationSection,
    /// The global state the next training round starts from.
    pub global: GlobalState,
    dir: PathBuf,
    /// Evaluations of the global state after each finished training round: (rounds folded in,
    /// metric, loss).
    pub scores: Vec<(u64, f64, f64)>,
}

/// File of the latest global state in the data directory's `global/`.
const STATE_FILE: &str = "state.fgs";

impl ServerFederation {
    /// Starts from the state saved in `data_dir/global/` by an earlier run of the same rule,
    /// layout and seed, else from the initial state.
    pub fn open(section: FederationSection, data_dir: &Path) -> Result<Self, ConfigError> {
        let (rule, layout) = section.validate()?;
        let dir = data_dir.join("global");
        let saved = dir.join(STATE_FILE);
        let initial = GlobalState::initial(layout, rule, section.seed)
            .map_err(|e| ConfigError::Invalid(format!("federation: {e}")))?;
        let global = if saved.exists() {
            let bytes = std::fs::read(&saved).map_err(|source| ConfigError::Io {
                path: saved.display().to_string(),
                source,
            })?;
            let s = GlobalState::decode(&bytes)
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", saved.display())))?;
            if s.rule != rule || s.layout != initial.layout || s.seed != section.seed {
                return Err(ConfigError::Invalid(format!(
                    "{} holds the global state of another federation (rule {}, seed {}); move it away to start a new one",
                    saved.display(),
                    s.rule,
                    s.seed
                )));
            }
            s
        } else {
            initial
        };
        Ok(ServerFederation {
            section,
            global,
            dir,
            scores: Vec::new(),
        })
    }

    /// The section.
    pub fn section(&self) -> &FederationSection {
        &self.section
    }

    /// Whether evaluation rounds run.
    pub fn evaluates(&self) -> bool {
        self.section.evaluate
    }

    /// The manifest of the next training round.
    pub fn train_manifest(&self) -> Result<Vec<TensorSpec>, String> {
        to_specs(&self.global.rule.rule().manifest(&self.global))
    }

    /// Values of the training round's upload that are public weights (no noise).
    pub fn public_tail(&self) -> usize {
        let m = self.global.rule.rule().manifest(&self.global);
        m.last()
            .filter(|s| s.name == PARTITION_WEIGHTS)
            .map_or(0, |s| s.len())
    }

    /// Values of the next training round's upload.
    pub fn train_values(&self) -> u64 {
        manifest_values(&self.global.rule.rule().manifest(&self.global)) as u64
    }

    /// The evaluation round's manifest.
    pub fn eval_manifest() -> Vec<TensorSpec> {
        vec![TensorSpec {
            name: EVAL_TENSOR.into(),
            shape: vec![2],
        }]
    }

    /// Implements the server's step: the next global state from the revealed mean, saved and
    /// exported (PEFT) atomically; returns its encoding (what clients are sent).
    pub fn finish_train(&mut self, mean: &[f32]) -> Result<Vec<u8>, String> {
        let next = fedlora_federation::step::server_step(self.global.rule, &self.global, mean)
            .map_err(|e| e.to_string())?;
        let bytes = next.encode();
        self.save(&next, &bytes)?;
        self.global = next;
        Ok(bytes)
    }

    /// An aborted training round: the adapter stays, the round count moves on.
    pub fn skip_round(&mut self) {
        self.global.round += 1;
    }

    /// Records an evaluation round's revealed mean `[metric, loss]`.
    pub fn finish_eval(&mut self, mean: &[f32]) -> Result<(f64, f64), String> {
        match mean {
            [m, l] if m.is_finite() && l.is_finite() => {
                let s = (f64::from(*m), f64::from(*l));
                self.scores.push((self.global.round, s.0, s.1));
                Ok(s)
            }
            _ => Err(format!(
                "evaluation sum has {} values, expected 2",
                mean.len()
            )),
        }
    }

    fn save(&self, state: &GlobalState, bytes: &[u8]) -> Result<(), String> {
        let io = |e: std::io::Error| {
            format!("writing the global state under {}: {e}", self.dir.display())
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let files = fedlora_aggregate::peft::export(state, 0.0).map_err(|e| e.to_string())?;
        let round_dir = self.dir.join(format!("round-{:06}", state.round));
        for d in [&round_dir, &self.dir.join("latest")] {
            std::fs::create_dir_all(d).map_err(io)?;
            crate::store::write_atomic(
                &d.join(fedlora_aggregate::peft::WEIGHTS_FILE),
                &files.weights,
            )
            .map_err(io)?;
            crate::store::write_atomic(
                &d.join(fedlora_aggregate::peft::CONFIG_FILE),
                files.config.as_bytes(),
            )
            .map_err(io)?;
            if let Some(m) = &files.merged_delta {
                crate::store::write_atomic(&d.join(fedlora_aggregate::peft::MERGED_DELTA_FILE), m)
                    .map_err(io)?;
            }
        }
        // The state file last: it is what a restarted server continues from.
        crate::store::write_atomic(&self.dir.join(STATE_FILE), bytes).map_err(io)
    }

    /// Where the adapters are written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The secagg manifest of an aggregation rule's upload.
pub fn to_specs(manifest: &[fedlora_aggregate::UploadSpec]) -> Result<Vec<TensorSpec>, String> {
    manifest
        .iter()
        .map(|m| {
            Ok(TensorSpec {
                name: m.name.clone(),
                shape: m
                    .shape
                    .iter()
                    .map(|&d| u32::try_from(d).map_err(|_| format!("{} is too large", m.name)))
                    .collect::<Result<_, String>>()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_aggregate::{HeadInit, HeadSpec, LayerSpec};

    fn section(dir: &Path, rule: &str, partitions: Vec<usize>) -> FederationSection {
        let layout = AdapterLayout {
            model: "m".into(),
            rank: *partitions.last().expect("p"),
            alpha: 4.0,
            partitions,
            layers: vec![LayerSpec {
                module: "m.layer.0.attention.self.query".into(),
                out: 6,
                inp: 6,
            }],
            head: vec![HeadSpec {
                name: "m.classifier.bias".into(),
                shape: vec![2],
                init: HeadInit::Zeros,
            }],
        };
        let path = dir.join("layout.json");
        std::fs::write(&path, serde_json::to_string(&layout).expect("json")).expect("write");
        FederationSection {
            rule: rule.into(),
            layout: path,
            seed: 5,
            value_clip: 4.0,
            weight_bound: 100,
            evaluate: true,
            train_timeout_ms: 1000,
        }
    }

    #[test]
    fn the_server_writes_each_state_as_peft_and_continues_from_it() {
        let dir = std::env::temp_dir().join(format!("fedlora-fed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut fed = ServerFederation::open(section(&dir, "exact", vec![2]), &dir).expect("open");
        let n = fed.train_values() as usize;
        let bytes = fed.finish_train(&vec![0.01; n]).expect("finish");
        assert_eq!(GlobalState::decode(&bytes).expect("decode").round, 1);
        for f in [
            "adapter_model.safetensors",
            "adapter_config.json",
            "merged_delta.safetensors",
        ] {
            assert!(dir.join("global/round-000001").join(f).exists(), "{f}");
            assert!(dir.join("global/latest").join(f).exists(), "{f}");
        }
        assert_eq!(fed.finish_eval(&[0.75, 0.5]).expect("eval"), (0.75, 0.5));
        assert!(fed.finish_eval(&[0.75]).is_err());
        // A restart continues from the saved state; another rule's state is refused.
        assert_eq!(
            ServerFederation::open(section(&dir, "exact", vec![2]), &dir)
                .expect("reopen")
                .global
                .round,
            1
        );
        let e = ServerFederation::open(section(&dir, "fedavg", vec![2]), &dir).expect_err("other");
        assert!(e.to_string().contains("another federation"), "{e}");
        // Ranks are only for the heterogeneous rules.
        let e = section(&dir, "fedavg", vec![1, 2])
            .validate()
            .expect_err("ranks");
        assert!(e.to_string().contains("ignores"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
