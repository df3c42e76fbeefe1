use arbor_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the prompt is empty")]
    EmptyPrompt,
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
    InvalidParams(String),
    #[error("the request failed: {0}")]
    RequestFailed(String),
    #[error("unknown request {0}")]
    UnknownRequest(u64),
}
