//! `frozen-a`: FFA-LoRA (Sun et al. 2024, arXiv 2403.12313). `A` is drawn once from the public
//! seed and never trained; clients train and send `B` (and the head) only. Then
//! `(Σ p_i B_i)·A = Σ p_i (B_i·A)`: the average of the factors is the exact average of the
//! products, with half the upload of `fedavg`. The best-known fit for DP (no A/B interaction).

use crate::rule::{
    add_mean_deltas, factor_manifest, full_rank_start, pack_deltas, AggregationRule, ClientProfile,
    ClientStart, RuleKind, Trainable, Upload, UploadSpec,
};
use crate::{AggregateError, GlobalState, NamedTensors};

/// The rule.
#[derive(Debug, Clone, Copy)]
pub struct FrozenA;

impl AggregationRule for FrozenA {
    fn kind(&self) -> RuleKind {
        RuleKind::FrozenA
    }

    fn trainable(&self, _global: &GlobalState) -> Trainable {
        Trainable {
            a: false,
            b: true,
            head: true,
        }
    }

    fn manifest(&self, global: &GlobalState) -> Vec<UploadSpec> {
        factor_manifest(&global.layout, false, true, true)
    }

    fn start(
        &self,
        global: &GlobalState,
        client: &ClientProfile,
        _local: Option<&NamedTensors>,
    ) -> Result<ClientStart, AggregateError> {
        full_rank_start(global, client, self.trainable(global))
    }

    /// Implements the FFA-LoRA upload `(B_i − B, head_i − head)`; `A_i = A` is checked.
    fn encode(
        &self,
        global: &GlobalState,
        start: &ClientStart,
        trained: &NamedTensors,
        client: &ClientProfile,
    ) -> Result<Upload, AggregateError> {
        for l in &global.layout.layers {
            let name = l.a_name();
            if trained.require(&name)? != start.adapter.require(&name)? {
                return Err(AggregateError::FrozenChanged(name));
            }
        }
        pack_deltas(&self.manifest(global), start, trained, client.weight)
    }

    /// Implements `B' = Σ p_i B_i` with `A` unchanged.
    fn decode(&self, global: &GlobalState, mean: &[f32]) -> Result<GlobalState, AggregateError> {
        add_mean_deltas(global, &self.manifest(global), mean)
    }
}
