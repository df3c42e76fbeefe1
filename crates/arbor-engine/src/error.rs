//! Why the engine refused a request or failed a step.

use arbor_model::{InvalidParam, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{param}: token id {token} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        param: &'static str,
        token: u32,
        vocab: usize,
    },
    #[error("the prompt has {prompt} tokens; with max_tokens {max_tokens} it needs {needed}, more than the model's context of {context}")]
    ContextOverflow {
        prompt: usize,
        max_tokens: usize,
        needed: usize,
        context: usize,
    },
    #[error("the request needs {needed} KV slots but the pool only has {total}; raise --kv-slots or shorten the request")]
    PoolTooSmall { needed: usize, total: usize },
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid sampling parameters: {0}")]
    InvalidParam(#[from] InvalidParam),
    #[error("the request failed: {0}")]
    RequestFailed(String),
    #[error("unknown request {0}")]
    UnknownRequest(u64),
}

impl EngineError {
    /// The request field a refusal is about (OpenAI's `param`), where there is one.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            EngineError::EmptyPrompt | EngineError::ContextOverflow { .. } => Some("prompt"),
            EngineError::TokenOutOfRange { param, .. } => Some(param),
            EngineError::PoolTooSmall { .. } => Some("max_tokens"),
            EngineError::InvalidParam(e) => Some(e.param),
            _ => None,
        }
    }
}
