//! `zero-pad`: clients of different ranks, each adapter zero-padded to the largest rank and all
//! averaged together — HetLoRA's baseline (Cho et al. 2024). A rank-`r_i` client trains the leading
//! `r_i` rows of `A` and columns of `B`. Its padded zeros count in the mean, so every round shrinks
//! the high-rank partitions by the fraction of clients that hold them: the energy of the global
//! update concentrates in the smallest shared rank ("rank collapse", raFLoRA). Kept as the baseline
//! that `rank-partitioned` fixes.

use crate::rule::{
    add_mean_deltas, check_trained, factor_manifest, AggregationRule, ClientProfile, ClientStart,
    Packer, RuleKind, Trainable, Upload, UploadSpec,
};
use crate::tensor::Tensor;
use crate::{AggregateError, GlobalState, NamedTensors};

/// The rule.
#[derive(Debug, Clone, Copy)]
pub struct ZeroPad;

/// The leading `rank` rows of each `A` and columns of each `B`, and the head: the start of a
/// lower-rank client under both heterogeneous-rank rules.
pub(crate) fn partial_start(
    global: &GlobalState,
    client: &ClientProfile,
) -> Result<ClientStart, AggregateError> {
    global.layout.check_client_rank(client.rank)?;
    let mut adapter = NamedTensors::new();
    for (i, l) in global.layout.layers.iter().enumerate() {
        adapter.insert(l.a_name(), global.a(i)?.top_rows(client.rank)?);
        adapter.insert(l.b_name(), global.b(i)?.left_cols(client.rank)?);
    }
    for (n, t) in global.head()?.iter() {
        adapter.insert(n, t.clone());
    }
    Ok(ClientStart {
        rank: client.rank,
        scale: global.layout.scale(),
        adapter,
        base_delta: NamedTensors::new(),
        train: Trainable::ALL,
    })
}

/// The trained factors of layer `l` padded to the global rank with zeros.
pub(crate) fn padded(
    global: &GlobalState,
    l: &crate::LayerSpec,
    trained: &NamedTensors,
) -> Result<(Tensor, Tensor), AggregateError> {
    let r = global.layout.rank;
    let a = trained.require(&l.a_name())?.zero_padded(r, l.inp)?;
    let b = trained.require(&l.b_name())?.zero_padded(l.out, r)?;
    Ok((a, b))
}

impl AggregationRule for ZeroPad {
    fn kind(&self) -> RuleKind {
        RuleKind::ZeroPad
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
        partial_start(global, client)
    }

    /// Implements the padded upload `pad(A_i) − A`, `pad(B_i) − B`, `head_i − head`: the mean plus
    /// the global state is the plain mean of the padded adapters.
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
        for (i, l) in global.layout.layers.iter().enumerate() {
            let (a, b) = padded(global, l, trained)?;
            p.push(&a.sub(global.a(i)?)?)?;
            p.push(&b.sub(global.b(i)?)?)?;
        }
        p.push_head_deltas(&global.layout, start, trained)?;
        p.finish(client.weight, 0)
    }

    /// Implements `A' = Σ p_i pad(A_i)`, `B' = Σ p_i pad(B_i)`, `head' = Σ p_i head_i`.
    fn decode(&self, global: &GlobalState, mean: &[f32]) -> Result<GlobalState, AggregateError> {
        add_mean_deltas(global, &self.manifest(global), mean)
    }
}
