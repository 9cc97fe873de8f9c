//! `exact`: each client sends its product update `s·B_i·A_i` (`out x in` per adapted layer) and
//! the server gets the exact weighted mean `M = Σ p_i s·B_i·A_i` from one secure sum. `M` is merged
//! into the frozen weights and the adapter starts afresh (a new public `A`, `B = 0`) next round.
//! This is what FLoRA (Wang et al. 2024, arXiv 2409.05976) computes by stacking the clients'
//! factors and what FedEx-LoRA (Singhal et al. 2024, arXiv 2410.09432) adds as
//! its residual, but computable from a sum alone, so the server never sees an individual adapter.
//! The cost is the upload: `out·in` values per layer (MiniLM q,v: 1.77M per client).

use crate::init;
use crate::rule::{
    check_trained, factor_manifest, AggregationRule, ClientProfile, ClientStart, Packer, RuleKind,
    Trainable, Unpacker, Upload, UploadSpec,
};
use crate::tensor::Tensor;
use crate::{AggregateError, GlobalState, NamedTensors};

/// The rule.
#[derive(Debug, Clone, Copy)]
pub struct Exact;

impl AggregationRule for Exact {
    fn kind(&self) -> RuleKind {
        RuleKind::Exact
    }

    fn trainable(&self, _global: &GlobalState) -> Trainable {
        Trainable::ALL
    }

    fn manifest(&self, global: &GlobalState) -> Vec<UploadSpec> {
        let mut m: Vec<UploadSpec> = global
            .layout
            .layers
            .iter()
            .map(|l| UploadSpec {
                name: l.update_name(),
                shape: vec![l.out, l.inp],
            })
            .collect();
        m.extend(factor_manifest(&global.layout, false, false, true));
        m
    }

    fn start(
        &self,
        global: &GlobalState,
        client: &ClientProfile,
        _local: Option<&NamedTensors>,
    ) -> Result<ClientStart, AggregateError> {
        let mut start = crate::rule::full_rank_start(global, client, self.trainable(global))?;
        for l in &global.layout.layers {
            start.base_delta.insert(
                l.delta_name(),
                global.tensors.require(&l.delta_name())?.clone(),
            );
        }
        Ok(start)
    }

    /// Implements the product upload `s·B_i·A_i − s·B·A` per layer (the second term is zero: every
    /// round starts at `B = 0`) and `head_i − head`.
    fn encode(
        &self,
        global: &GlobalState,
        start: &ClientStart,
        trained: &NamedTensors,
        client: &ClientProfile,
    ) -> Result<Upload, AggregateError> {
        check_trained(start, trained)?;
        let manifest = self.manifest(global);
        let mut p = Packer::new(&manifest);
        let s = start.scale;
        for l in &global.layout.layers {
            let (a, b) = (l.a_name(), l.b_name());
            let mut upd = trained
                .require(&b)?
                .matmul_scaled(trained.require(&a)?, s)?;
            let before = start
                .adapter
                .require(&b)?
                .matmul_scaled(start.adapter.require(&a)?, s)?;
            upd = upd.sub(&before)?;
            p.push(&upd)?;
        }
        p.push_head_deltas(&global.layout, start, trained)?;
        p.finish(client.weight, 0)
    }

    /// Implements `ΔW' = ΔW + M`, `head' = Σ p_i head_i`, and a fresh adapter: `A` drawn anew from
    /// the public seed for the next round, `B = 0`.
    fn decode(&self, global: &GlobalState, mean: &[f32]) -> Result<GlobalState, AggregateError> {
        let manifest = self.manifest(global);
        let mut u = Unpacker::new(&manifest, mean)?;
        let mut next = global.clone();
        next.round += 1;
        let rank = global.layout.rank;
        for l in &global.layout.layers {
            let m = u.next_tensor()?;
            next.tensors
                .get_mut(&l.delta_name())
                .ok_or_else(|| AggregateError::MissingTensor(l.delta_name()))?
                .add_assign(&m)?;
            next.tensors.insert(
                l.a_name(),
                init::lora_a(global.seed, next.round, &l.module, rank, l.inp),
            );
            next.tensors
                .insert(l.b_name(), Tensor::zeros(&[l.out, rank]));
        }
        u.add_head_means(&global.layout, &mut next)?;
        Ok(next)
    }
}
