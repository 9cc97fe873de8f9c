//! `share-a`: FedSA-LoRA (Guo et al. 2024, arXiv 2410.01463). `A` learns what is general, `B` what
//! is client-specific: only `A` is averaged; each client keeps its own `B` and head between rounds,
//! and is scored on its own held-out split with its own model.

use crate::rule::{
    add_mean_deltas, factor_manifest, full_rank_start, pack_deltas, AggregationRule, ClientProfile,
    ClientStart, RuleKind, Trainable, Upload, UploadSpec,
};
use crate::{AggregateError, GlobalState, NamedTensors};

/// The rule.
#[derive(Debug, Clone, Copy)]
pub struct ShareA;

impl AggregationRule for ShareA {
    fn kind(&self) -> RuleKind {
        RuleKind::ShareA
    }

    fn trainable(&self, _global: &GlobalState) -> Trainable {
        Trainable::ALL
    }

    fn manifest(&self, global: &GlobalState) -> Vec<UploadSpec> {
        factor_manifest(&global.layout, true, false, false)
    }

    /// The global `A`, and the client's own `B` and head (the global initial ones in its first
    /// round).
    fn start(
        &self,
        global: &GlobalState,
        client: &ClientProfile,
        local: Option<&NamedTensors>,
    ) -> Result<ClientStart, AggregateError> {
        let mut start = full_rank_start(global, client, self.trainable(global))?;
        if let Some(local) = local {
            for (name, t) in local.iter() {
                let slot = start.adapter.get_mut(name).ok_or_else(|| {
                    AggregateError::StateMismatch(format!(
                        "kept tensor {name} is not part of the adapter"
                    ))
                })?;
                if slot.shape != t.shape {
                    return Err(AggregateError::StateMismatch(format!(
                        "kept tensor {name} has shape {:?}, the adapter needs {:?}",
                        t.shape, slot.shape
                    )));
                }
                *slot = t.clone();
            }
        }
        Ok(start)
    }

    /// Implements the FedSA-LoRA upload: `A_i − A` only.
    fn encode(
        &self,
        global: &GlobalState,
        start: &ClientStart,
        trained: &NamedTensors,
        client: &ClientProfile,
    ) -> Result<Upload, AggregateError> {
        pack_deltas(&self.manifest(global), start, trained, client.weight)
    }

    /// Implements `A' = Σ p_i A_i`; the global `B` and head stay at their initial values.
    fn decode(&self, global: &GlobalState, mean: &[f32]) -> Result<GlobalState, AggregateError> {
        add_mean_deltas(global, &self.manifest(global), mean)
    }

    fn keep_local(&self, trained: &NamedTensors) -> Option<NamedTensors> {
        Some(
            trained
                .iter()
                .filter(|(n, _)| !n.ends_with(".lora_A.weight"))
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
        )
    }
}
