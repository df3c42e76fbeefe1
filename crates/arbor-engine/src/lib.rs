//! Arbor's engine: requests, the step scheduler and the sampler.
//!
//! [`Engine`] owns a model, its KV pool and slot allocator; callers add [`Request`]s and call
//! [`Engine::step`] (or [`Engine::generate`] for one request) to advance every running request
//! by one batched forward pass. A server runs the engine on its own thread and talks to it
//! through channels.

mod engine;
mod error;
pub mod sampler;
pub mod stop;

pub use engine::{
    panic_message, Completion, Engine, EngineConfig, Event, FaultInjector, FaultSite, FinishReason,
    PrefixCacheMode, Request, RequestId, SlotUsage, StepStats, StopConditions, Timing,
    TokenLogprob, Usage, DEFAULT_MAX_BATCH_TOKENS,
};
pub use error::EngineError;
pub use sampler::{Sampler, SamplingParams};
