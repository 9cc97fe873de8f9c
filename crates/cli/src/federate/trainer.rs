//! The local trainer of the CLI: fedlora-train's candle models behind
//! [`fedlora_federation::LocalTrainer`], for N in-process clients sharing one loaded base model
//! (each client's data is its own IID shard of the task's training split) or for one networked
//! client.

use std::path::PathBuf;

use fedlora_aggregate::ClientStart;
use fedlora_federation::{EvalScore, EvalSplit, LocalTrainer, TrainedAdapter, TrainerError};
use fedlora_train::data::{Dataset, Encoded, Example};
use fedlora_train::eval::{classify, generative};
use fedlora_train::federated::{epochs_config, iid_shards, FederatedModel};
use fedlora_train::{trainer, LoraConfig, TrainConfig};

/// Local training settings shared by every client.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// Optimiser settings (`steps` is replaced by the epochs' step count per client).
    pub train: TrainConfig,
    /// Passes over the client's own data per round.
    pub epochs: f64,
    /// Examples per evaluation forward pass.
    pub eval_batch: usize,
    /// Generation tasks: greedy answers per evaluation (exact match).
    pub generate: usize,
    /// Generation tasks: answer length limit.
    pub max_new_tokens: usize,
    /// LoRA settings (for exported adapters).
    pub lora: LoraConfig,
    /// Write each client's trained adapter of the last round here (`<dir>/<index>/`).
    pub keep_client_adapters: Option<(PathBuf, u64)>,
}

/// Clients' data, encoded once.
#[derive(Debug)]
pub struct ClientData {
    /// Training examples of each client.
    pub train: Vec<Vec<Encoded>>,
    /// Held-out examples of each client (its share of the held-out split, for per-client scoring).
    pub test: Vec<(Vec<Encoded>, Vec<Example>)>,
    /// The whole held-out split.
    pub all_test: (Vec<Encoded>, Vec<Example>),
}

impl ClientData {
    /// Encodes `data` for `model` and deals it into `clients` IID shares with `seed`, or, with
    /// `only = Some(i)`, keeps only client `i`'s share (a networked client).
    pub fn split(
        data: &Dataset,
        fm: &FederatedModel,
        clients: usize,
        only: Option<usize>,
        max_len: usize,
        loss_on_prompt: bool,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let shards = iid_shards(data.train.len(), clients, seed)?;
        let test_shards = if data.test.len() >= clients {
            iid_shards(data.test.len(), clients, seed ^ 0x7e57)?
        } else {
            // Fewer held-out examples than clients: some clients score none.
            (0..clients)
                .map(|i| {
                    if i < data.test.len() {
                        vec![i]
                    } else {
                        Vec::new()
                    }
                })
                .collect()
        };
        let model = &fm.model;
        let mut train = Vec::with_capacity(clients);
        let mut test = Vec::with_capacity(clients);
        for (i, (tr, te)) in shards.iter().zip(&test_shards).enumerate() {
            if only.is_some_and(|o| o != i) {
                train.push(Vec::new());
                test.push((Vec::new(), Vec::new()));
                continue;
            }
            let ex: Vec<Example> = tr.iter().map(|&k| data.train[k].clone()).collect();
            train.push(model.encode_with(&ex, max_len, !loss_on_prompt)?);
            let tex: Vec<Example> = te.iter().map(|&k| data.test[k].clone()).collect();
            test.push((model.encode(&tex, max_len)?, tex));
        }
        let all_test = (model.encode(&data.test, max_len)?, data.test.clone());
        Ok(ClientData {
            train,
            test,
            all_test,
        })
    }
}

/// fedlora-train behind the round loop.
#[derive(Debug)]
pub struct CandleTrainer {
    /// The model (one for every in-process client).
    pub fm: FederatedModel,
    data: ClientData,
    settings: LocalSettings,
    classifier: bool,
    seed: u64,
}

impl CandleTrainer {
    /// A trainer over `data`.
    pub fn new(fm: FederatedModel, data: ClientData, settings: LocalSettings, seed: u64) -> Self {
        let classifier = fm.model.is_classifier();
        CandleTrainer {
            fm,
            data,
            settings,
            classifier,
            seed,
        }
    }

    fn err(e: impl std::fmt::Display) -> TrainerError {
        TrainerError(e.to_string())
    }
}

impl LocalTrainer for CandleTrainer {
    fn metric_name(&self) -> &'static str {
        if self.classifier {
            "accuracy"
        } else {
            "exact_match"
        }
    }

    fn examples(&self, client: usize) -> usize {
        self.data.train.get(client).map_or(0, Vec::len)
    }

    fn eval_examples(&self, client: usize) -> usize {
        self.data.test.get(client).map_or(0, |t| t.0.len())
    }

    fn train(
        &mut self,
        client: usize,
        round: u64,
        start: &ClientStart,
    ) -> Result<TrainedAdapter, TrainerError> {
        let examples = self
            .data
            .train
            .get(client)
            .ok_or_else(|| TrainerError(format!("no data for client {client}")))?;
        // Each client shuffles and drops out with its own stream, fresh every round.
        let seed = self
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add((client as u64) << 20 | round);
        let cfg = TrainConfig {
            seed,
            progress: false,
            ..epochs_config(&self.settings.train, examples.len(), self.settings.epochs)
                .map_err(Self::err)?
        };
        self.fm.load(start).map_err(Self::err)?;
        let report = trainer::train(&self.fm.model, examples, &cfg).map_err(Self::err)?;
        let tensors = self.fm.adapter().map_err(Self::err)?;
        if !tensors.all_finite() {
            return Err(TrainerError(format!(
                "the adapter has non-finite values after training (final loss {}); lower the learning rate",
                report.final_loss
            )));
        }
        if let Some((dir, last_round)) = &self.settings.keep_client_adapters {
            if round == *last_round {
                let out = dir.join(client.to_string());
                let lora = LoraConfig {
                    r: start.rank,
                    ..self.settings.lora.clone()
                };
                fedlora_train::adapter::save_adapter(&self.fm.model, &lora, &out)
                    .map_err(Self::err)?;
            }
        }
        Ok(TrainedAdapter {
            tensors,
            final_loss: report.final_loss,
            seconds: report.seconds,
            tokens: report.tokens,
        })
    }

    fn evaluate(
        &mut self,
        split: EvalSplit,
        start: &ClientStart,
    ) -> Result<EvalScore, TrainerError> {
        let (enc, raw) = match split {
            EvalSplit::All => (&self.data.all_test.0, &self.data.all_test.1),
            EvalSplit::Client(i) => {
                let t = self
                    .data
                    .test
                    .get(i)
                    .ok_or_else(|| TrainerError(format!("no held-out data for client {i}")))?;
                (&t.0, &t.1)
            }
        };
        if enc.is_empty() {
            return Err(TrainerError("no held-out examples to score".into()));
        }
        self.fm.load(start).map_err(Self::err)?;
        let s = &self.settings;
        let rep = if self.classifier {
            classify(&self.fm.model, enc, s.eval_batch, false)
        } else {
            generative(
                &self.fm.model,
                enc,
                raw,
                s.eval_batch,
                s.generate,
                s.max_new_tokens,
                false,
            )
        }
        .map_err(Self::err)?;
        if !rep.loss.is_finite() {
            return Err(TrainerError(format!(
                "held-out loss is {} (the model's weights are not finite)",
                rep.loss
            )));
        }
        Ok(EvalScore {
            examples: rep.examples,
            metric: rep.accuracy.or(rep.exact_match).unwrap_or(0.0),
            loss: rep.loss,
        })
    }
}
