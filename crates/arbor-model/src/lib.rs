//! Arbor's model layer: everything that turns token ids into sampled tokens. The folders
//! are the architecture, each importing only from those listed before it:
//!
//! - [`error`], [`config`] (a model's shape), [`step`] (one forward step's input, the same for
//!   every backend), [`rope`] (positions): shared by everything below.
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
pub mod diagnostics;
pub mod error;
pub mod rope;
pub mod runner;
pub mod sampling;
pub mod step;
pub mod text;
pub mod weights;

use std::path::Path;

pub use candle_core::Device;
pub use config::ModelConfig;
pub use cpu::kv_pool::KvPool;
pub use cpu::llama::Llama;
pub use error::{ModelError, Result};
pub use runner::{
    open, panic_message, DeviceSpec, FaultInjector, FaultSite, ModelRunner, OpenedModel,
    RunnerOptions, Sampled, SeqId, SequenceSampling, StepOutput, StepRow,
};
pub use sampling::{InvalidParam, Sampler, SamplingParams, TokenLogprob};
pub use step::{LogitsWanted, SeqStep};
pub use text::chat::{ChatMessage, ChatTemplate};
pub use text::tokenizer::{IncrementalDecoder, Tokenizer};

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
        // Configuration and tokenizer first: a mismatch is reported before the weights load.
        let (config, tokenizer, chat_template) = weights::hf::open_hf(path)?;
        let mut src = weights::hf::SafetensorsWeights::load(path, config, device)?;
        LoadedModel {
            model: cpu::load::build(&mut src, device)?,
            tokenizer,
            chat_template,
        }
    } else {
        let mut file = weights::gguf::open_gguf(path)?;
        LoadedModel {
            model: cpu::load::build(&mut file, device)?,
            tokenizer: file.tokenizer,
            chat_template: file.chat_template,
        }
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
