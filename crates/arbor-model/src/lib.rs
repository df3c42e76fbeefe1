//! Arbor's model layer: everything that turns token ids into sampled tokens. The folders
//! are the architecture, each importing only from those listed before it:
//!
//! - [`error`], [`config`] (a model's shape), [`step`] (one forward step's input, the same for
//!   every backend), [`rope`] (positions), [`options`] (backend options): shared by everything
//!   below; [`parallel`] (how tensor parallelism cuts a model, the host all-reduce).
//! - [`text`]: tokenizer, incremental detokenizer, chat templates.
//! - [`weights`]: model files (GGUF, Hugging Face folders) and their configuration, tokenizer
//!   and tensors.
//! - [`cpu`]: the CPU backend ([`Llama`] over a [`KvPool`], Arbor's batch-invariant kernels);
//!   [`load_model`] builds it from a model file.
//! - `cuda` (feature `cuda`): the GPU backend, its kernels and loader.
//! - [`sampling`]: the one definition of how logits become a token.
//! - [`runner`]: the seam the engine drives. A [`ModelRunner`] runs a step of token ids over
//!   KV slot ids on its own device and samples it; [`open`] makes one for a model file and a
//!   device.
//! - [`diagnostics`]: GPU kernel checks, the linear-layer benchmark and the CUDA profile.

pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device_sampling;
pub mod diagnostics;
pub mod error;
pub mod options;
pub mod parallel;
pub mod rope;
pub mod runner;
pub mod sampling;
pub mod step;
pub mod text;
pub mod weights;

pub use candle_core::Device;
pub use config::ModelConfig;
pub use cpu::kv_pool::KvPool;
pub use cpu::llama::Llama;
pub use error::{ModelError, Result};
pub use runner::{
    open, panic_message, DeviceSpec, FaultInjector, FaultSite, Launched, ModelRunner, OpenedModel,
    RowOutcome, RunnerOptions, Sampled, SeqId, SequenceSampling, StepOutput, StepRow,
};
pub use sampling::{InvalidParam, Sampler, SamplingParams, TokenLogprob};
pub use step::{LogitsWanted, SeqStep};
pub use text::chat::{ChatMessage, ChatTemplate};
pub use text::tokenizer::{IncrementalDecoder, Tokenizer};

pub use cpu::available_memory_bytes;
pub use cpu::load::{load_model, LoadedModel};
