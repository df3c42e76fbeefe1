//! Arbor's engine: requests in, events out, one batched step at a time over a model runner.
//!
//! - [`request`]: what callers exchange with the engine ([`Request`], [`Event`], [`Completion`]).
//! - [`scheduler`](crate::scheduler): pure planning: admission (cache-aware), the token
//!   budget, preemption, and the step plan, over the KV manager's slots.
//! - `output`: a sampled token's meaning for its request (detokenizing, stop tokens and
//!   strings, length) and the events.
//! - [`Engine`]: the loop that ties them to an `arbor_model::ModelRunner`, which runs the
//!   forward pass and samples on its own device.
//!
//! A server runs the engine on its own thread and talks to it through channels.

mod engine;
mod error;
mod output;
pub mod request;
mod scheduler;
pub mod step_cost;
pub mod stop;

pub use arbor_cache::KvEvent;
pub use arbor_model::runner::fake;
pub use arbor_model::{
    panic_message, FaultInjector, FaultSite, Sampler, SamplingParams, TokenLogprob,
};
pub use engine::{
    Engine, EngineConfig, Overlap, PrefixCacheMode, SlotUsage, StepStats, DEFAULT_MAX_BATCH_TOKENS,
};
pub use error::EngineError;
pub use request::{
    Completion, Constraint, ConstraintFactory, Event, FinishReason, Request, RequestId,
    StopConditions, Timing, Usage,
};
