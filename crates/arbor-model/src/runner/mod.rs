//! The model-runner seam: what the engine asks of a backend, and nothing more.
//!
//! The engine plans; a runner executes. Each step the engine hands [`ModelRunner::step`] one
//! [`StepRow`] per scheduled sequence (its new token ids and the KV slot ids of its whole
//! context, which fix the positions) and gets back, for every row that completes its known
//! tokens, the sampled next token and, when the request asked, its log-probabilities. The
//! runner owns everything below that line: devices, weights, the KV pool (the K/V behind each
//! slot id), workspaces and the per-sequence sampling state (seeded RNG streams, penalty
//! counts), registered once per request with [`ModelRunner::add_sequence`]. The engine deals
//! only in token ids and slot ids; which slots are free, cached or whose is decided by
//! `arbor_cache::KvManager` on the engine's side, so every runner shares one prefix policy.
//!
//! Runners here:
//! - [`HostSampledRunner`] over a [`LogitsBackend`]: a backend computes logit rows, the host
//!   samples them with [`crate::sampling`] (the one definition of sampling's semantics).
//!   [`CpuBackend`] and, with the `cuda` feature, `CudaBackend` are its backends; the fake
//!   toy model of [`fake`] is another, for testing the engine without model files.
//! - With the `cuda` feature, `CudaRunner` samples on the GPU: the logits never leave it.
//! - [`open`] loads a model file onto a [`DeviceSpec`] and returns the runner with its
//!   tokenizer and chat template: the binary has no backend-specific code.
//!
//! Where the next pieces plug in (see docs/ARCHITECTURE.md):
//! - **Sampling on the GPU** (`CudaRunner`) implements [`ModelRunner`] directly: it keeps
//!   each sequence's sampling state (registered by `add_sequence`), samples the step's logits
//!   where they are, and returns only [`Sampled`] rows. Nothing above the seam changed.
//! - **Tensor parallelism** (`parallel.rs` has the cut): [`TensorParallel`] is a
//!   [`LogitsBackend`] over N rank threads, each with its shard of the weights and of the KV
//!   pool (its KV heads of every slot, so a slot id names the same token on every rank and
//!   the engine's slot ids need no change; `kv_slots` is the per-rank count), summing
//!   partial hidden states through the group's all-reduce (on the CPU a host all-reduce;
//!   on GPUs NCCL, `cuda_tp.rs`). Sampling happens once: on the host from the joined logits
//!   (CPU ranks), or on rank 0's GPU from the gathered logits (`CudaTensorParallelRunner`).

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_tp;
pub mod fake;
mod host;
mod open;
mod tp;

use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::sampling::{SamplingParams, TokenLogprob};
use crate::LogitsWanted;

pub use cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use cuda::{CudaBackend, CudaRunner};
pub use host::{HostSampledRunner, LogitsBackend};
pub use open::{
    open, CpuKernels, CudaOptions, DeviceSpec, GgufWeights, KvCacheDtype, LoadFormat, OpenedModel,
    RunnerOptions, DEFAULT_DECODE_STAGE_KEYS,
};
pub use tp::TensorParallel;

/// The engine's name for a sequence (its request id); the runner keys sampling state by it.
pub type SeqId = u64;

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct StepRow<'a> {
    pub seq: SeqId,
    /// Tokens to run now: a prefill chunk, or the last sampled token of a decode.
    pub tokens: &'a [u32],
    /// KV slots of the sequence's whole context after this step: the computed prefix, then one
    /// per new token. The new tokens' positions are `slots.len() - tokens.len() ..
    /// slots.len()`; the runner writes their K/V into the last `tokens.len()` slots.
    pub slots: &'a [u32],
    /// Whether the last new token is the last known one, so the next token is sampled (a
    /// prefill chunk that is not the prompt's last computes K/V only).
    pub sample: bool,
    /// When sampling under a constraint (structured output): the tokens that may be drawn,
    /// bit `t % 32` of word `t / 32` for token `t`. Every other token is banned, as a stop
    /// token before `min_tokens` is; log-probabilities still describe the raw distribution.
    pub allowed: Option<&'a [u32]>,
}

/// Whether `token` is set in an [`StepRow::allowed`] mask.
pub fn mask_allows(mask: &[u32], token: u32) -> bool {
    mask.get(token as usize / 32)
        .is_some_and(|w| w >> (token % 32) & 1 == 1)
}

impl StepRow<'_> {
    /// The forward pass's view of the row: logits for its last token when it samples.
    pub fn seq_step(&self) -> crate::SeqStep<'_> {
        crate::SeqStep {
            tokens: self.tokens,
            slots: self.slots,
            logits: if self.sample {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            },
        }
    }
}

/// A sampled next token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// When the sequence asked for log-probabilities.
    pub logprob: Option<TokenLogprob>,
}

/// A sampling row's outcome: its token, or why that one sequence failed (the others of the
/// step go on).
pub type RowOutcome = std::result::Result<Sampled, String>;

/// What a step gave back.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// One entry per row with `sample` set, in row order.
    pub sampled: Vec<RowOutcome>,
    /// Seconds of the forward pass alone (the rest of the step is sampling), for benchmarks.
    pub forward_seconds: f64,
}

/// What [`ModelRunner::launch`] did with a step.
#[derive(Debug)]
pub enum Launched {
    /// The step ran to the end (a runner whose steps wait for their device).
    Done(StepOutput),
    /// The step is running on the device; [`ModelRunner::collect`] waits for it and returns
    /// its output.
    Running,
}

/// How a sequence's next tokens are drawn, registered once per request.
#[derive(Debug, Clone)]
pub struct SequenceSampling {
    pub params: SamplingParams,
    /// The prompt: the repetition penalty counts its tokens as seen.
    pub prompt: Arc<[u32]>,
    /// Until this many tokens are generated, `banned_before_min` are never sampled.
    pub min_tokens: usize,
    /// Sorted token ids (the stop tokens, so that `min_tokens` holds).
    pub banned_before_min: Arc<[u32]>,
    /// Report each sampled token's log-probability and this many top alternatives.
    pub logprobs: Option<usize>,
}

/// A model that runs steps over its own KV pool and samples them.
///
/// Contract: a sequence is added before its first row and removed once (at its end, whatever
/// the reason); it stays registered while it waits after a preemption, so its RNG stream and
/// penalty counts continue where they stopped. Rows of one step name distinct sequences; a
/// row's slots are the sequence's own or cached prefixes locked for it (the caller's
/// `KvManager` guarantees that no two sequences write one slot). An `Err` from `step` means
/// the runner can no longer be trusted (a device fault): the engine fails. A problem with one
/// sequence comes back as that row's `Err`.
pub trait ModelRunner: Send {
    fn config(&self) -> &ModelConfig;
    /// "cpu", "cuda:0", ..., for logs.
    fn device_name(&self) -> String;
    /// Token slots in the KV pool: slot ids run from 0 to this.
    fn kv_slots(&self) -> usize;
    /// Bytes of KV memory one token slot takes, over every layer (and rank).
    fn kv_bytes_per_slot(&self) -> usize {
        self.config().kv_bytes_per_slot()
    }
    fn add_sequence(&mut self, seq: SeqId, sampling: SequenceSampling);
    fn remove_sequence(&mut self, seq: SeqId);
    fn step(&mut self, rows: &[StepRow]) -> Result<StepOutput>;
    /// Starts a step; a runner whose device works asynchronously returns before the device
    /// finishes ([`Launched::Running`]), so that the host prepares the next step meanwhile.
    /// Launches and collects alternate: at most one step is running. The rows' data is
    /// consumed by the time this returns.
    fn launch(&mut self, rows: &[StepRow]) -> Result<Launched> {
        self.step(rows).map(Launched::Done)
    }
    /// Waits for the step [`ModelRunner::launch`] left running and returns its output (what
    /// [`ModelRunner::step`] would have). Its `forward_seconds` is from the launch to the
    /// device's end, host work in between included.
    fn collect(&mut self) -> Result<StepOutput> {
        Err(crate::ModelError::BadBatch("no step is running".into()))
    }
    /// Whether [`ModelRunner::launch`] returns while the device works: then the engine plans
    /// and launches step N+1 as soon as step N's tokens are back, and turns step N's tokens
    /// into text while step N+1 runs (see `arbor_engine::Overlap`).
    fn overlaps(&self) -> bool {
        false
    }
    /// Diagnostics: the logits of `tokens` computed from scratch in a scratch KV pool (the
    /// runner's own pool is untouched), for comparing backends with each other and with
    /// reference implementations.
    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>>;
    /// Test-only: where the runner calls a fault hook (sampling). Runners without one ignore it.
    #[doc(hidden)]
    fn set_fault_injector(&mut self, _faults: Option<FaultInjector>) {}
}

/// Where a [`FaultInjector`] is called: the places where one request's processing, or the
/// engine itself, can fail.
#[derive(Debug, Clone, Copy)]
pub enum FaultSite<'a> {
    /// Before the forward pass of step `step` (counted from 0): a panic here is an engine
    /// failure.
    Forward { step: u64 },
    /// Before a request's row is sampled: a panic here fails that request alone.
    Sample { prompt: &'a [u32] },
    /// Before a request's new token is detokenized and checked for stop strings.
    Detokenize { prompt: &'a [u32] },
    /// On tensor-parallel rank `rank`'s own thread, before its part of step `step` (counted
    /// from 0): a panic here is one rank failing, which must take the engine down cleanly.
    Rank { rank: usize, step: u64 },
}

/// A hook called at each [`FaultSite`]; a test makes it panic to check that the fault stays
/// where it belongs (one request, or the whole engine, failed cleanly).
#[derive(Clone)]
pub struct FaultInjector(pub Arc<dyn Fn(FaultSite<'_>) + Send + Sync>);

impl std::fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultInjector")
    }
}

/// The text of a caught panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".into())
}

/// Largest default KV pool, in token slots (the host keeps 5 bytes a slot: a free list entry
/// and an in-use flag). 4M: an H200's budget for an 8B model with an FP8 cache is 1.7M slots,
/// which the 1M of before cut to 64 of its 109 GB.
const KV_POOL_MAX_SLOTS: usize = 1 << 22;

/// The default KV pool for a model whose slots take `per_slot` bytes: `budget_bytes` of
/// memory (the backend's share: it fills up with cached prefixes over time, so this is a real
/// budget), at least one full context.
pub fn default_kv_slots(
    config: &ModelConfig,
    per_slot: usize,
    budget_bytes: Option<usize>,
) -> usize {
    let context = config.max_position_embeddings;
    let per_slot = per_slot.max(1);
    let budget = budget_bytes.map(|b| b / per_slot).unwrap_or(context);
    budget.clamp(context.min(KV_POOL_MAX_SLOTS), KV_POOL_MAX_SLOTS)
}

/// A CPU runner over loaded weights (what [`open`] makes for [`DeviceSpec::Cpu`]), for callers
/// that share one loaded model between engines (tests, benchmarks).
pub fn cpu_runner(model: Arc<crate::Llama>, kv_slots: Option<usize>) -> Box<dyn ModelRunner> {
    Box::new(HostSampledRunner::new(CpuBackend::new(model, kv_slots)))
}
