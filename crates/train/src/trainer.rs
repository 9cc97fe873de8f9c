//! The local training loop: AdamW on the LoRA parameters, linear warmup then cosine decay,
//! global-norm gradient clipping, seeded shuffling and dropout, a progress bar on stderr.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::data::Encoded;
use crate::model::LoadedModel;
use crate::rng::SeededRng;
use crate::{Result, TrainError};

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps (then cosine decay to 10% of the peak).
    pub warmup_steps: usize,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// Seed for shuffling and dropout.
    pub seed: u64,
    /// Pad every batch to this length (fixed shapes, as benchmarks use); `None` pads to the
    /// longest example of the batch.
    pub pad_to: Option<usize>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            batch_size: 8,
            lr: 1e-3,
            warmup_steps: 10,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 0,
            pad_to: None,
            progress: false,
        }
    }
}

impl TrainConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 {
            return Err(TrainError::invalid(
                "steps and batch size must be at least 1",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainError::invalid(
                "learning rate must be a positive number",
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0 && self.max_grad_norm >= 0.0)
        {
            return Err(TrainError::invalid(
                "weight decay and gradient clip must be non-negative",
            ));
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based): linear warmup, then cosine from `lr` to `lr/10`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = (self.steps - self.warmup_steps).max(1) as f64;
        let p = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = self.lr * 0.1;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// What a training run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Distinct training examples available.
    pub examples: usize,
    /// Sequence positions processed, padding included (`batch·seq` summed over steps).
    pub tokens: usize,
    /// Real (non-padding) tokens processed.
    pub real_tokens: usize,
    /// Wall time of the steps (forward, backward, update), seconds.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_second: f64,
    /// Mean loss of the last `min(10, steps)` steps.
    pub final_loss: f64,
    /// Loss of the first step.
    pub first_loss: f64,
    /// Loss of every step.
    pub losses: Vec<f64>,
}

/// Global L2 norm of the gradients of `vars`.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    Ok(sq.sqrt())
}

/// Trains the model's adapters in place on `examples` and reports.
pub fn train(model: &LoadedModel, examples: &[Encoded], cfg: &TrainConfig) -> Result<TrainReport> {
    cfg.validate()?;
    if examples.is_empty() {
        return Err(TrainError::invalid("no training examples"));
    }
    let params = model.trainable();
    if params.is_empty() {
        return Err(TrainError::invalid(
            "the model has no trainable (LoRA) parameters",
        ));
    }
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: cfg.lr_at(0),
            weight_decay: cfg.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let mut order_rng = SeededRng::fork(cfg.seed, "batch-order");
    let mut dropout_rng = SeededRng::fork(cfg.seed, "dropout");
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order_rng.shuffle(&mut order);
    let mut cursor = 0;
    let bar = progress_bar(cfg.steps as u64, cfg.progress);
    let (mut tokens, mut real) = (0usize, 0usize);
    let mut losses = Vec::with_capacity(cfg.steps);
    let start = Instant::now();
    for step in 0..cfg.steps {
        // Epoch-wise reshuffle; a batch never straddles two epochs' orders.
        if cursor + cfg.batch_size > order.len() && cursor > 0 {
            order_rng.shuffle(&mut order);
            cursor = 0;
        }
        let idx: Vec<&Encoded> = order
            .iter()
            .skip(cursor)
            .take(cfg.batch_size)
            .map(|&i| &examples[i])
            .collect();
        cursor += cfg.batch_size;
        let batch = model.collate(&idx, cfg.pad_to)?;
        tokens += batch.padded_tokens;
        real += batch.real_tokens;
        let loss = model.loss(&batch, Some(&mut dropout_rng))?;
        let lv = f64::from(loss.to_scalar::<f32>()?);
        if !lv.is_finite() {
            return Err(TrainError::Diverged(format!(
                "loss {lv} at step {step}; lower the learning rate"
            )));
        }
        let mut grads = loss.backward()?;
        if cfg.max_grad_norm > 0.0 {
            let norm = grad_norm(&grads, &vars)?;
            if norm > cfg.max_grad_norm {
                let f = cfg.max_grad_norm / (norm + 1e-6);
                for v in &vars {
                    if let Some(g) = grads.remove(v.as_tensor()) {
                        grads.insert(v.as_tensor(), (g * f)?);
                    }
                }
            }
        }
        opt.set_learning_rate(cfg.lr_at(step));
        opt.step(&grads)?;
        losses.push(lv);
        bar.set_message(format!("loss {lv:.4}"));
        bar.inc(1);
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let tail = losses.len().min(10);
    let final_loss = losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64;
    Ok(TrainReport {
        steps: cfg.steps,
        examples: examples.len(),
        tokens,
        real_tokens: real,
        seconds,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        final_loss,
        first_loss: losses[0],
        losses,
    })
}

/// A progress bar on stderr (a plain line every 30 s when stderr is not a terminal), hidden when
/// `show` is false.
pub fn progress_bar(len: u64, show: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(len),
        if show {
            crate::progress::stderr_target()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix}[{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Loss only (no update), for tests and checks.
pub fn batch_loss(model: &LoadedModel, items: &[&Encoded]) -> Result<Tensor> {
    let b = model.collate(items, None)?;
    model.loss(&b, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let c = TrainConfig {
            steps: 100,
            warmup_steps: 10,
            lr: 1.0,
            ..TrainConfig::default()
        };
        assert!((c.lr_at(0) - 0.1).abs() < 1e-9);
        assert!((c.lr_at(9) - 1.0).abs() < 1e-9);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-9);
        assert!(c.lr_at(60) < c.lr_at(20));
        assert!((c.lr_at(99) - 0.1).abs() < 0.01);
        let bad = TrainConfig {
            lr: -1.0,
            ..TrainConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
