//! fedlora-train: local LoRA fine-tuning and evaluation for federated clients, on candle.
//!
//! - [`lora`]: LoRA layers (`W + (alpha/r)·B·A`, frozen base).
//! - [`llama`], [`bert`]: differentiable models we own (the stock candle models cut gradients).
//! - [`gguf`], [`tokenizer`]: SmolLM2 from a llama.cpp GGUF, BPE and WordPiece tokenizers.
//! - [`data`]: built-in tasks (SpamAssassin, GSM-Symbolic) and user JSONL.
//! - [`trainer`], [`eval`], [`generate`]: AdamW loop, accuracy / exact match / loss, greedy decoding.
//! - [`adapter`]: PEFT-compatible adapter files, and the flat vector a client uploads.
//!
//! [`run`] ties them together for the CLI and for federated clients.

pub mod adapter;
pub mod bert;
pub mod data;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod model;
pub mod ops;
pub mod rng;
pub mod run;
pub mod threads;
pub mod tokenizer;
pub mod trainer;
pub mod weights;
pub mod xent;

pub use error::{Result, TrainError};
pub use lora::{LoraConfig, Target};
pub use model::{LoadedModel, ModelSpec};
pub use trainer::{TrainConfig, TrainReport};

/// candle's device type, so callers (the CLI) can pick CPU or CUDA without depending on candle.
pub mod candle_device {
    pub use candle_core::Device;
}
