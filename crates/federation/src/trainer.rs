//! What the round loop needs from local training, as a trait: the loop and the service stay free
//! of candle, and the CLI wires in `fedlora-train` (tests wire in a closed-form "trainer").

use fedlora_aggregate::{ClientStart, NamedTensors};
use serde::Serialize;

/// A local training or evaluation failure, with a message a person can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct TrainerError(pub String);

/// A trained adapter and what it cost.
#[derive(Debug, Clone)]
pub struct TrainedAdapter {
    /// Same names and shapes as the start's adapter.
    pub tensors: NamedTensors,
    /// Mean training loss of the last steps.
    pub final_loss: f64,
    /// Wall time of the local training, seconds.
    pub seconds: f64,
    /// Sequence positions processed.
    pub tokens: usize,
}

/// Which held-out examples to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    /// The whole held-out split (the global model).
    All,
    /// Client `i`'s own share of the held-out split (personalised rules).
    Client(usize),
}

/// A score on held-out examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalScore {
    /// Examples scored.
    pub examples: usize,
    /// Accuracy (classification) or exact match (generation), in [0, 1].
    pub metric: f64,
    /// Mean loss.
    pub loss: f64,
}

impl EvalScore {
    /// The example-weighted mean of several scores (clients' own splits).
    pub fn combine(scores: &[EvalScore]) -> Option<EvalScore> {
        let n: usize = scores.iter().map(|s| s.examples).sum();
        if n == 0 {
            return None;
        }
        let w = |f: fn(&EvalScore) -> f64| {
            scores.iter().map(|s| f(s) * s.examples as f64).sum::<f64>() / n as f64
        };
        Some(EvalScore {
            examples: n,
            metric: w(|s| s.metric),
            loss: w(|s| s.loss),
        })
    }
}

/// Local training and evaluation for the clients of one process (in-process federation: all of
/// them; a networked client: itself only).
pub trait LocalTrainer {
    /// Name of the metric (`accuracy` or `exact_match`).
    fn metric_name(&self) -> &'static str;

    /// Training examples of client `client` (its weight in the mean).
    fn examples(&self, client: usize) -> usize;

    /// Held-out examples of client `client`'s own split ([`EvalSplit::Client`]).
    fn eval_examples(&self, client: usize) -> usize;

    /// Trains client `client` in round `round` (0-based) from `start` on its own data.
    fn train(
        &mut self,
        client: usize,
        round: u64,
        start: &ClientStart,
    ) -> Result<TrainedAdapter, TrainerError>;

    /// Scores the model built from `start` on `split`.
    fn evaluate(
        &mut self,
        split: EvalSplit,
        start: &ClientStart,
    ) -> Result<EvalScore, TrainerError>;
}
