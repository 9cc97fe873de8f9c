//! A networked client's trainer: fedlora-train behind the service's
//! [`fedlora_service::federated::Contributor`], built from the client's `[train]` section. It runs
//! the same client step as the in-process simulator (`fedlora_federation::step::client_step`) on the
//! same data share, so a networked run reproduces an in-process one.

use fedlora_aggregate::{AdapterLayout, ClientProfile, GlobalState, NamedTensors, Upload};
use fedlora_federation::step::{client_step, UploadPolicy};
use fedlora_federation::{EvalSplit, LocalTrainer};
use fedlora_service::federated::{Contributor, EvalContribution, TrainSection};
use fedlora_train::candle_device::Device;
use fedlora_train::data::Dataset;
use fedlora_train::federated::FederatedModel;
use fedlora_train::model::{LoadedModel, ModelSpec};
use fedlora_train::run::TaskSpec;
use fedlora_train::{LoraConfig, TrainConfig};

use super::trainer::{CandleTrainer, ClientData, LocalSettings};

/// The contributor.
#[derive(Debug)]
pub struct TrainContributor {
    section: TrainSection,
    lora: LoraConfig,
    data: Dataset,
    base: LoadedModel,
    max_len: usize,
    trainer: Option<(AdapterLayout, CandleTrainer)>,
    kept: Option<NamedTensors>,
}

impl TrainContributor {
    /// Loads the task's data and the base model of a `[train]` section: everything a round will
    /// need is checked here, before the client connects.
    pub fn new(section: &TrainSection) -> anyhow::Result<Self> {
        section.validate()?;
        fedlora_train::threads::configure_threads(section.threads);
        let task = TaskSpec::parse(&section.task)?;
        let mut data = task.load(section.seed)?;
        data.truncate(section.train_examples, section.eval_examples);
        if data.train.len() < section.shards {
            anyhow::bail!(
                "train: {} training examples cannot be dealt into {} shards",
                data.train.len(),
                section.shards
            );
        }
        let spec = section
            .model
            .as_deref()
            .map(ModelSpec::parse)
            .unwrap_or_else(|| task.default_model(&data));
        let base = LoadedModel::load(&spec, data.labels.len().max(2), section.seed, &Device::Cpu)?;
        base.check_task(&data)?;
        let lora = LoraConfig {
            r: section.rank,
            alpha: section.alpha,
            dropout: section.lora_dropout,
            targets: LoraConfig::parse_targets(&section.targets)?,
        };
        lora.validate()?;
        let max_len = section.max_len.unwrap_or(match task {
            TaskSpec::Gsm => 320,
            _ => 128,
        });
        Ok(TrainContributor {
            section: section.clone(),
            lora,
            data,
            base,
            max_len,
            trainer: None,
            kept: None,
        })
    }

    /// The adapter layout of this client's model and LoRA settings (what a demo's server is
    /// configured with).
    pub fn layout(&self) -> anyhow::Result<AdapterLayout> {
        Ok(fedlora_train::federated::adapter_layout(
            &self.base,
            &self.lora,
            &[self.lora.r],
        )?)
    }

    /// The trainer for `layout` (built once; the layout is checked against this client's model
    /// and LoRA settings).
    fn trainer_for(&mut self, layout: &AdapterLayout) -> Result<&mut CandleTrainer, String> {
        let fresh = self.trainer.as_ref().is_none_or(|(l, _)| l != layout);
        if fresh {
            let mine = fedlora_train::federated::adapter_layout(
                &self.base,
                &self.lora,
                &layout.partitions,
            )
            .map_err(|e| e.to_string())?;
            if mine.layers != layout.layers
                || mine.head != layout.head
                || mine.alpha != layout.alpha
            {
                return Err(format!(
                    "the federation's adapter layout (model {}, {} layers, alpha {}) does not fit this client's model {} with targets {} and alpha {}",
                    layout.model,
                    layout.layers.len(),
                    layout.alpha,
                    self.base.name,
                    self.section.targets,
                    self.lora.alpha
                ));
            }
            layout
                .check_client_rank(self.lora.r)
                .map_err(|e| e.to_string())?;
            let fm = FederatedModel::new(self.base.clone(), layout.clone(), self.lora.dropout)
                .map_err(|e| e.to_string())?;
            let s = &self.section;
            let data = ClientData::split(
                &self.data,
                &fm,
                s.shards,
                Some(s.shard),
                self.max_len,
                false,
                s.seed,
            )
            .map_err(|e| e.to_string())?;
            let settings = LocalSettings {
                train: TrainConfig {
                    steps: 1,
                    batch_size: s.batch_size,
                    lr: s.lr,
                    warmup_steps: 10,
                    seed: s.seed,
                    progress: false,
                    ..TrainConfig::default()
                },
                epochs: s.local_epochs,
                eval_batch: s.batch_size,
                generate: 20,
                max_new_tokens: 200,
                lora: self.lora.clone(),
                keep_client_adapters: None,
            };
            self.trainer = Some((
                layout.clone(),
                CandleTrainer::new(fm, data, settings, s.seed),
            ));
        }
        self.trainer
            .as_mut()
            .map(|(_, t)| t)
            .ok_or_else(|| "no trainer".to_string())
    }
}

impl Contributor for TrainContributor {
    fn contribute(&mut self, _round: u64, global: &GlobalState) -> Result<Upload, String> {
        let shard = self.section.shard;
        let rank = self.lora.r;
        let kept = self.kept.clone();
        let trainer = self.trainer_for(&global.layout)?;
        let profile = ClientProfile {
            rank,
            weight: trainer.examples(shard).clamp(1, u32::MAX as usize) as u32,
        };
        // The service clips for differential privacy and the quantizer counts range clipping.
        let policy = UploadPolicy {
            l2_clip: None,
            value_clip: f32::INFINITY,
        };
        let c = client_step(
            global.rule,
            global,
            trainer,
            shard,
            &profile,
            kept.as_ref(),
            policy,
        )
        .map_err(|e| e.to_string())?;
        if c.keep.is_some() {
            self.kept = c.keep.clone();
        }
        Ok(c.upload)
    }

    fn evaluate(&mut self, global: &GlobalState) -> Result<EvalContribution, String> {
        let shard = self.section.shard;
        let rank = if global.rule.has_global_model() {
            global.layout.rank
        } else {
            self.lora.r
        };
        let kept = self.kept.clone();
        let trainer = self.trainer_for(&global.layout)?;
        let profile = ClientProfile { rank, weight: 1 };
        let local = if global.rule.has_global_model() {
            None
        } else {
            kept.as_ref()
        };
        let start = global
            .rule
            .rule()
            .start(global, &profile, local)
            .map_err(|e| e.to_string())?;
        let examples = trainer.eval_examples(shard);
        if examples == 0 {
            return Err("this client has no held-out examples to score".into());
        }
        let s = trainer
            .evaluate(EvalSplit::Client(shard), &start)
            .map_err(|e| e.0)?;
        Ok(EvalContribution {
            metric: s.metric,
            loss: s.loss,
            examples: s.examples,
        })
    }
}
