//! Errors of model loading, tokenization and the forward pass.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file: {reason}")]
    BadGguf { path: PathBuf, reason: String },
    #[error("{path} is truncated: its tensors need {needed} bytes but the file has {actual}")]
    Truncated {
        path: PathBuf,
        needed: u64,
        actual: u64,
    },
    #[error("unsupported architecture {0:?}: Arbor runs the Llama family (llama, mistral, qwen2, smollm)")]
    UnsupportedArchitecture(String),
    #[error("unsupported weight type {dtype} for tensor {tensor}")]
    UnsupportedDType { tensor: String, dtype: String },
    #[error("missing metadata {0}")]
    MissingMetadata(String),
    #[error("invalid model config: {0}")]
    BadConfig(String),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    BadShape {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tokenizer does not match the model: {0}")]
    TokenizerMismatch(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("token id {token} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("sequence of {len} tokens exceeds the context length of {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("{0}")]
    InvalidOption(String),
    #[error("invalid batch: {0}")]
    BadBatch(String),
    /// A tensor-parallel rank failed; the group cannot run another step.
    #[error("tensor-parallel rank failed: {0}")]
    RankFailed(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
