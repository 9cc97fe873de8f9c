//! `alternate`: RoLoRA (Chen et al. 2025, arXiv 2502.01755). Rounds alternate which factor is
//! trained: `A` is frozen in odd rounds (the 1st, 3rd, …: `B` trained and averaged), `B` in even
//! rounds (`A` trained and averaged). With one factor fixed and shared, averaging the other is the
//! exact average of the products, as in `frozen-a`, while both factors still learn.

use crate::rule::{
    add_mean_deltas, factor_manifest, full_rank_start, pack_deltas, AggregationRule, ClientProfile,
    ClientStart, RuleKind, Trainable, Upload, UploadSpec,
};
use crate::{AggregateError, GlobalState, NamedTensors};

/// The rule.
#[derive(Debug, Clone, Copy)]
pub struct Alternate;

/// Whether the round that starts from `global` trains `B` (rounds 1, 3, … in 1-based counting).
fn trains_b(global: &GlobalState) -> bool {
    global.round % 2 == 0
}

impl AggregationRule for Alternate {
    fn kind(&self) -> RuleKind {
        RuleKind::Alternate
    }

    fn trainable(&self, global: &GlobalState) -> Trainable {
        let b = trains_b(global);
        Trainable {
            a: !b,
            b,
            head: true,
        }
    }

    fn manifest(&self, global: &GlobalState) -> Vec<UploadSpec> {
        let b = trains_b(global);
        factor_manifest(&global.layout, !b, b, true)
    }

    fn start(
        &self,
        global: &GlobalState,
        client: &ClientProfile,
        _local: Option<&NamedTensors>,
    ) -> Result<ClientStart, AggregateError> {
        full_rank_start(global, client, self.trainable(global))
    }

    /// Implements the upload of the trained factor's update (and the head's); the frozen factor is
    /// checked unchanged.
    fn encode(
        &self,
        global: &GlobalState,
        start: &ClientStart,
        trained: &NamedTensors,
        client: &ClientProfile,
    ) -> Result<Upload, AggregateError> {
        let b = trains_b(global);
        for l in &global.layout.layers {
            let frozen = if b { l.a_name() } else { l.b_name() };
            if trained.require(&frozen)? != start.adapter.require(&frozen)? {
                return Err(AggregateError::FrozenChanged(frozen));
            }
        }
        pack_deltas(&self.manifest(global), start, trained, client.weight)
    }

    /// Implements the average of this round's trained factor (and the head).
    fn decode(&self, global: &GlobalState, mean: &[f32]) -> Result<GlobalState, AggregateError> {
        add_mean_deltas(global, &self.manifest(global), mean)
    }
}
