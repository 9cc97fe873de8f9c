//! fedlora-aggregate: LoRA aggregation rules as secure sums.
//!
//! A rule says what a client uploads — a public manifest of named value ranges that secure
//! aggregation sums, weighted by the client's example count — and how the server turns the
//! revealed weighted mean into the next global state. Nothing per client reaches the server: every
//! rule here is computable from the mean alone. Every trainable tensor counts, a classifier head
//! included (averaged plainly in the same sum).
//!
//! | rule | uploads | exact? | paper |
//! |---|---|---|---|
//! | [`rules::fedavg`] | ΔA, ΔB, Δhead | no | FedIT / OpenFedLLM; the merge-count study |
//! | [`rules::frozen_a`] | ΔB, Δhead | yes | FFA-LoRA, arXiv 2403.12313 |
//! | [`rules::exact`] | s·B·A per layer, Δhead | yes | FLoRA 2409.05976 / FedEx-LoRA 2410.09432 |
//! | [`rules::share_a`] | ΔA (B, head local) | n/a | FedSA-LoRA, arXiv 2410.01463 |
//! | [`rules::zero_pad`] | padded ΔA, ΔB, Δhead | no | HetLoRA's baseline |
//! | [`rules::rank_partitioned`] | padded ΔA, ΔB, Δhead, one weight per partition | no | raFLoRA |
//! | [`rules::alternate`] | ΔB or ΔA (by round), Δhead | yes | RoLoRA, arXiv 2502.01755 |
//!
//! Uploads are updates (trained minus start), so the mean plus the global state is the weighted
//! mean of the clients' adapters, and differential privacy clips updates rather than adapters.
//!
//! This crate is pure math on named f32 tensors: no candle, no I/O, no clock. The round loop that
//! drives it lives in `fedlora-federation`; the models that train the adapters in `fedlora-train`.

pub mod init;
pub mod layout;
pub mod peft;
pub mod reference;
pub mod rule;
pub mod rules;
pub mod state;
pub mod svd;
pub mod tensor;

pub use layout::{AdapterLayout, HeadInit, HeadSpec, LayerSpec};
pub use rule::{
    manifest_values, AggregationRule, ClientProfile, ClientStart, RuleKind, Trainable, Upload,
    UploadSpec, PARTITION_WEIGHTS,
};
pub use state::GlobalState;
pub use tensor::{NamedTensors, Tensor};

/// Errors of the aggregation rules.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// The rule name is not one of [`RuleKind::ALL`].
    #[error("unknown aggregation rule `{0}` (use fedavg, frozen-a, exact, share-a, zero-pad, rank-partitioned or alternate)")]
    UnknownRule(String),
    /// The adapter layout is inconsistent.
    #[error("adapter layout: {0}")]
    Layout(String),
    /// A tensor has the wrong size or shape.
    #[error("shape: {0}")]
    Shape(String),
    /// A tensor the rule needs is absent.
    #[error("missing tensor {0}")]
    MissingTensor(String),
    /// A value is NaN or infinite (a diverged local training, a corrupt state).
    #[error("{0} holds a value that is not finite")]
    NonFinite(String),
    /// A client's rank is not one of the federation's.
    #[error("client rank {rank} is not one of the federation's ranks {allowed:?}")]
    RankMismatch {
        /// The client's rank.
        rank: usize,
        /// The allowed ranks.
        allowed: Vec<usize>,
    },
    /// A tensor the rule freezes this round was changed by local training.
    #[error("{0} is frozen this round but local training changed it")]
    FrozenChanged(String),
    /// A global state does not match its layout or rule.
    #[error("global state: {0}")]
    StateMismatch(String),
    /// An encoded global state is malformed.
    #[error("global state encoding: {0}")]
    Encoding(String),
}
