//! The in-process driver: N clients in one process, trained one after another on one loaded
//! model, their uploads summed by the real SecAgg+ core (`fedlora-secagg`'s harness: real keys,
//! shares, masks, quantization and dropouts) or by plain sums (the reference).
//!
//! Memory stays bounded as N grows: clients are created without their input
//! ([`fedlora_secagg::Client::deferred`]) and each trains only when its masked vector is due, so
//! at most one harness batch of uploads is alive; only `share-a` keeps per-client state (its B and
//! head), which is what a real client would keep too.

use std::time::Instant;

use fedlora_aggregate::reference::WeightedSum;
use fedlora_aggregate::{
    manifest_values, AdapterLayout, ClientProfile, GlobalState, NamedTensors, RuleKind,
    PARTITION_WEIGHTS,
};
use fedlora_dp::{ClientNoise, ServerPrivacy};
use fedlora_secagg::harness::{Harness, Outcome};
use fedlora_secagg::{Client, ClientInput, RoundConfig, Stage, TensorSpec};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::privacy::{round_params, Privacy};
use crate::record::RoundRecord;
use crate::step::{client_step, server_step, Contribution, UploadPolicy};
use crate::trainer::{EvalScore, EvalSplit, LocalTrainer};
use crate::FederationError;

/// A run's settings.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// The aggregation rule.
    pub rule: RuleKind,
    /// Each client's LoRA rank (public); all equal unless the rule uses ranks.
    pub ranks: Vec<usize>,
    /// Rounds to run.
    pub rounds: u64,
    /// How uploads are summed.
    pub privacy: Privacy,
    /// Probability that a client drops out of a round (at a random protocol stage).
    pub dropout: f64,
    /// Seed of everything random: initial adapter, dropouts, protocol randomness.
    pub seed: u64,
    /// Per-value quantization range of secure aggregation (`[-value_clip, value_clip]`).
    pub value_clip: f32,
}

/// Progress within a run, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Client `done` of `of` has contributed to round `round` (1-based).
    Trained {
        /// Round.
        round: u64,
        /// Clients done.
        done: usize,
        /// Clients in the round.
        of: usize,
    },
    /// Scoring the model after round `round` (0: the initial model).
    Evaluating {
        /// Round.
        round: u64,
    },
}

/// Everything needed to continue a run after an interruption.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The global state after the last finished round.
    pub global: GlobalState,
    /// What each client kept (`share-a`), by client.
    pub locals: Vec<Option<NamedTensors>>,
    /// The records of the rounds run so far.
    pub records: Vec<RoundRecord>,
}

/// An in-process federated run.
#[derive(Debug)]
pub struct Federation {
    cfg: FederationConfig,
    global: GlobalState,
    locals: Vec<Option<NamedTensors>>,
    records: Vec<RoundRecord>,
    server_privacy: Option<ServerPrivacy>,
}

impl Federation {
    /// A new run from the initial state of `layout` (A from the public seed, B = 0).
    pub fn new(cfg: FederationConfig, layout: AdapterLayout) -> Result<Self, FederationError> {
        let global = GlobalState::initial(layout, cfg.rule, cfg.seed)?;
        let n = cfg.ranks.len();
        Self::from_parts(
            cfg,
            Checkpoint {
                global,
                locals: vec![None; n],
                records: Vec::new(),
            },
        )
    }

    /// Continues a run from a checkpoint; the privacy accountant replays the recorded rounds.
    pub fn resume(cfg: FederationConfig, checkpoint: Checkpoint) -> Result<Self, FederationError> {
        if checkpoint.global.rule != cfg.rule || checkpoint.global.seed != cfg.seed {
            return Err(FederationError::Config(format!(
                "the checkpoint is of rule {} seed {}, this run is rule {} seed {}",
                checkpoint.global.rule, checkpoint.global.seed, cfg.rule, cfg.seed
            )));
        }
        if checkpoint.locals.len() != cfg.ranks.len() {
            return Err(FederationError::Config(format!(
                "the checkpoint has {} clients, this run {}",
                checkpoint.locals.len(),
                cfg.ranks.len()
            )));
        }
        checkpoint.global.validate()?;
        Self::from_parts(cfg, checkpoint)
    }

    fn from_parts(cfg: FederationConfig, cp: Checkpoint) -> Result<Self, FederationError> {
        validate(&cfg, &cp.global.layout)?;
        let mut server_privacy = match &cfg.privacy {
            Privacy::Dp(p) => {
                Some(ServerPrivacy::new(p).map_err(|e| FederationError::Privacy(e.to_string()))?)
            }
            _ => None,
        };
        // Replay the accountant over the rounds already run, each with its recorded survivors.
        if let Some(sp) = server_privacy.as_mut() {
            let mut replay = cp.global.clone();
            replay.round = 0;
            for rec in &cp.records {
                if rec.status == "finished" {
                    let (params, dim) = secure_round_shape(&cfg, &replay, sp)?;
                    let n = cfg.ranks.len() as u32;
                    let planned = sp
                        .plan_round(&params, n, dim)
                        .map_err(|e| FederationError::Privacy(e.to_string()))?;
                    sp.record_round(&planned.plan, rec.survivors as u32)
                        .map_err(|e| FederationError::Privacy(e.to_string()))?;
                }
                replay.round += 1;
            }
        }
        Ok(Federation {
            cfg,
            global: cp.global,
            locals: cp.locals,
            records: cp.records,
            server_privacy,
        })
    }

    /// The current global state.
    pub fn global(&self) -> &GlobalState {
        &self.global
    }

    /// What each client kept.
    pub fn locals(&self) -> &[Option<NamedTensors>] {
        &self.locals
    }

    /// Records of the rounds run.
    pub fn records(&self) -> &[RoundRecord] {
        &self.records
    }

    /// A checkpoint of the run so far.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            global: self.global.clone(),
            locals: self.locals.clone(),
            records: self.records.clone(),
        }
    }

    /// Whether every round has run.
    pub fn is_done(&self) -> bool {
        self.records.len() as u64 >= self.cfg.rounds
    }

    /// Scores the current model: the global model on the whole held-out split, or (`share-a`)
    /// each client's own model on its own split, weighted by examples.
    pub fn evaluate(&self, trainer: &mut dyn LocalTrainer) -> Result<EvalScore, FederationError> {
        evaluate_state(&self.global, &self.locals, &self.cfg.ranks, trainer)
    }

    /// Runs the next round: every client trains and uploads, the sum is revealed, the rule
    /// builds the next global state, which is then scored.
    pub fn run_round(
        &mut self,
        trainer: &mut dyn LocalTrainer,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<RoundRecord, FederationError> {
        let round = self.records.len() as u64;
        if round >= self.cfg.rounds {
            return Err(FederationError::Config(format!(
                "all {} rounds have run",
                self.cfg.rounds
            )));
        }
        let n = self.cfg.ranks.len();
        let drops = dropout_plan(self.cfg.seed, round, n, self.cfg.dropout);
        let weights: Vec<u32> = (0..n)
            .map(|i| match self.cfg.privacy {
                // DP bounds each client's influence: every client weighs the same.
                Privacy::Dp(_) => 1,
                _ => trainer.examples(i).clamp(1, u32::MAX as usize) as u32,
            })
            .collect();
        let started = Instant::now();
        let summed = match self.cfg.privacy {
            Privacy::None => self.plain_round(trainer, &weights, &drops, progress)?,
            _ => self.secure_round(trainer, &weights, &drops, progress)?,
        };
        let aggregate_seconds = (started.elapsed().as_secs_f64() - summed.train_seconds).max(0.0);
        let mut record = RoundRecord {
            rule: self.cfg.rule.name().into(),
            clients: n,
            round: round + 1,
            status: "finished".into(),
            abort_reason: None,
            privacy: self.cfg.privacy.name().into(),
            metric_name: trainer.metric_name().into(),
            metric: 0.0,
            loss: 0.0,
            eval_examples: 0,
            train_loss: summed.train_loss,
            epsilon: None,
            round_epsilon: None,
            upload_bytes_per_client: summed.upload_bytes_per_client,
            raw_upload_bytes: 4 * summed.upload_values as u64,
            upload_values: summed.upload_values,
            survivors: summed.survivors,
            dropped: n - summed.survivors,
            clipped_values: summed.clipped_values,
            quantization_bound: summed.quantization_bound,
            train_seconds: summed.train_seconds,
            aggregate_seconds,
            eval_seconds: 0.0,
            global_sha256: String::new(),
        };
        match summed.mean {
            Ok(mean) => {
                self.global = server_step(self.cfg.rule, &self.global, &mean)?;
                for (slot, keep) in self.locals.iter_mut().zip(summed.keeps) {
                    if let Some(k) = keep {
                        *slot = Some(k);
                    }
                }
                if let (Some(sp), Some(plan)) = (self.server_privacy.as_mut(), summed.plan) {
                    let r = sp
                        .record_round(&plan, summed.survivors as u32)
                        .map_err(|e| FederationError::Privacy(e.to_string()))?;
                    record.epsilon = Some(r.cumulative_epsilon);
                    record.round_epsilon = Some(r.round_epsilon);
                }
            }
            Err(reason) => {
                // The adapter stays; only the count of rounds run moves on (so the next round has
                // a fresh session and dropout draw).
                record.status = "aborted".into();
                record.abort_reason = Some(reason);
                self.global.round += 1;
            }
        }
        progress(Progress::Evaluating { round: round + 1 });
        let t = Instant::now();
        let score = self.evaluate(trainer)?;
        record.eval_seconds = t.elapsed().as_secs_f64();
        record.metric = score.metric;
        record.loss = score.loss;
        record.eval_examples = score.examples;
        record.global_sha256 = hex::encode(self.global.sha256());
        self.records.push(record.clone());
        Ok(record)
    }

    /// Plain weighted sums in f64: the reference.
    fn plain_round(
        &mut self,
        trainer: &mut dyn LocalTrainer,
        weights: &[u32],
        drops: &[Option<Stage>],
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Summed, FederationError> {
        let manifest = self.cfg.rule.rule().manifest(&self.global);
        let len = manifest_values(&manifest);
        let mut sum = WeightedSum::new(len);
        let mut summed = Summed::new(self.locals.len(), len);
        let policy = self.upload_policy();
        for i in 0..self.locals.len() {
            // A client that drops before its masked input is due contributes nothing.
            if drops[i].is_some_and(|s| s <= Stage::MaskedInput) {
                continue;
            }
            let profile = ClientProfile {
                rank: self.cfg.ranks[i],
                weight: weights[i],
            };
            let c = client_step(
                self.cfg.rule,
                &self.global,
                trainer,
                i,
                &profile,
                self.locals[i].as_ref(),
                policy,
            )?;
            sum.add(&c.upload)?;
            summed.absorb(i, c);
            progress(Progress::Trained {
                round: self.global.round + 1,
                done: i + 1,
                of: self.locals.len(),
            });
        }
        summed.survivors = sum.count();
        summed.upload_bytes_per_client = 4 * (len as u64 + 1);
        summed.mean = if sum.count() == 0 {
            Err("every client dropped out".into())
        } else {
            Ok(sum.mean()?)
        };
        Ok(summed)
    }

    /// The real SecAgg+ core over deferred clients, with noise for DP.
    fn secure_round(
        &mut self,
        trainer: &mut dyn LocalTrainer,
        weights: &[u32],
        drops: &[Option<Stage>],
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Summed, FederationError> {
        let n = self.locals.len();
        let rule = self.cfg.rule.rule();
        let manifest = rule.manifest(&self.global);
        let len = manifest_values(&manifest);
        let tail = public_tail(&manifest);
        let weight_bound = weights.iter().copied().max().unwrap_or(1);
        let (params, plan) = match self.server_privacy.as_ref() {
            Some(sp) => {
                let (params, dim) = secure_round_shape(&self.cfg, &self.global, sp)?;
                let planned = sp
                    .plan_round(&params, n as u32, dim)
                    .map_err(|e| FederationError::Privacy(e.to_string()))?;
                (params, Some(planned.plan))
            }
            None => (
                round_params(
                    n as u32,
                    self.cfg.dropout,
                    self.cfg.value_clip,
                    weight_bound,
                )?,
                None,
            ),
        };
        let mut rng = round_rng(self.cfg.seed, self.global.round, "protocol");
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let config = RoundConfig {
            round: self.global.round,
            nonce,
            num_clients: n as u32,
            params,
            manifest: manifest
                .iter()
                .map(|m| {
                    Ok(TensorSpec {
                        name: m.name.clone(),
                        shape: m
                            .shape
                            .iter()
                            .map(|&d| u32::try_from(d))
                            .collect::<Result<_, _>>()
                            .map_err(|_| {
                                FederationError::Config(format!("{} is too large", m.name))
                            })?,
                    })
                })
                .collect::<Result<_, FederationError>>()?,
        };
        let resolved = match &self.cfg.privacy {
            Privacy::Dp(p) => Some(
                p.resolve()
                    .map_err(|e| FederationError::Privacy(e.to_string()))?,
            ),
            _ => None,
        };
        let clients: Vec<Client> = (0..n)
            .map(|i| {
                let c = Client::deferred(i as u32, &mut rng).with_noise_free_tail(tail);
                match &resolved {
                    Some(p) => c.with_noise(Box::new(ClientNoise::new(*p))),
                    None => c,
                }
            })
            .collect();
        let mut harness = Harness::with_clients(config, clients, drops.to_vec())?;
        let mut summed = Summed::new(n, len);
        let mut failure: Option<FederationError> = None;
        let policy = self.upload_policy();
        let (rule_kind, ranks, global, locals) =
            (self.cfg.rule, &self.cfg.ranks, &self.global, &self.locals);
        let mut done = 0usize;
        let mut source = |id: u32| -> Option<ClientInput> {
            if failure.is_some() {
                return None;
            }
            let i = id as usize;
            let profile = ClientProfile {
                rank: ranks[i],
                weight: weights[i],
            };
            match client_step(
                rule_kind,
                global,
                trainer,
                i,
                &profile,
                locals[i].as_ref(),
                policy,
            ) {
                Ok(mut c) => {
                    let input = ClientInput {
                        values: std::mem::take(&mut c.upload.values),
                        weight: c.upload.weight,
                    };
                    summed.absorb(i, c);
                    done += 1;
                    progress(Progress::Trained {
                        round: global.round + 1,
                        done,
                        of: n,
                    });
                    Some(input)
                }
                Err(e) => {
                    failure = Some(e);
                    None
                }
            }
        };
        let outcome = harness.run_with_inputs(None, Some(&mut source));
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some((id, e)) = harness.server_errors.first() {
            return Err(FederationError::Protocol(format!(
                "server refused client {id}: {e}"
            )));
        }
        let sent: Vec<u64> = harness
            .bytes_up
            .iter()
            .copied()
            .filter(|&b| b > 0)
            .collect();
        summed.upload_bytes_per_client = sent.iter().sum::<u64>() / sent.len().max(1) as u64;
        summed.plan = plan;
        match outcome {
            Outcome::Finished(agg) => {
                summed.survivors = agg.survivors.len();
                summed.quantization_bound = agg.error_bound;
                summed.mean = Ok(agg.mean.clone());
            }
            Outcome::Aborted(reason) => {
                summed.survivors = 0;
                summed.mean = Err(reason.to_string());
            }
        }
        Ok(summed)
    }

    fn upload_policy(&self) -> UploadPolicy {
        UploadPolicy {
            l2_clip: match &self.cfg.privacy {
                Privacy::Dp(p) => p.clip_norm,
                _ => None,
            },
            value_clip: self.cfg.value_clip,
        }
    }
}

/// The secure round's parameters for DP (ring headroom fitted to the noise) and the number of
/// noised values per client.
fn secure_round_shape(
    cfg: &FederationConfig,
    global: &GlobalState,
    sp: &ServerPrivacy,
) -> Result<(fedlora_secagg::RoundParams, u64), FederationError> {
    let manifest = cfg.rule.rule().manifest(global);
    let dim = (manifest_values(&manifest) - public_tail(&manifest)) as u64;
    let n = cfg.ranks.len() as u32;
    let mut params = round_params(n, cfg.dropout, cfg.value_clip, 1)?;
    sp.fit_params(&mut params, n, dim)
        .map_err(|e| FederationError::Privacy(e.to_string()))?;
    Ok((params, dim))
}

/// Values at the end of the manifest that are public weights.
fn public_tail(manifest: &[fedlora_aggregate::UploadSpec]) -> usize {
    manifest
        .last()
        .filter(|m| m.name == PARTITION_WEIGHTS)
        .map_or(0, |m| m.len())
}

/// Scores `global` (with each client's kept tensors for personalised rules).
pub fn evaluate_state(
    global: &GlobalState,
    locals: &[Option<NamedTensors>],
    ranks: &[usize],
    trainer: &mut dyn LocalTrainer,
) -> Result<EvalScore, FederationError> {
    let rule = global.rule.rule();
    if global.rule.has_global_model() {
        let profile = ClientProfile {
            rank: global.layout.rank,
            weight: 1,
        };
        let start = rule.start(global, &profile, None)?;
        return trainer
            .evaluate(EvalSplit::All, &start)
            .map_err(|e| FederationError::Evaluation(e.0));
    }
    let mut scores = Vec::new();
    for (i, local) in locals.iter().enumerate() {
        if trainer.eval_examples(i) == 0 {
            continue;
        }
        let profile = ClientProfile {
            rank: ranks[i],
            weight: 1,
        };
        let start = rule.start(global, &profile, local.as_ref())?;
        scores.push(
            trainer
                .evaluate(EvalSplit::Client(i), &start)
                .map_err(|e| FederationError::Evaluation(e.0))?,
        );
    }
    EvalScore::combine(&scores)
        .ok_or_else(|| FederationError::Evaluation("no client has held-out examples".into()))
}

/// What a round's summation produced.
struct Summed {
    mean: Result<Vec<f32>, String>,
    keeps: Vec<Option<NamedTensors>>,
    survivors: usize,
    upload_values: usize,
    upload_bytes_per_client: u64,
    clipped_values: usize,
    quantization_bound: f64,
    train_seconds: f64,
    train_loss: f64,
    trained: usize,
    plan: Option<fedlora_dp::NoisePlan>,
}

impl Summed {
    fn new(n: usize, len: usize) -> Self {
        Summed {
            mean: Err("no round".into()),
            keeps: vec![None; n],
            survivors: 0,
            upload_values: len,
            upload_bytes_per_client: 0,
            clipped_values: 0,
            quantization_bound: 0.0,
            train_seconds: 0.0,
            train_loss: 0.0,
            trained: 0,
            plan: None,
        }
    }

    fn absorb(&mut self, client: usize, c: Contribution) {
        self.clipped_values += c.clipped_values;
        self.train_seconds += c.trained.seconds;
        // Running mean of the clients' final training losses.
        self.trained += 1;
        self.train_loss += (c.trained.final_loss - self.train_loss) / self.trained as f64;
        self.keeps[client] = c.keep.clone();
    }
}

/// A generator for `purpose` in round `round` of a run seeded `seed`.
fn round_rng(seed: u64, round: u64, purpose: &str) -> ChaCha20Rng {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"fedlora/v0/federation");
    h.update(seed.to_le_bytes());
    h.update(round.to_le_bytes());
    h.update(purpose.as_bytes());
    ChaCha20Rng::from_seed(h.finalize().into())
}

/// Which clients drop out of round `round`, and at which stage: each independently with
/// probability `p`, at a stage drawn uniformly.
pub fn dropout_plan(seed: u64, round: u64, n: usize, p: f64) -> Vec<Option<Stage>> {
    let mut rng = round_rng(seed, round, "dropout");
    (0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let stage = Stage::ALL[(rng.next_u32() % Stage::ALL.len() as u32) as usize];
            (u < p).then_some(stage)
        })
        .collect()
}

fn validate(cfg: &FederationConfig, layout: &AdapterLayout) -> Result<(), FederationError> {
    let bad = |m: String| Err(FederationError::Config(m));
    if cfg.ranks.is_empty() {
        return bad("a federation needs at least one client".into());
    }
    if cfg.privacy.is_secure() && cfg.ranks.len() < 2 {
        return bad(
            "secure aggregation needs at least 2 clients (use --privacy none for 1)".into(),
        );
    }
    if cfg.rounds == 0 {
        return bad("rounds must be at least 1".into());
    }
    if !(0.0..1.0).contains(&cfg.dropout) {
        return bad(format!("dropout must be in [0, 1), got {}", cfg.dropout));
    }
    if !(cfg.value_clip.is_finite() && cfg.value_clip > 0.0) {
        return bad(format!(
            "value clip must be a positive number, got {}",
            cfg.value_clip
        ));
    }
    if !cfg.rule.uses_ranks() && cfg.ranks.iter().any(|&r| r != layout.rank) {
        return bad(format!(
            "rule {} needs every client at rank {}; ranks are for zero-pad and rank-partitioned",
            cfg.rule, layout.rank
        ));
    }
    for &r in &cfg.ranks {
        layout.check_client_rank(r)?;
    }
    Ok(())
}
