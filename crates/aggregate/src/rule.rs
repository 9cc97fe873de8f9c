//! What every aggregation rule provides: the start point of a client's local training, the
//! manifest of what it uploads (every value to be summed by secure aggregation), its upload, and
//! how the server turns the revealed weighted mean into the next global state.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::layout::AdapterLayout;
use crate::state::GlobalState;
use crate::tensor::{NamedTensors, Tensor};
use crate::AggregateError;

/// The rules, by their command-line names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleKind {
    /// A and B averaged separately (FedIT, OpenFedLLM; the merge-count study's rule).
    FedAvg,
    /// A frozen at a public seed, B averaged (FFA-LoRA): exact.
    FrozenA,
    /// The product `s·B·A` averaged and merged into the frozen weights (FedEx-LoRA / FLoRA): exact.
    Exact,
    /// Only A averaged; B and the head stay with each client (FedSA-LoRA).
    ShareA,
    /// Heterogeneous ranks, zero-padded to the largest and averaged (HetLoRA's baseline).
    ZeroPad,
    /// Heterogeneous ranks, each rank partition averaged over the clients holding it (raFLoRA).
    RankPartitioned,
    /// B trained and averaged in even rounds, A in odd rounds (RoLoRA): exact.
    Alternate,
}

impl RuleKind {
    /// Every rule.
    pub const ALL: [RuleKind; 7] = [
        RuleKind::FedAvg,
        RuleKind::FrozenA,
        RuleKind::Exact,
        RuleKind::ShareA,
        RuleKind::ZeroPad,
        RuleKind::RankPartitioned,
        RuleKind::Alternate,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            RuleKind::FedAvg => "fedavg",
            RuleKind::FrozenA => "frozen-a",
            RuleKind::Exact => "exact",
            RuleKind::ShareA => "share-a",
            RuleKind::ZeroPad => "zero-pad",
            RuleKind::RankPartitioned => "rank-partitioned",
            RuleKind::Alternate => "alternate",
        }
    }

    /// Whether clients may have different ranks under this rule.
    pub fn uses_ranks(self) -> bool {
        matches!(self, RuleKind::ZeroPad | RuleKind::RankPartitioned)
    }

    /// Whether the global model is the model (false for `share-a`, where each client's own B and
    /// head complete it and evaluation is per client).
    pub fn has_global_model(self) -> bool {
        self != RuleKind::ShareA
    }

    /// The implementation.
    pub fn rule(self) -> &'static dyn AggregationRule {
        use crate::rules::*;
        match self {
            RuleKind::FedAvg => &fedavg::FedAvg,
            RuleKind::FrozenA => &frozen_a::FrozenA,
            RuleKind::Exact => &exact::Exact,
            RuleKind::ShareA => &share_a::ShareA,
            RuleKind::ZeroPad => &zero_pad::ZeroPad,
            RuleKind::RankPartitioned => &rank_partitioned::RankPartitioned,
            RuleKind::Alternate => &alternate::Alternate,
        }
    }
}

impl std::fmt::Display for RuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RuleKind {
    type Err = AggregateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RuleKind::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| AggregateError::UnknownRule(s.to_string()))
    }
}

/// Which tensors a client trains this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trainable {
    /// The `A` factors.
    pub a: bool,
    /// The `B` factors.
    pub b: bool,
    /// The head.
    pub head: bool,
}

impl Trainable {
    /// Everything.
    pub const ALL: Trainable = Trainable {
        a: true,
        b: true,
        head: true,
    };
}

/// A client's public profile: its rank (public) and its weight (its number of training examples,
/// summed securely).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientProfile {
    /// LoRA rank, one of the layout's partition bounds.
    pub rank: usize,
    /// Weight in the mean, `1..=weight_bound`.
    pub weight: u32,
}

/// Where a client's local training starts.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientStart {
    /// The client's rank.
    pub rank: usize,
    /// The LoRA scale (the layout's `alpha / rank`, the same for every client).
    pub scale: f64,
    /// `A (rank x in)` and `B (out x rank)` per layer, and the head, by their names.
    pub adapter: NamedTensors,
    /// Additions to the frozen base weights (`exact`: the merged updates so far), by
    /// [`crate::LayerSpec::delta_name`]; empty for the other rules.
    pub base_delta: NamedTensors,
    /// What to train.
    pub train: Trainable,
}

/// One value range of an upload, named: the public manifest of what is summed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSpec {
    /// Name (a tensor name, or `fedlora.partition_weights`).
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
}

impl UploadSpec {
    /// Values in this range.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Name of the per-partition weight words of `rank-partitioned` uploads.
pub const PARTITION_WEIGHTS: &str = "fedlora.partition_weights";

/// What a client contributes to one round's secure sum. Zeroized on drop: it is derived from the
/// client's private adapter.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Upload {
    /// Values in manifest order; secure aggregation multiplies them by `weight` before summing.
    pub values: Vec<f32>,
    /// The client's weight.
    pub weight: u32,
    /// Trailing values that are public weights (rank-partition indicators), not private values:
    /// they take no clipping and no noise.
    pub public_tail: usize,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("values", &format_args!("<{} redacted>", self.values.len()))
            .field("weight", &self.weight)
            .field("public_tail", &self.public_tail)
            .finish()
    }
}

impl Upload {
    /// The private part (everything but the public tail), e.g. for L2 clipping.
    pub fn private_values_mut(&mut self) -> &mut [f32] {
        let n = self.values.len() - self.public_tail;
        &mut self.values[..n]
    }
}

/// An aggregation rule. Every method is pure: the same inputs give the same outputs on every
/// party, which is what lets the in-process simulator and the networked service share them.
pub trait AggregationRule: Sync {
    /// Which rule this is.
    fn kind(&self) -> RuleKind;

    /// What clients train in the round that starts from `global`.
    fn trainable(&self, global: &GlobalState) -> Trainable;

    /// The public manifest of the round that starts from `global`: the same for every client.
    fn manifest(&self, global: &GlobalState) -> Vec<UploadSpec>;

    /// Where `client` starts. `local` is what this client kept from its previous round
    /// ([`AggregationRule::keep_local`]), if anything.
    fn start(
        &self,
        global: &GlobalState,
        client: &ClientProfile,
        local: Option<&NamedTensors>,
    ) -> Result<ClientStart, AggregateError>;

    /// The client's upload after training from `start` to `trained` (same names and shapes as
    /// `start.adapter`).
    fn encode(
        &self,
        global: &GlobalState,
        start: &ClientStart,
        trained: &NamedTensors,
        client: &ClientProfile,
    ) -> Result<Upload, AggregateError>;

    /// The next global state from the revealed weighted mean of the survivors' uploads (in
    /// manifest order, the layout of [`AggregationRule::manifest`]).
    fn decode(&self, global: &GlobalState, mean: &[f32]) -> Result<GlobalState, AggregateError>;

    /// What the client keeps for its next round (`share-a`: its B factors and head).
    fn keep_local(&self, _trained: &NamedTensors) -> Option<NamedTensors> {
        None
    }
}

/// Total values of a manifest.
pub fn manifest_values(manifest: &[UploadSpec]) -> usize {
    manifest.iter().map(UploadSpec::len).sum()
}

/// Builds an upload in manifest order, checking every range's size.
pub(crate) struct Packer<'m> {
    manifest: &'m [UploadSpec],
    values: Vec<f32>,
    next: usize,
}

impl<'m> Packer<'m> {
    pub(crate) fn new(manifest: &'m [UploadSpec]) -> Self {
        Packer {
            manifest,
            values: Vec::with_capacity(manifest_values(manifest)),
            next: 0,
        }
    }

    /// Appends the next range of the manifest.
    pub(crate) fn push(&mut self, t: &Tensor) -> Result<(), AggregateError> {
        let spec = self
            .manifest
            .get(self.next)
            .ok_or_else(|| AggregateError::Shape("more tensors than the manifest lists".into()))?;
        if spec.shape != t.shape {
            return Err(AggregateError::Shape(format!(
                "{} has shape {:?}, the manifest says {:?}",
                spec.name, t.shape, spec.shape
            )));
        }
        self.values.extend_from_slice(&t.data);
        self.next += 1;
        Ok(())
    }

    /// Appends `head_i − head` for every head tensor of the layout.
    pub(crate) fn push_head_deltas(
        &mut self,
        layout: &AdapterLayout,
        start: &ClientStart,
        trained: &NamedTensors,
    ) -> Result<(), AggregateError> {
        for h in &layout.head {
            self.push(
                &trained
                    .require(&h.name)?
                    .sub(start.adapter.require(&h.name)?)?,
            )?;
        }
        Ok(())
    }

    pub(crate) fn finish(self, weight: u32, public_tail: usize) -> Result<Upload, AggregateError> {
        if self.next != self.manifest.len() {
            return Err(AggregateError::Shape(format!(
                "upload has {} of the manifest's {} tensors",
                self.next,
                self.manifest.len()
            )));
        }
        Ok(Upload {
            values: self.values,
            weight,
            public_tail,
        })
    }
}

/// Reads a revealed mean back by manifest ranges.
pub(crate) struct Unpacker<'a> {
    manifest: &'a [UploadSpec],
    mean: &'a [f32],
    next: usize,
    at: usize,
}

impl<'a> Unpacker<'a> {
    pub(crate) fn new(manifest: &'a [UploadSpec], mean: &'a [f32]) -> Result<Self, AggregateError> {
        let want = manifest_values(manifest);
        if mean.len() != want {
            return Err(AggregateError::Shape(format!(
                "the revealed mean has {} values, the manifest needs {want}",
                mean.len()
            )));
        }
        if let Some(i) = mean.iter().position(|x| !x.is_finite()) {
            return Err(AggregateError::NonFinite(format!(
                "revealed mean value {i}"
            )));
        }
        Ok(Unpacker {
            manifest,
            mean,
            next: 0,
            at: 0,
        })
    }

    /// The next range, as a tensor.
    pub(crate) fn next_tensor(&mut self) -> Result<Tensor, AggregateError> {
        let spec = self
            .manifest
            .get(self.next)
            .ok_or_else(|| AggregateError::Shape("read past the manifest".into()))?;
        let n = spec.len();
        let t = Tensor::new(&spec.shape, self.mean[self.at..self.at + n].to_vec())?;
        self.next += 1;
        self.at += n;
        Ok(t)
    }
}

impl Unpacker<'_> {
    /// Reads the head's mean updates (the next ranges) into `next`.
    pub(crate) fn add_head_means(
        &mut self,
        layout: &AdapterLayout,
        next: &mut GlobalState,
    ) -> Result<(), AggregateError> {
        for h in &layout.head {
            let d = self.next_tensor()?;
            next.tensors
                .get_mut(&h.name)
                .ok_or_else(|| AggregateError::MissingTensor(h.name.clone()))?
                .add_assign(&d)?;
        }
        Ok(())
    }
}

/// The manifest entries of every layer's `A`, then `B` or both, then the head — the shared
/// skeleton of most rules.
pub(crate) fn factor_manifest(
    layout: &AdapterLayout,
    with_a: bool,
    with_b: bool,
    with_head: bool,
) -> Vec<UploadSpec> {
    let mut m = Vec::new();
    for l in &layout.layers {
        if with_a {
            m.push(UploadSpec {
                name: l.a_name(),
                shape: vec![layout.rank, l.inp],
            });
        }
        if with_b {
            m.push(UploadSpec {
                name: l.b_name(),
                shape: vec![l.out, layout.rank],
            });
        }
    }
    if with_head {
        m.extend(layout.head.iter().map(|h| UploadSpec {
            name: h.name.clone(),
            shape: h.shape.clone(),
        }));
    }
    m
}

/// A full-rank start from the global factors and head.
pub(crate) fn full_rank_start(
    global: &GlobalState,
    client: &ClientProfile,
    train: Trainable,
) -> Result<ClientStart, AggregateError> {
    if client.rank != global.layout.rank {
        return Err(AggregateError::RankMismatch {
            rank: client.rank,
            allowed: vec![global.layout.rank],
        });
    }
    let mut adapter = NamedTensors::new();
    for (i, l) in global.layout.layers.iter().enumerate() {
        adapter.insert(l.a_name(), global.a(i)?.clone());
        adapter.insert(l.b_name(), global.b(i)?.clone());
    }
    for (n, t) in global.head()?.iter() {
        adapter.insert(n, t.clone());
    }
    Ok(ClientStart {
        rank: client.rank,
        scale: global.layout.scale(),
        adapter,
        base_delta: NamedTensors::new(),
        train,
    })
}

/// Checks that `trained` has exactly the tensors of `start`, with the same shapes and finite
/// values: a diverged local training is refused here, before anything is uploaded.
pub(crate) fn check_trained(
    start: &ClientStart,
    trained: &NamedTensors,
) -> Result<(), AggregateError> {
    for (name, t) in start.adapter.iter() {
        let got = trained.require(name)?;
        if got.shape != t.shape {
            return Err(AggregateError::Shape(format!(
                "trained {name} has shape {:?}, started as {:?}",
                got.shape, t.shape
            )));
        }
        if got.data.iter().any(|x| !x.is_finite()) {
            return Err(AggregateError::NonFinite(format!("trained {name}")));
        }
    }
    if trained.len() != start.adapter.len() {
        return Err(AggregateError::Shape(format!(
            "trained adapter has {} tensors, started with {}",
            trained.len(),
            start.adapter.len()
        )));
    }
    Ok(())
}

/// Packs `trained - start` for the manifest's names (the update, so that `mean + global` is the
/// weighted mean of the clients' adapters and DP clips the update, not the adapter).
pub(crate) fn pack_deltas(
    manifest: &[UploadSpec],
    start: &ClientStart,
    trained: &NamedTensors,
    weight: u32,
) -> Result<Upload, AggregateError> {
    check_trained(start, trained)?;
    let mut p = Packer::new(manifest);
    for spec in manifest {
        let d = trained
            .require(&spec.name)?
            .sub(start.adapter.require(&spec.name)?)?;
        p.push(&d)?;
    }
    p.finish(weight, 0)
}

/// The next state: `global` with every manifest tensor increased by its mean update.
pub(crate) fn add_mean_deltas(
    global: &GlobalState,
    manifest: &[UploadSpec],
    mean: &[f32],
) -> Result<GlobalState, AggregateError> {
    let mut next = global.clone();
    next.round += 1;
    let mut u = Unpacker::new(manifest, mean)?;
    for spec in manifest {
        let d = u.next_tensor()?;
        next.tensors
            .get_mut(&spec.name)
            .ok_or_else(|| AggregateError::MissingTensor(spec.name.clone()))?
            .add_assign(&d)?;
    }
    Ok(next)
}
