//! The public shape of a federated adapter: which projections carry LoRA factors, their sizes, the
//! global rank and scale, the rank partitions of heterogeneous clients, and the fully trained head.
//! Server and clients agree on it before the first round; it is part of every global state's hash.

use serde::{Deserialize, Serialize};

use crate::AggregateError;

/// One adapted projection `W (out x in)`: its factors are `A (rank x in)` and `B (out x rank)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// PEFT module prefix, e.g. `base_model.model.bert.encoder.layer.0.attention.self.query`.
    pub module: String,
    /// Output width of the frozen weight (rows of `W` and of `B`).
    pub out: usize,
    /// Input width of the frozen weight (columns of `W` and of `A`).
    pub inp: usize,
}

impl LayerSpec {
    /// Name of the `A` factor (PEFT's).
    pub fn a_name(&self) -> String {
        format!("{}.lora_A.weight", self.module)
    }

    /// Name of the `B` factor (PEFT's).
    pub fn b_name(&self) -> String {
        format!("{}.lora_B.weight", self.module)
    }

    /// Name of the accumulated merged update of the frozen weight (`exact` rule).
    pub fn delta_name(&self) -> String {
        format!("{}.base_delta", self.module)
    }

    /// Name of a client's product upload `s·B·A` (`exact` rule).
    pub fn update_name(&self) -> String {
        format!("{}.update", self.module)
    }
}

/// A tensor that is trained in full and averaged plainly (a classifier head).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadSpec {
    /// PEFT name, e.g. `base_model.model.classifier.weight`.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// How it starts: `normal` (N(0, 0.02²), Hugging Face's initializer range) or `zeros`.
    pub init: HeadInit,
}

/// Initial values of a head tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadInit {
    /// N(0, 0.02²): Hugging Face's `initializer_range` for BERT's classifier weight.
    Normal,
    /// Zeros (biases).
    Zeros,
}

/// The adapter every party agrees on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterLayout {
    /// Base model name, bound into the state's hash so a state for another model is refused.
    pub model: String,
    /// Rank of the global adapter (the largest client rank).
    pub rank: usize,
    /// LoRA alpha. Every client scales its update by `alpha / rank` of this global rank, so a
    /// lower-rank client's factors are the leading block of the global ones with the same scale.
    pub alpha: f64,
    /// Upper bounds of the rank partitions, ascending, the last equal to `rank` (`[rank]` when all
    /// clients have the same rank; `[4, 8, 16]` for clients of ranks 4, 8 and 16). Public.
    pub partitions: Vec<usize>,
    /// Adapted projections, in a fixed order.
    pub layers: Vec<LayerSpec>,
    /// Fully trained tensors.
    pub head: Vec<HeadSpec>,
}

impl AdapterLayout {
    /// The LoRA scale `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks sizes and the partition list.
    pub fn validate(&self) -> Result<(), AggregateError> {
        let bad = |m: String| Err(AggregateError::Layout(m));
        if self.rank == 0 {
            return bad("rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!(
                "alpha must be a positive number, got {}",
                self.alpha
            ));
        }
        if self.layers.is_empty() {
            return bad("no adapted layers".into());
        }
        if self.partitions.last() != Some(&self.rank)
            || self.partitions.windows(2).any(|w| w[0] >= w[1])
            || self.partitions.first() == Some(&0)
        {
            return bad(format!(
                "rank partitions {:?} must be ascending, positive and end at the rank {}",
                self.partitions, self.rank
            ));
        }
        for l in &self.layers {
            if l.out == 0 || l.inp == 0 {
                return bad(format!("layer {} has a zero dimension", l.module));
            }
            if self.rank > l.out.min(l.inp) {
                return bad(format!(
                    "rank {} exceeds the smaller side ({}) of layer {} ({}x{})",
                    self.rank,
                    l.out.min(l.inp),
                    l.module,
                    l.out,
                    l.inp
                ));
            }
        }
        let mut names: Vec<&str> = self.layers.iter().map(|l| l.module.as_str()).collect();
        names.extend(self.head.iter().map(|h| h.name.as_str()));
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("name {} appears twice", w[0]));
        }
        if let Some(h) = self.head.iter().find(|h| h.shape.contains(&0)) {
            return bad(format!("head tensor {} has a zero dimension", h.name));
        }
        Ok(())
    }

    /// Checks that `rank` is one of the partition bounds (a client's rank must be public and one
    /// of the federation's ranks).
    pub fn check_client_rank(&self, rank: usize) -> Result<(), AggregateError> {
        if self.partitions.contains(&rank) {
            Ok(())
        } else {
            Err(AggregateError::RankMismatch {
                rank,
                allowed: self.partitions.clone(),
            })
        }
    }

    /// Row (of `A`) / column (of `B`) ranges of the rank partitions.
    pub fn partition_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut lo = 0;
        self.partitions
            .iter()
            .map(|&hi| {
                let r = lo..hi;
                lo = hi;
                r
            })
            .collect()
    }

    /// Values of all `A` and `B` factors at the global rank.
    pub fn factor_values(&self) -> usize {
        self.layers
            .iter()
            .map(|l| self.rank * (l.out + l.inp))
            .sum()
    }

    /// Values of all head tensors.
    pub fn head_values(&self) -> usize {
        self.head
            .iter()
            .map(|h| h.shape.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small layout for tests: `layers` projections of `out x inp`, a 2-class head over `inp`.
    pub fn layout(layers: usize, out: usize, inp: usize, partitions: &[usize]) -> AdapterLayout {
        AdapterLayout {
            model: "test".into(),
            rank: *partitions.last().expect("partitions"),
            alpha: 16.0,
            partitions: partitions.to_vec(),
            layers: (0..layers)
                .map(|i| LayerSpec {
                    module: format!("m.layer.{i}.q"),
                    out,
                    inp,
                })
                .collect(),
            head: vec![
                HeadSpec {
                    name: "m.classifier.weight".into(),
                    shape: vec![2, inp],
                    init: HeadInit::Normal,
                },
                HeadSpec {
                    name: "m.classifier.bias".into(),
                    shape: vec![2],
                    init: HeadInit::Zeros,
                },
            ],
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(layout(2, 6, 5, &[2, 4]).validate().is_ok());
        let e = layout(2, 6, 5, &[4, 2]).validate().expect_err("order");
        assert!(e.to_string().contains("ascending"), "{e}");
        let e = layout(2, 6, 3, &[4]).validate().expect_err("rank");
        assert!(e.to_string().contains("exceeds"), "{e}");
        let l = layout(1, 6, 5, &[2, 4]);
        assert!(l.check_client_rank(2).is_ok());
        assert!(l.check_client_rank(3).is_err());
        assert_eq!(l.partition_ranges(), vec![0..2, 2..4]);
    }
}
