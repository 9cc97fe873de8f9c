//! `fedavg`: A and B averaged separately, weighted by examples — FedIT (Zhang et al. 2024) and
//! OpenFedLLM's rule, the one the LoRA merge-count study measures:
//! `W' = W + s·(Σ p_i B_i)(Σ p_i A_i)`, `p_i = n_i / Σ n`. Not exact: it misses
//! `Σ p_i (B_i − B̄)(A_i − Ā)`, which grows as clients diverge.

use crate::rule::{
    add_mean_deltas, factor_manifest, full_rank_start, pack_deltas, AggregationRule, ClientProfile,
    ClientStart, RuleKind, Trainable, Upload, UploadSpec,
};
use crate::{AggregateError, GlobalState, NamedTensors};

/// The rule.
#[derive(Debug, Clone, Copy)]
pub struct FedAvg;

impl AggregationRule for FedAvg {
    fn kind(&self) -> RuleKind {
        RuleKind::FedAvg
    }

    fn trainable(&self, _global: &GlobalState) -> Trainable {
        Trainable::ALL
    }

    fn manifest(&self, global: &GlobalState) -> Vec<UploadSpec> {
        factor_manifest(&global.layout, true, true, true)
    }

    fn start(
        &self,
        global: &GlobalState,
        client: &ClientProfile,
        _local: Option<&NamedTensors>,
    ) -> Result<ClientStart, AggregateError> {
        full_rank_start(global, client, self.trainable(global))
    }

    /// Implements the fedavg upload: `(A_i − A, B_i − B, head_i − head)`.
    fn encode(
        &self,
        global: &GlobalState,
        start: &ClientStart,
        trained: &NamedTensors,
        client: &ClientProfile,
    ) -> Result<Upload, AggregateError> {
        pack_deltas(&self.manifest(global), start, trained, client.weight)
    }

    /// Implements `A' = Σ p_i A_i`, `B' = Σ p_i B_i`, `head' = Σ p_i head_i`.
    fn decode(&self, global: &GlobalState, mean: &[f32]) -> Result<GlobalState, AggregateError> {
        add_mean_deltas(global, &self.manifest(global), mean)
    }
}
