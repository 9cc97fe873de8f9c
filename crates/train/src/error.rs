//! The one error type of the training crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading, training, evaluating or saving.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed (shape mismatch, unsupported device, ...).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, with the path.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON document was malformed.
    #[error("{context}: {source}")]
    Json {
        /// What we were parsing, with the path.
        context: String,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A model or data set that is fetched by `deploy/fetch-assets.sh` is not there.
    #[error("missing asset {what} at {}: run `deploy/fetch-assets.sh` (or set FEDLORA_ASSETS) first", path.display())]
    MissingAsset {
        /// The asset, in words.
        what: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A model file holds something we cannot use (unknown architecture, missing tensor, ...).
    #[error("bad model: {0}")]
    BadModel(String),
    /// A user-provided value is out of range or inconsistent.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Training diverged (a non-finite loss).
    #[error("training diverged: {0}")]
    Diverged(String),
}

/// Result alias of the crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    /// An [`TrainError::Io`] error with the path in its context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TrainError::Io {
            context: context.into(),
            source,
        }
    }

    /// A [`TrainError::Json`] error with the path in its context.
    pub fn json(context: impl Into<String>, source: serde_json::Error) -> Self {
        TrainError::Json {
            context: context.into(),
            source,
        }
    }

    /// Shorthand for [`TrainError::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        TrainError::InvalidInput(msg.into())
    }
}
