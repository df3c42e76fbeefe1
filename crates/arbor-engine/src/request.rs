//! What callers exchange with the engine: a [`Request`] in, [`Event`]s out, a [`Completion`]
//! for a whole request.

use std::sync::Arc;
use std::time::Instant;

use arbor_cache::Namespace;
use arbor_model::{SamplingParams, TokenLogprob};

pub type RequestId = u64;

#[derive(Debug, Clone, Default)]
pub struct StopConditions {
    /// Tokens to generate at most (clipped to what the context leaves).
    pub max_tokens: usize,
    /// Generate at least this many tokens before a stop token may end the request.
    pub min_tokens: usize,
    /// Extra stop tokens, besides the model's EOS/end-of-turn tokens. Shared, not copied, by
    /// the choices of one API call.
    pub stop_token_ids: Arc<[u32]>,
    pub stop_strings: Arc<[String]>,
    /// Do not stop at the model's EOS/end-of-turn tokens.
    pub ignore_eos: bool,
}

/// A constraint on what a sequence may generate (structured output): it says which tokens may
/// come next and follows the tokens drawn. The engine asks it before every sampling step of
/// its sequence and feeds it every token.
pub trait Constraint: Send + std::fmt::Debug {
    /// Writes the tokens allowed next into `allowed` (bit `t % 32` of word `t / 32`; the
    /// vector is the vocabulary's size in words, zeroed). An error fails the request.
    fn allowed(&mut self, allowed: &mut [u32]) -> Result<(), String>;
    /// Takes the token drawn. An error (a token the constraint did not allow) fails the
    /// request.
    fn accept(&mut self, token: u32) -> Result<(), String>;
    /// Nothing may follow: the request ends as stopped.
    fn is_finished(&self) -> bool;
}

/// Makes a request's constraints: one per sequence (each choice of `n` follows its own).
pub trait ConstraintFactory: Send + Sync + std::fmt::Debug {
    fn start(&self) -> Box<dyn Constraint>;
}

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Cache namespace: requests of different namespaces never share KV (tenants, adapters).
    pub namespace: Namespace,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// Structured output: what the generated tokens must follow (`None`: anything).
    pub constraint: Option<std::sync::Arc<dyn ConstraintFactory>>,
}

impl Request {
    /// A request with default sampling (greedy) and no stop strings, in namespace 0.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            namespace: 0,
            sampling: SamplingParams::default(),
            stop: StopConditions {
                max_tokens,
                ..Default::default()
            },
            logprobs: None,
            constraint: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// max_tokens or the end of the context.
    Length,
    /// Cancelled by the caller.
    Cancelled,
    /// Processing this request failed (the event's `error` says why); others go on.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the cache rather than being computed.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct Timing {
    pub queued_at: Instant,
    pub first_token_at: Option<Instant>,
    pub finished_at: Option<Instant>,
}

impl Timing {
    /// Queueing plus prefill: until the first token (or the end, if none came).
    pub fn time_to_first_token(&self) -> f64 {
        let first = self
            .first_token_at
            .or(self.finished_at)
            .unwrap_or(self.queued_at);
        (first - self.queued_at).as_secs_f64()
    }

    /// From the first token to the end.
    pub fn decode_time(&self) -> f64 {
        match (self.first_token_at, self.finished_at) {
            (Some(first), Some(end)) => (end - first).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub fn total_time(&self) -> f64 {
        self.finished_at
            .map_or(0.0, |end| (end - self.queued_at).as_secs_f64())
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// A token was generated; `text` is what it adds to the output (may be empty while a
    /// multi-byte character or a possible stop string is incomplete).
    Token {
        id: RequestId,
        token: u32,
        text: String,
        /// When the request asked for log-probabilities.
        logprob: Option<TokenLogprob>,
    },
    Finished {
        id: RequestId,
        reason: FinishReason,
        /// Text released at the end (held back until now).
        text: String,
        usage: Usage,
        timing: Timing,
        /// Why the request failed, with [`FinishReason::Error`].
        error: Option<String>,
    },
}

/// A finished request's output.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Generated tokens, including a final stop token if one ended the request.
    pub tokens: Vec<u32>,
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
    pub timing: Timing,
}

impl Completion {
    /// Tokens per second after the first one (0 when fewer than two tokens came).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let t = self.timing.decode_time();
        let n = self.usage.completion_tokens.saturating_sub(1);
        if t > 0.0 {
            n as f64 / t
        } else {
            0.0
        }
    }

    /// Prompt tokens actually computed (not cached) per second of time to first token.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        let t = self.timing.time_to_first_token();
        let n = self.usage.prompt_tokens - self.usage.cached_tokens;
        if t > 0.0 {
            n as f64 / t
        } else {
            0.0
        }
    }
}
