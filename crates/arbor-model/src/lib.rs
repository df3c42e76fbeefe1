//! Arbor's model layer: everything that turns token ids into logits.
//!
//! - [`load_model`] reads a GGUF file ([`gguf`]) or a Hugging Face folder ([`hf`]) into a
//!   [`LoadedModel`]: the [`Llama`] weights, its [`Tokenizer`] and [`ChatTemplate`].
//! - [`KvPool`] holds K/V per token slot; [`Llama::forward`] runs one batched step of any mix of
//!   prefill chunks and decodes, reading each sequence's K/V through its slot list
//!   ([`attention`]).
//! - [`runner`]: the seam the engine drives. A [`ModelRunner`] runs a step of token ids over
//!   KV slot ids on its own device and samples it ([`sampling`]); [`open`] makes one for a model
//!   file and a device (CPU, or CUDA with the `cuda` feature: [`cuda`]).
//! - [`linear`] picks the matmul kernel by weight format; [`qmatmul`] is Arbor's batch-invariant
//!   kernel for 32-wide GGUF blocks.

pub mod attention;
pub mod chat;
mod columns;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dense;
pub mod diagnostics;
pub mod error;
pub mod fastmath;
pub mod gguf;
pub mod hf;
pub mod kv_pool;
pub mod linear;
pub mod llama;
pub mod qmatmul;
pub mod rope;
pub mod runner;
pub mod sampling;
pub mod tokenizer;

use std::path::Path;

pub use candle_core::Device;
pub use chat::{ChatMessage, ChatTemplate};
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use kv_pool::KvPool;
pub use llama::{Llama, LogitsWanted, SeqStep};
pub use runner::{
    open, panic_message, DeviceSpec, FaultInjector, FaultSite, ModelRunner, OpenedModel,
    RunnerOptions, Sampled, SeqId, SequenceSampling, StepOutput, StepRow,
};
pub use sampling::{InvalidParam, Sampler, SamplingParams, TokenLogprob};
pub use tokenizer::{IncrementalDecoder, Tokenizer};

/// `MemAvailable` from /proc/meminfo (Linux); `None` elsewhere.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A model ready to run, with the text side that belongs to it.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

/// Loads a GGUF file or a Hugging Face folder.
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    let started = std::time::Instant::now();
    let loaded = if path.is_dir() {
        hf::load_hf(path, device)?
    } else {
        gguf::load_gguf(path, device)?
    };
    let c = &loaded.model.config;
    tracing::info!(
        arch = %c.architecture, layers = c.num_layers, hidden = c.hidden_size,
        heads = c.num_heads, kv_heads = c.num_kv_heads, vocab = c.vocab_size,
        context = c.max_position_embeddings,
        "loaded {} in {:.2}s", path.display(), started.elapsed().as_secs_f64()
    );
    Ok(loaded)
}
