//! fedlora-train: local LoRA fine-tuning and evaluation for federated clients, on candle.
//!
//! - [`lora`]: LoRA layers (`W + (alpha/r)·B·A`, frozen base).
//! - [`llama`], [`bert`]: differentiable models we own (the stock candle models cut gradients).
//! - [`gguf`], [`tokenizer`]: SmolLM2 from a llama.cpp GGUF, BPE and WordPiece tokenizers.
//! - [`data`]: built-in tasks (SpamAssassin, GSM-Symbolic) and user JSONL.
//! - [`trainer`], [`eval`], [`generate`]: AdamW loop, accuracy / exact match / loss, greedy decoding.
//! - [`adapter`]: PEFT-compatible adapter files, and the flat vector a client uploads.
//!
//! [`run`] ties them together for the CLI and for federated clients:
//!
//! ```no_run
//! use fedlora_train::candle_device::Device;
//! use fedlora_train::run::{run_client, ClientJob, EvalConfig, TaskSpec};
//! use fedlora_train::{adapter, LoraConfig, TrainConfig};
//! # fn main() -> fedlora_train::Result<()> {
//! let threads = fedlora_train::threads::configure_threads(None);
//! let job = ClientJob {
//!     task: TaskSpec::Spam,
//!     model: None,
//!     lora: LoraConfig::default(),
//!     train: TrainConfig { steps: 50, batch_size: 16, ..TrainConfig::default() },
//!     max_len: 128,
//!     train_examples: None,
//!     eval_examples: Some(400),
//!     eval: EvalConfig::default(),
//!     eval_before: false,
//!     loss_on_prompt: false,
//! };
//! let (model, report) = run_client(&job, threads, &Device::Cpu)?;
//! let named = adapter::adapter_tensors(&model); // [(PEFT name, tensor)] in a stable order
//! let flat: Vec<f32> = adapter::flatten(&named)?; // what secure aggregation sums
//! let back = adapter::unflatten(&named, &flat, &Device::Cpu)?;
//! # let _ = (report, back);
//! # Ok(())
//! # }
//! ```

pub mod adapter;
pub mod bert;
pub mod data;
pub mod error;
pub mod eval;
pub mod federated;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod model;
pub mod ops;
pub mod progress;
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
