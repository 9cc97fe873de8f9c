//! fedlora-federation: the federated round loop, written once.
//!
//! A round is two steps: the client's ([`step::client_step`]: start from the global state, train
//! locally through a [`LocalTrainer`], encode the update with the aggregation rule, clip it for
//! differential privacy) and the server's ([`step::server_step`]: the next global state from the
//! revealed weighted mean). Both drivers call them: [`inprocess::Federation`] here, for N clients
//! in one process over the real SecAgg+ core, and `fedlora-service` over QUIC.
//!
//! This crate has no candle (training comes in through [`LocalTrainer`]), no async runtime and no
//! disk: checkpoints are values ([`inprocess::Checkpoint`]) that the caller stores. The in-process
//! driver reads the clock only to report where time goes.

pub mod inprocess;
pub mod privacy;
pub mod record;
pub mod step;
pub mod trainer;

pub use inprocess::{Checkpoint, Federation, FederationConfig, Progress};
pub use privacy::Privacy;
pub use record::RoundRecord;
pub use trainer::{EvalScore, EvalSplit, LocalTrainer, TrainedAdapter, TrainerError};

/// Errors of a federated run.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The run's settings are inconsistent.
    #[error("{0}")]
    Config(String),
    /// An aggregation rule refused its input.
    #[error(transparent)]
    Aggregate(#[from] fedlora_aggregate::AggregateError),
    /// The secure round's parameters could not be derived.
    #[error("secure aggregation parameters: {0}")]
    Params(#[from] fedlora_secagg::ParamError),
    /// The secure round could not be set up.
    #[error("secure aggregation round: {0}")]
    Round(#[from] fedlora_secagg::ConfigError),
    /// The protocol refused a message (a bug in the driver, surfaced).
    #[error("secure aggregation: {0}")]
    Protocol(String),
    /// Privacy settings or accounting failed.
    #[error("privacy: {0}")]
    Privacy(String),
    /// A client's local training failed.
    #[error("client {client}: local training failed: {source}")]
    Training {
        /// The client.
        client: usize,
        /// Why.
        source: TrainerError,
    },
    /// Scoring the model failed.
    #[error("evaluation failed: {0}")]
    Evaluation(String),
}
