//! LoRA: `W' = W + (alpha/r)·B·A` on a frozen base `W` of shape `(out, in)`, with `A` `(r, in)`
//! Gaussian-initialised, `B` `(out, r)` zero-initialised (so an untrained adapter leaves the model
//! unchanged), and optional dropout on the LoRA branch's input, as in Hugging Face PEFT.

use std::fmt;
use std::str::FromStr;

use candle_core::{Tensor, Var};

use crate::ops::frozen_linear;
use crate::rng::SeededRng;
use crate::{Result, TrainError};

/// A projection that LoRA can adapt. Names follow the llama module names; BERT maps them to its own
/// (`q`→`query`, `o`→`attention.output.dense`, `up`→`intermediate.dense`, `down`→`output.dense`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection (llama only).
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl Target {
    /// All targets, in a fixed order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];
}

impl FromStr for Target {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "q" | "q_proj" | "query" => Target::Q,
            "k" | "k_proj" | "key" => Target::K,
            "v" | "v_proj" | "value" => Target::V,
            "o" | "o_proj" => Target::O,
            "gate" | "gate_proj" => Target::Gate,
            "up" | "up_proj" => Target::Up,
            "down" | "down_proj" => Target::Down,
            other => {
                return Err(TrainError::invalid(format!(
                    "unknown LoRA target `{other}` (use q, k, v, o, gate, up, down)"
                )))
            }
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        })
    }
}

/// Rank, scaling, dropout and which projections to adapt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (> 0).
    pub r: usize,
    /// `alpha`; the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout probability on the LoRA branch's input, in [0, 1).
    pub dropout: f32,
    /// Adapted projections.
    pub targets: Vec<Target>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec![Target::Q, Target::V],
        }
    }
}

impl LoraConfig {
    /// Checks ranges; called by every model constructor.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(TrainError::invalid("LoRA rank r must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(TrainError::invalid("LoRA alpha must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(TrainError::invalid("LoRA dropout must be in [0, 1)"));
        }
        if self.targets.is_empty() {
            return Err(TrainError::invalid(
                "at least one LoRA target module is needed",
            ));
        }
        Ok(())
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Parses a comma-separated target list such as `q,v` or `q_proj,v_proj`.
    pub fn parse_targets(s: &str) -> Result<Vec<Target>> {
        let mut t: Vec<Target> = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(str::parse)
            .collect::<Result<_>>()?;
        t.sort();
        t.dedup();
        Ok(t)
    }
}

/// The trainable half of a LoRA layer.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `A`, shape `(r, in)`.
    pub a: Var,
    /// `B`, shape `(out, r)`.
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout on the branch input.
    pub dropout: f32,
    /// Whether `A` is trained (false: frozen, as `frozen-a` and alternate rounds of federated
    /// aggregation need; no gradient is computed for it).
    pub train_a: bool,
    /// Whether `B` is trained.
    pub train_b: bool,
}

impl LoraPair {
    /// A pair from given factors `A (r, in)` and `B (out, r)` (a federated start point).
    pub fn from_factors(
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        dropout: f32,
        train_a: bool,
        train_b: bool,
    ) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if r != rb || r == 0 {
            return Err(TrainError::invalid(format!(
                "LoRA factors of ranks {r} and {rb} do not fit together"
            )));
        }
        Ok(LoraPair {
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            scale,
            dropout,
            train_a,
            train_b,
        })
    }

    /// The factor as the forward pass uses it: detached when frozen, so backward skips it.
    fn factor(v: &Var, trained: bool) -> Tensor {
        if trained {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        }
    }
}

/// A linear layer with a frozen base and an optional LoRA pair.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// Base weight `(out, in)`; a plain tensor, so candle never computes its gradient.
    pub weight: Tensor,
    /// Base bias `(out,)`.
    pub bias: Option<Tensor>,
    /// The adapter, when this projection is a target.
    pub lora: Option<LoraPair>,
}

impl LoraLinear {
    /// A frozen linear layer with no adapter.
    pub fn frozen(weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear {
            weight,
            bias,
            lora: None,
        }
    }

    /// Adds a fresh adapter: `A ~ N(0, 1/r)` (std `1/sqrt(r)`), `B = 0`.
    ///
    /// PEFT's default draws `A` from Kaiming-uniform; any zero-mean init works because `B = 0`
    /// makes the initial update zero, and a seeded Gaussian is what the issue asks for.
    pub fn attach(&mut self, cfg: &LoraConfig, rng: &mut SeededRng) -> Result<()> {
        let (out, inp) = self.weight.dims2()?;
        check_rank(cfg.r, out, inp, "a target projection")?;
        let dev = self.weight.device();
        let a = rng.normal_tensor((cfg.r, inp), 1.0 / (cfg.r as f32).sqrt(), dev)?;
        let b = Tensor::zeros((out, cfg.r), candle_core::DType::F32, dev)?;
        self.lora = Some(LoraPair {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
            train_a: true,
            train_b: true,
        });
        Ok(())
    }

    /// `x·Wᵀ + b + scale·dropout(x)·Aᵀ·Bᵀ`. `rng` is `Some` in training (dropout on), `None` in
    /// evaluation.
    pub fn forward(&self, x: &Tensor, rng: Option<&mut SeededRng>) -> Result<Tensor> {
        let y = frozen_linear(x, &self.weight, self.bias.as_ref())?;
        let Some(l) = &self.lora else { return Ok(y) };
        let xin = match rng {
            Some(rng) if l.dropout > 0.0 => {
                let mask = rng.dropout_mask(x.dims(), l.dropout, x.device())?;
                x.mul(&mask)?
            }
            _ => x.clone(),
        };
        // Rank-r bottleneck first: (.., in)·Aᵀ is cheap, then ·Bᵀ.
        let a = LoraPair::factor(&l.a, l.train_a);
        let b = LoraPair::factor(&l.b, l.train_b);
        let h = xin.broadcast_matmul(&a.t()?)?;
        let d = h.broadcast_matmul(&b.t()?)?;
        Ok((y + (d * l.scale)?)?)
    }

    /// Folds the adapter into the base weight (`W += scale·B·A`) and drops it: inference then
    /// costs exactly the base model.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
            self.weight = (&self.weight + delta)?;
        }
        Ok(())
    }
}

/// Refuses a rank above a projection's width `min(out, in)`: `B·A` then has no more capacity than at
/// that width, only more parameters (and memory).
pub fn check_rank(r: usize, out: usize, inp: usize, what: &str) -> Result<()> {
    let width = out.min(inp);
    if r > width {
        return Err(TrainError::invalid(format!(
            "LoRA rank {r} is above the width {width} of {what} ({out}x{inp}): a rank above min(out, in) adds parameters but no capacity; use a rank of at most {width}"
        )));
    }
    Ok(())
}

/// Attaches fresh adapters to every projection whose target `cfg` names, drawing from one seeded
/// stream layer by layer. Each item of `layers` is one layer's projections; `targets[j]` is the
/// target of slot `j`.
pub fn attach_to_layers<'a>(
    layers: impl IntoIterator<Item = &'a mut [LoraLinear]>,
    targets: &[Target],
    cfg: &LoraConfig,
    seed: u64,
) -> Result<()> {
    cfg.validate()?;
    let mut rng = SeededRng::fork(seed, "lora-init");
    for proj in layers {
        for (t, p) in targets.iter().zip(proj.iter_mut()) {
            if cfg.targets.contains(t) {
                p.attach(cfg, &mut rng)?;
            }
        }
    }
    Ok(())
}

/// Folds every adapter of `layers` into its base weight.
pub fn merge_layers<'a>(layers: impl IntoIterator<Item = &'a mut [LoraLinear]>) -> Result<()> {
    for proj in layers {
        for p in proj.iter_mut() {
            p.merge()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.max(D::Minus1))
            .and_then(|t| t.to_scalar())
            .expect("max")
    }

    #[test]
    fn b_zero_leaves_output_unchanged_and_merge_matches_forward() {
        let dev = Device::Cpu;
        let mut rng = SeededRng::new(1);
        let w = rng.normal_tensor((6, 4), 1.0, &dev).expect("w");
        let x = rng.normal_tensor((3, 4), 1.0, &dev).expect("x");
        let mut layer = LoraLinear::frozen(w.clone(), None);
        let base = layer.forward(&x, None).expect("base");
        let cfg = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec![Target::Q],
        };
        layer.attach(&cfg, &mut rng).expect("attach");
        let with = layer.forward(&x, None).expect("with");
        assert_eq!(max_abs(&(&with - &base).expect("d")), 0.0);
        // A non-zero B changes the output by exactly scale·x·Aᵀ·Bᵀ, and merging reproduces it.
        let l = layer.lora.as_ref().expect("lora");
        l.b.set(&rng.normal_tensor((6, 2), 1.0, &dev).expect("b"))
            .expect("set");
        let adapted = layer.forward(&x, None).expect("adapted");
        assert!(max_abs(&(&adapted - &base).expect("d")) > 1e-3);
        let mut merged = layer.clone();
        merged.merge().expect("merge");
        assert!(merged.lora.is_none());
        let m = merged.forward(&x, None).expect("merged");
        assert!(max_abs(&(&m - &adapted).expect("d")) < 1e-4);
        assert_eq!(Tensor::zeros(1, DType::F32, &dev).expect("z").dims(), &[1]);
    }

    #[test]
    fn targets_parse_and_config_validates() {
        assert_eq!(
            LoraConfig::parse_targets("v,q_proj, q").expect("parse"),
            vec![Target::Q, Target::V]
        );
        assert!(LoraConfig::parse_targets("qq").is_err());
        let mut c = LoraConfig::default();
        assert!(c.validate().is_ok());
        c.r = 0;
        assert!(c.validate().is_err());
        c.r = 4;
        c.dropout = 1.0;
        assert!(c.validate().is_err());
    }
}
