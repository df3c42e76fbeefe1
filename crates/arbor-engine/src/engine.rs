//! The engine: owns the model, the KV pool and the running requests, and advances them one
//! batched step at a time (continuous batching with chunked prefill).
//!
//! Each [`Engine::step`]:
//! 1. admits waiting requests (longest cached prefix first) while the pool can hold the
//!    uncached part of their prompt;
//! 2. builds one batch: a decode token for every running sequence that is generating, then
//!    prefill chunks of the others until the step's token budget is spent (a long prompt is cut
//!    into chunks so it never stalls the running decodes for long);
//! 3. runs the model once, samples a token for every sequence that finished its prompt, and
//!    reports tokens, text and finished requests as [`Event`]s.
//!
//! Prefix reuse: at admission a request's prompt is matched against the prefix cache (the radix
//! tree by default, `arbor_cache::PrefixCache`); the matched prefix's slots join the sequence
//! as already computed and stay locked while it runs. Each prefill chunk enters the cache as
//! soon as it is computed (so a request arriving meanwhile reuses it), and the generated tokens
//! when the request ends (so the next turn of the conversation finds them). Because every kernel is
//! batch-invariant, a prefix's cached K/V are bit-identical to what recomputing it would give:
//! the cache never changes an output.
//!
//! KV ownership lives in arbor-cache: each admitted sequence holds a `SeqKv` handle from the
//! engine's `KvManager` (match-and-lock at admission, grow per step, commit prefill chunks,
//! release at the end, free on drop), so the engine itself does no slot arithmetic.
//!
//! KV slots are taken when tokens are computed, evicting unlocked cached prefixes (least
//! recently used first) when the pool is short. When the running decodes still do not fit, the
//! youngest request is preempted: its computed tokens go into the cache, its slots are released,
//! and it goes back to the front of the queue with its prompt and generated tokens, to be
//! recomputed (mostly from the cache) and continued exactly where it stopped. Nothing runs out
//! of memory and no request is lost.
//!
//! Faults: what the step does for one request after the forward pass (sampling its row,
//! detokenizing, stop checks) runs behind a panic boundary per request; a fault there finishes
//! that request with [`FinishReason::Error`] and the rest of the step goes on. An error from the
//! forward pass is returned from [`Engine::step`]: the caller treats it as the engine's failure.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use arbor_cache::{BlockCache, KvManager, Namespace, NoCache, PrefixCache, RadixCache, SeqKv};
use arbor_model::{IncrementalDecoder, KvBudget, KvCache, LogitsWanted, Model, SeqStep, Tokenizer};

use crate::error::EngineError;
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopScan};

pub type RequestId = u64;

/// A waiting request defers admission while a running request's prefill would give it at
/// least this many more cached tokens: computing a shared prefix twice costs more than a short
/// wait (see `Engine::shares_prefill_in_progress`).
const MIN_SHARED_PREFILL_TO_WAIT: usize = 32;

/// Up to this many waiting requests are admitted in cache-aware order; beyond, in arrival
/// order (the queue is long: fairness first, and sorting stops paying).
const CACHE_AWARE_MAX_QUEUE: usize = 128;

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Default tokens per step: big enough that prefill matmuls reuse each unpacked weight block
/// across many rows, small enough that running decodes are not held up for long by a long
/// prompt.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 512;

/// How computed KV is kept for reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefixCacheMode {
    /// Every computed prefix stays in a radix tree until its slots are needed; a match may end
    /// at any token.
    #[default]
    Radix,
    /// vLLM's policy, for comparison: 16-token blocks identified by chained hashes, reused only
    /// as whole-block exact prefixes.
    Blocks,
    /// No reuse: every request computes its whole prompt.
    Off,
}

/// vLLM's default block size.
const HASH_BLOCK_TOKENS: usize = 16;

impl PrefixCacheMode {
    fn build(self) -> Box<dyn PrefixCache> {
        match self {
            PrefixCacheMode::Radix => Box::new(RadixCache::new()),
            PrefixCacheMode::Blocks => Box::new(BlockCache::new(HASH_BLOCK_TOKENS)),
            PrefixCacheMode::Off => Box::new(NoCache),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Token slots in the KV pool.
    pub kv_slots: usize,
    pub prefix_cache: PrefixCacheMode,
    /// Tokens per forward step (prefill chunk budget plus decodes).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Logits (rows x vocabulary) from which a step samples its rows on several threads: 64
    /// rows of a 128k vocabulary took 13 ms a step on one thread behind a 26 ms GPU forward
    /// pass. Below it, thread start-up costs more than it saves.
    pub parallel_sampling_min_logits: usize,
    /// Test-only fault injection (see [`FaultInjector`]); `None` in every real configuration.
    #[doc(hidden)]
    pub fault_injector: Option<FaultInjector>,
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
}

/// A hook the engine calls at each [`FaultSite`]; a test makes it panic to check that the
/// fault stays where it belongs (one request, or the whole engine, failed cleanly).
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

/// Default pool bound in tokens.
const KV_POOL_MAX_SLOTS: usize = 1 << 20;

impl EngineConfig {
    /// Checks the settings an engine cannot run with, naming the setting: with no KV slot no
    /// request fits, and with no token budget or no running request a step plans nothing,
    /// forever.
    pub fn validate(&self) -> Result<(), EngineError> {
        for (name, value) in [
            ("kv_slots", self.kv_slots),
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_running", self.max_running),
        ] {
            if value == 0 {
                return Err(EngineError::InvalidConfig(format!(
                    "{name} must be at least 1"
                )));
            }
        }
        Ok(())
    }

    /// Defaults for a model: the KV pool takes the backend's memory budget (40% of the host
    /// memory available now on the CPU, 85% of the GPU memory left after the weights: it fills
    /// up with cached prefixes over time, so this is a real budget), at least one full context.
    pub fn for_model(model: &impl KvBudget) -> Self {
        let config = model.config();
        let context = config.max_position_embeddings;
        let per_slot = config.kv_bytes_per_slot().max(1);
        let budget = model
            .kv_budget_bytes()
            .map(|b| b / per_slot)
            .unwrap_or(context);
        Self {
            kv_slots: budget.clamp(context.min(KV_POOL_MAX_SLOTS), KV_POOL_MAX_SLOTS),
            prefix_cache: PrefixCacheMode::Radix,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_running: 64,
            parallel_sampling_min_logits: 1 << 20,
            fault_injector: None,
        }
    }
}

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
        }
    }
}

/// Log-probabilities of a generated token under the model's distribution (the raw logits,
/// before penalties, temperature and truncation, as vLLM and OpenAI report them).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// Log-softmax of `logits` at `token`, plus the `top_n` largest entries.
    pub fn from_logits(logits: &[f32], token: u32, top_n: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
        let log_z = max as f64 + sum.ln();
        let lp = |t: u32| (logits[t as usize] as f64 - log_z) as f32;
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit_desc = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let top_n = top_n.min(ids.len());
        if top_n > 0 && top_n < ids.len() {
            ids.select_nth_unstable_by(top_n - 1, by_logit_desc);
        }
        ids.truncate(top_n);
        ids.sort_unstable_by(by_logit_desc);
        Self {
            logprob: lp(token),
            top: ids.into_iter().map(|t| (t, lp(t))).collect(),
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

#[derive(Debug)]
struct Sequence {
    id: RequestId,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// The KV of `tokens[..kv.len()]` while admitted (`None` while waiting): its cached
    /// prefix is locked through it, and it frees what it owns when dropped.
    kv: Option<SeqKv>,
    /// Prompt tokens found in the cache at admission (reported as `cached_tokens`).
    reused: usize,
    namespace: Namespace,
    /// Admission order (larger is younger): the youngest is preempted first.
    admitted_at: u64,
    /// Times admitted (more than once after a preemption).
    admissions: u32,
    max_new: usize,
    stop: StopConditions,
    /// Tokens that end the request: the request's stop ids, plus the model's unless
    /// `ignore_eos`; sorted, built once at admission so the per-token check is a binary search.
    stop_set: Vec<u32>,
    /// Tokens banned until `min_tokens` are generated (every stop token, the model's included);
    /// sorted, built once.
    banned_before_min: Vec<u32>,
    logprobs: Option<usize>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    matcher: StopMatcher,
    timing: Timing,
}

/// One row's next token: penalties, bans (stop tokens before `min_tokens`), sampling, and the
/// log-probabilities of the raw distribution when asked for.
fn sample_row(s: &mut Sequence, mut row: Vec<f32>) -> (u32, Option<TokenLogprob>) {
    let banned: &[u32] = if s.generated() < s.stop.min_tokens {
        &s.banned_before_min
    } else {
        &[]
    };
    // Log-probabilities come from the raw distribution, so keep it until we know the token.
    let raw = s.logprobs.map(|_| row.clone());
    let token = s.sampler.sample(&mut row, banned);
    let logprob = raw.map(|raw| TokenLogprob::from_logits(&raw, token, s.logprobs.unwrap_or(0)));
    (token, logprob)
}

/// What sampling one row gave: the token, or why this request failed (a panic while sampling
/// it is caught here and fails that request alone).
type RowPick = Result<(u32, Option<TokenLogprob>), String>;

/// [`sample_row`] behind the fault hook and a panic boundary.
fn sample_row_isolated(s: &mut Sequence, row: Vec<f32>, faults: Option<&FaultInjector>) -> RowPick {
    catch_unwind(AssertUnwindSafe(|| {
        if let Some(f) = faults {
            (f.0)(FaultSite::Sample {
                prompt: &s.tokens[..s.prompt_len],
            });
        }
        sample_row(s, row)
    }))
    .map_err(|p| format!("sampling failed: {}", panic_message(p.as_ref())))
}

/// [`sample_row`] for every row of a step, on up to one thread per core once the step has at
/// least `min_parallel_logits` logits. Each sequence owns its sampler (and its seeded RNG), so
/// the tokens are the same however the rows are spread.
fn sample_rows(
    seqs: Vec<&mut Sequence>,
    rows: Vec<Vec<f32>>,
    min_parallel_logits: usize,
    faults: Option<&FaultInjector>,
) -> Vec<RowPick> {
    let logits: usize = rows.iter().map(Vec::len).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.len());
    let mut work: Vec<(&mut Sequence, Vec<f32>)> = seqs.into_iter().zip(rows).collect();
    if threads < 2 || logits < min_parallel_logits {
        return work
            .into_iter()
            .map(|(s, row)| sample_row_isolated(s, row, faults))
            .collect();
    }
    let per_thread = work.len().div_ceil(threads);
    let mut chunks = Vec::new();
    while !work.is_empty() {
        let rest = work.split_off(per_thread.min(work.len()));
        chunks.push(std::mem::replace(&mut work, rest));
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|(s, row)| sample_row_isolated(s, row, faults))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .expect("sampling panics are caught per row in sample_row_isolated")
            })
            .collect()
    })
}

/// What happens to text a finishing request still holds back as a possible stop string.
#[derive(Debug, Clone, Copy)]
enum Flush {
    /// It is real output (a stop token, or the length limit, ended the request).
    Release,
    /// It is dropped (a stop string matched, or the request failed).
    Drop,
}

/// Appends a sampled token to a sequence: its event, and how the request ends if it does.
fn advance_with_token(
    s: &mut Sequence,
    tokenizer: &Tokenizer,
    token: u32,
    logprob: Option<TokenLogprob>,
    faults: Option<&FaultInjector>,
) -> Result<(Event, Option<(FinishReason, Flush)>), String> {
    s.sampler.observe(token);
    s.tokens.push(token);
    s.timing.first_token_at.get_or_insert_with(Instant::now);
    if s.stop_set.binary_search(&token).is_ok() {
        let event = Event::Token {
            id: s.id,
            token,
            text: String::new(),
            logprob,
        };
        // Text held back as a possible stop-string start is real output now.
        return Ok((event, Some((FinishReason::Stop, Flush::Release))));
    }
    if let Some(f) = faults {
        (f.0)(FaultSite::Detokenize {
            prompt: &s.tokens[..s.prompt_len],
        });
    }
    let delta = s
        .decoder
        .push(tokenizer, token)
        .map_err(|e| format!("detokenizing token {token} failed: {e}"))?;
    let (text, end) = match s.matcher.push(&delta) {
        // Everything from the stop string on is dropped.
        StopScan::Stopped(text) => (text, Some((FinishReason::Stop, Flush::Drop))),
        StopScan::Continue(text) => {
            let end =
                (s.generated() >= s.max_new).then_some((FinishReason::Length, Flush::Release));
            (text, end)
        }
    };
    let event = Event::Token {
        id: s.id,
        token,
        text,
        logprob,
    };
    Ok((event, end))
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
    /// Tokens whose K/V is computed (0 while waiting).
    fn computed(&self) -> usize {
        self.kv.as_ref().map_or(0, SeqKv::len)
    }
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed()
    }
}

pub struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    pool: KvCache,
    /// Which slots are free, cached or whose: every sequence's slots go through it.
    kv: KvManager,
    config: EngineConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_id: RequestId,
    admissions: u64,
    /// Forward passes run so far (the fault hook's step number).
    steps: u64,
}

/// Where the pool's KV slots are (see [`Engine::slot_usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotUsage {
    pub total: usize,
    /// In the allocator, owned by no one.
    pub free: usize,
    /// Held only by the prefix cache: evictable.
    pub cached: usize,
    /// Held by requests in flight: their own slots plus the cached prefixes they lock.
    pub held_by_requests: usize,
}

/// What one step did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    /// Requests sent back to the queue for lack of KV memory.
    pub preempted: usize,
    /// Seconds spent in the model's forward pass (the rest of a step is scheduling, sampling
    /// and detokenizing on the host).
    pub forward_seconds: f64,
}

impl Engine {
    /// An engine on a CPU model (its KV pool cannot fail to allocate: pages come lazily).
    /// Panics on a configuration [`EngineConfig::validate`] refuses; [`Engine::try_new`]
    /// returns that as an error.
    pub fn new(model: impl Into<Model>, tokenizer: Tokenizer, config: EngineConfig) -> Self {
        Self::try_new(model, tokenizer, config)
            .expect("a valid configuration, and a CPU KV pool that is allocated lazily")
    }

    /// An engine on any backend; fails when the KV pool does not fit (GPU memory).
    pub fn try_new(
        model: impl Into<Model>,
        tokenizer: Tokenizer,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let model = model.into();
        let per_slot = model.config().kv_bytes_per_slot();
        let pool = model.new_kv(config.kv_slots)?;
        tracing::info!(
            "KV pool on {}: {} token slots ({} MiB, {} KiB per token), prefix cache {:?}",
            model.device_name(),
            config.kv_slots,
            (config.kv_slots * per_slot) >> 20,
            per_slot >> 10,
            config.prefix_cache,
        );
        Ok(Self {
            kv: KvManager::new(config.kv_slots, config.prefix_cache.build()),
            model,
            tokenizer,
            pool,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            admissions: 0,
            steps: 0,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Slots neither cached nor held by a request.
    pub fn free_slots(&self) -> usize {
        self.kv.usage().free
    }

    /// Slots held only by the prefix cache (evictable) and by cached prefixes that running
    /// requests use (locked).
    pub fn cached_slots(&self) -> (usize, usize) {
        let u = self.kv.usage();
        (u.evictable, u.locked)
    }

    /// Where every KV slot is: see [`SlotUsage`]. `held_by_requests` is counted from the
    /// requests themselves, not derived from the other numbers, so a leak shows up as
    /// `free + cached + held_by_requests < total`.
    pub fn slot_usage(&self) -> SlotUsage {
        let own: usize = self
            .running
            .iter()
            .map(|s| s.kv.as_ref().map_or(0, SeqKv::own_len))
            .sum();
        let u = self.kv.usage();
        debug_assert_eq!(
            own, u.held_by_handles,
            "the manager counts what the requests hold"
        );
        SlotUsage {
            total: u.total,
            free: u.free,
            cached: u.evictable,
            held_by_requests: own + u.locked,
        }
    }

    /// Requests queued, not yet admitted (including preempted ones).
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Requests admitted and holding KV.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Cancels every request (shutdown, or a step that failed): their slots are freed and a
    /// `Finished` event with [`FinishReason::Cancelled`] is returned for each.
    pub fn cancel_all(&mut self) -> Vec<Event> {
        let ids: Vec<RequestId> = self
            .waiting
            .iter()
            .chain(&self.running)
            .map(|s| s.id)
            .collect();
        ids.into_iter().filter_map(|id| self.cancel(id)).collect()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Validates and queues a request.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId, EngineError> {
        req.sampling.validate()?;
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(arbor_model::ModelError::TokenOutOfRange { token: t, vocab }.into());
        }
        let context = self.model.config().max_position_embeddings;
        if req.prompt.len() >= context {
            return Err(EngineError::ContextOverflow {
                prompt: req.prompt.len(),
                max_tokens: req.stop.max_tokens,
                needed: req.prompt.len() + 1,
                context,
            });
        }
        let max_new = req.stop.max_tokens.min(context - req.prompt.len());
        // The last generated token is never fed back, so it needs no slot.
        let needed = req.prompt.len() + max_new.saturating_sub(1);
        if needed > self.kv.total() {
            return Err(EngineError::PoolTooSmall {
                needed,
                total: self.kv.total(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let sampler = Sampler::new(req.sampling, &req.prompt);
        let mut stop_set: Vec<u32> = req.stop.stop_token_ids.to_vec();
        let mut banned_before_min = stop_set.clone();
        banned_before_min.extend_from_slice(&self.tokenizer.stop_ids);
        if !req.stop.ignore_eos {
            stop_set.extend_from_slice(&self.tokenizer.stop_ids);
        }
        for set in [&mut stop_set, &mut banned_before_min] {
            set.sort_unstable();
            set.dedup();
        }
        self.waiting.push_back(Sequence {
            id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            kv: None,
            reused: 0,
            namespace: req.namespace,
            admitted_at: 0,
            admissions: 0,
            max_new,
            matcher: StopMatcher::new(req.stop.stop_strings.clone()),
            stop: req.stop,
            stop_set,
            banned_before_min,
            logprobs: req.logprobs,
            sampler,
            decoder: IncrementalDecoder::new(),
            timing: Timing {
                queued_at: Instant::now(),
                first_token_at: None,
                finished_at: None,
            },
        });
        Ok(id)
    }

    /// Cancels a waiting or running request and frees its slots at once.
    pub fn cancel(&mut self, id: RequestId) -> Option<Event> {
        let seq = if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i)
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.swap_remove(i))
        } else {
            None
        }?;
        Some(self.finish(seq, FinishReason::Cancelled, String::new()))
    }

    fn admit(&mut self) {
        self.order_waiting_by_cached_prefix();
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.config.max_running {
            let seq = &self.waiting[i];
            // The last token is always computed: its logits give the next token. The matched
            // prefix is locked from here (the handle), so making room cannot evict it.
            let known = seq.tokens.len() - 1;
            let kv = self.kv.acquire(seq.namespace, &seq.tokens[..known]);
            let cached = kv.len();
            if self.config.prefix_cache != PrefixCacheMode::Off
                && self.shares_prefill_in_progress(seq, cached)
            {
                // Another request is computing a longer part of this prompt right now: wait for
                // it to land in the cache instead of computing it twice.
                i += 1;
                continue;
            }
            // Room for the uncached tokens, and for one more token of every running request.
            let need = seq.tokens.len() - cached + self.running.len();
            if self.kv.available() < need {
                // Memory is short: later requests wait too, so the oldest is served first.
                break;
            }
            let mut seq = self.waiting.remove(i).expect("index checked above");
            if seq.admissions == 0 {
                seq.reused = cached;
            }
            seq.admissions += 1;
            self.admissions += 1;
            seq.admitted_at = self.admissions;
            seq.kv = Some(kv);
            self.running.push(seq);
        }
    }

    /// Sends the youngest running request back to the front of the queue, its computed
    /// tokens kept in the cache for a cheap resume.
    fn preempt_youngest(&mut self) {
        let Some(i) = (0..self.running.len()).max_by_key(|&i| self.running[i].admitted_at) else {
            return;
        };
        let mut seq = self.running.swap_remove(i);
        self.release(&mut seq);
        tracing::debug!(
            id = seq.id,
            tokens = seq.tokens.len(),
            "preempted for KV memory"
        );
        self.waiting.push_front(seq);
    }

    /// Cache-aware admission order (SGLang's longest-prefix-match policy): requests whose
    /// prompts are cached furthest go first, since they cost least to start and keep their
    /// prefix hot. A stable sort keeps arrival order among equals, and beyond
    /// `CACHE_AWARE_MAX_QUEUE` waiting requests the queue stays first-come first-served, so a
    /// request with nothing cached is never overtaken without bound.
    fn order_waiting_by_cached_prefix(&mut self) {
        if self.config.prefix_cache == PrefixCacheMode::Off
            || self.waiting.len() < 2
            || self.waiting.len() > CACHE_AWARE_MAX_QUEUE
        {
            return;
        }
        let mut keyed: Vec<(usize, Sequence)> = self
            .waiting
            .drain(..)
            .map(|s| {
                (
                    self.kv
                        .peek_prefix_len(s.namespace, &s.tokens[..s.prompt_len - 1]),
                    s,
                )
            })
            .collect();
        keyed.sort_by_key(|(cached, _)| std::cmp::Reverse(*cached));
        self.waiting.extend(keyed.into_iter().map(|(_, s)| s));
    }

    /// Whether a running request still in prefill, in the same namespace, shares more of
    /// `seq`'s prompt than the cache holds, by enough to be worth waiting for: at least
    /// `MIN_SHARED_PREFILL_TO_WAIT` tokens, or all of it (the choices of an `n > 1` request,
    /// identical prompts arriving together), which makes the wait at most that prefill.
    fn shares_prefill_in_progress(&self, seq: &Sequence, cached: usize) -> bool {
        let wanted = &seq.tokens[..seq.tokens.len() - 1];
        self.running.iter().any(|r| {
            if r.namespace != seq.namespace || r.computed() + 1 >= r.tokens.len() {
                return false;
            }
            let shared = common_prefix(&r.tokens, wanted);
            shared >= cached + MIN_SHARED_PREFILL_TO_WAIT
                || (shared == wanted.len() && shared > cached)
        })
    }

    /// Hands a sequence's computed tokens to the prefix cache right away (after a prefill
    /// chunk), so that requests arriving meanwhile reuse them (see [`SeqKv::commit`]: where the
    /// cache already had the same tokens its slots replace the sequence's, bit-identical K/V
    /// since every kernel is batch-invariant).
    fn cache_computed(&mut self, i: usize) {
        let s = &mut self.running[i];
        if let Some(kv) = s.kv.as_mut() {
            let n = kv.len();
            kv.commit(&s.tokens[..n]);
        }
    }

    /// Runs one batched forward step.
    pub fn step(&mut self) -> Result<(Vec<Event>, StepStats), EngineError> {
        self.admit();
        let mut stats = StepStats::default();
        let decoding = |s: &Sequence| s.pending() == 1 && s.computed() >= s.prompt_len;
        // Decodes need one slot each; preempt the youngest requests until they fit.
        loop {
            let decodes = self.running.iter().filter(|s| decoding(s)).count();
            if decodes <= self.kv.available() || self.running.len() <= 1 {
                break;
            }
            self.preempt_youngest();
            stats.preempted += 1;
        }
        let mut budget = self.config.max_batch_tokens;
        let mut memory = self.kv.available();
        // (index into running, tokens to run now)
        let mut plan: Vec<(usize, usize)> = Vec::new();
        // Decodes first: one token each, they keep the running requests moving.
        for (i, s) in self.running.iter().enumerate() {
            if decoding(s) && budget > 0 && memory > 0 {
                plan.push((i, 1));
                budget -= 1;
                memory -= 1;
                stats.decode_tokens += 1;
            }
        }
        // Then prefill chunks (new prompts, or resumed requests) in admission order.
        for (i, s) in self.running.iter().enumerate() {
            if budget == 0 || memory == 0 {
                break;
            }
            if !decoding(s) && s.pending() > 0 {
                let n = s.pending().min(budget).min(memory);
                plan.push((i, n));
                budget -= n;
                memory -= n;
                stats.prefill_tokens += n;
            }
        }
        if plan.is_empty() {
            if self.running.len() > 1 {
                // Everyone is stuck on memory: free the youngest for the others.
                self.preempt_youngest();
                stats.preempted += 1;
            }
            return Ok((Vec::new(), stats));
        }
        // Slots for the new tokens join the sequences before the step: the forward pass writes
        // their K/V and attends over the whole list.
        for &(i, n) in &plan {
            self.running[i]
                .kv
                .as_mut()
                .expect("running sequences hold KV")
                .grow(n)
                .expect("the step planned no more slots than free + evictable");
        }
        let steps: Vec<SeqStep> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                let slots = s.kv.as_ref().expect("running sequences hold KV").slots();
                let start = slots.len() - n;
                SeqStep {
                    tokens: &s.tokens[start..slots.len()],
                    slots,
                    logits: if slots.len() == s.tokens.len() {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    },
                }
            })
            .collect();
        let wants: Vec<usize> = plan
            .iter()
            .zip(&steps)
            .filter(|(_, st)| st.logits == LogitsWanted::Last)
            .map(|(&(i, _), _)| i)
            .collect();
        if let Some(f) = &self.config.fault_injector {
            (f.0)(FaultSite::Forward { step: self.steps });
        }
        self.steps += 1;
        let forward_started = Instant::now();
        let forward = self.model.forward(&steps, &mut self.pool);
        stats.forward_seconds = forward_started.elapsed().as_secs_f64();
        let logits = match forward {
            Ok(l) => l,
            Err(e) => {
                // Give the step's slots back so that state stays consistent, then report.
                drop(steps);
                for &(i, n) in &plan {
                    if let Some(kv) = self.running[i].kv.as_mut() {
                        kv.truncate(kv.len() - n);
                    }
                }
                return Err(e.into());
            }
        };

        // Prefill chunks go into the prefix cache at once, for requests arriving meanwhile.
        for &(i, n) in &plan {
            if n > 1 || self.running[i].computed() <= self.running[i].prompt_len {
                self.cache_computed(i);
            }
        }

        let mut events = Vec::new();
        // (index into running, reason, text released at the end, error)
        let mut finished: Vec<(usize, FinishReason, Flush, Option<String>)> = Vec::new();
        let faults = self.config.fault_injector.clone();
        let picks = {
            // Disjoint borrows of the rows' sequences, in `wants` order (distinct indices).
            let mut by_index: Vec<Option<&mut Sequence>> =
                self.running.iter_mut().map(Some).collect();
            let seqs: Vec<&mut Sequence> = wants
                .iter()
                .map(|&i| by_index[i].take().expect("one logits row per sequence"))
                .collect();
            sample_rows(
                seqs,
                logits,
                self.config.parallel_sampling_min_logits,
                faults.as_ref(),
            )
        };
        for (i, pick) in wants.into_iter().zip(picks) {
            let s = &mut self.running[i];
            // A fault while handling one request (sampling, detokenizing, a stop check) ends
            // that request with an error; the others in the step go on.
            let outcome = pick.and_then(|(token, logprob)| {
                catch_unwind(AssertUnwindSafe(|| {
                    advance_with_token(s, &self.tokenizer, token, logprob, faults.as_ref())
                }))
                .unwrap_or_else(|p| {
                    Err(format!(
                        "processing a token failed: {}",
                        panic_message(p.as_ref())
                    ))
                })
            });
            match outcome {
                Ok((event, end)) => {
                    events.push(event);
                    if let Some((reason, flush)) = end {
                        finished.push((i, reason, flush, None));
                    }
                }
                Err(error) => {
                    tracing::warn!(id = s.id, "request failed: {error}");
                    finished.push((i, FinishReason::Error, Flush::Drop, Some(error)));
                }
            }
        }
        // Remove finished sequences back to front so indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason, flush, error) in finished {
            let mut seq = self.running.swap_remove(i);
            let tail = match flush {
                Flush::Release => seq.matcher.flush(),
                Flush::Drop => String::new(),
            };
            let mut event = self.finish(seq, reason, tail);
            if let Event::Finished { error: slot, .. } = &mut event {
                *slot = error;
            }
            events.push(event);
        }
        Ok((events, stats))
    }

    /// Ends a sequence: see [`Engine::release`].
    fn finish(&mut self, mut seq: Sequence, reason: FinishReason, text: String) -> Event {
        self.release(&mut seq);
        seq.timing.finished_at = Some(Instant::now());
        Event::Finished {
            id: seq.id,
            reason,
            text,
            usage: Usage {
                prompt_tokens: seq.prompt_len,
                completion_tokens: seq.generated(),
                cached_tokens: seq.reused,
            },
            timing: seq.timing,
            error: None,
        }
    }

    /// Gives up a sequence's KV: its computed tokens go into the prefix cache (or their slots
    /// back to the pool) and its lock on the matched prefix is released.
    fn release(&mut self, seq: &mut Sequence) {
        if let Some(kv) = seq.kv.take() {
            let n = kv.len();
            kv.release(&seq.tokens[..n]);
        }
    }

    /// Runs one request to completion (other queued requests advance alongside it), calling
    /// `on_text` with each piece of output text as it is released.
    pub fn generate(
        &mut self,
        req: Request,
        mut on_text: impl FnMut(&str),
    ) -> Result<Completion, EngineError> {
        let id = self.add_request(req)?;
        let mut tokens = Vec::new();
        let mut text = String::new();
        loop {
            let (events, _) = self.step()?;
            for ev in events {
                match ev {
                    Event::Token {
                        id: rid,
                        token,
                        text: t,
                        ..
                    } if rid == id => {
                        tokens.push(token);
                        on_text(&t);
                        text.push_str(&t);
                    }
                    Event::Finished {
                        id: rid,
                        reason: FinishReason::Error,
                        error,
                        ..
                    } if rid == id => {
                        return Err(EngineError::RequestFailed(
                            error.unwrap_or_else(|| "unknown error".into()),
                        ));
                    }
                    Event::Finished {
                        id: rid,
                        reason,
                        text: t,
                        usage,
                        timing,
                        ..
                    } if rid == id => {
                        on_text(&t);
                        text.push_str(&t);
                        return Ok(Completion {
                            tokens,
                            text,
                            reason,
                            usage,
                            timing,
                        });
                    }
                    _ => {}
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::{EngineConfig, PrefixCacheMode, TokenLogprob};

    #[test]
    fn a_config_that_cannot_run_is_refused_by_name() {
        let good = EngineConfig {
            kv_slots: 64,
            prefix_cache: PrefixCacheMode::Radix,
            max_batch_tokens: 16,
            max_running: 4,
            parallel_sampling_min_logits: 1,
            fault_injector: None,
        };
        assert!(good.validate().is_ok());
        for (field, bad) in [
            (
                "kv_slots",
                EngineConfig {
                    kv_slots: 0,
                    ..good.clone()
                },
            ),
            (
                "max_batch_tokens",
                EngineConfig {
                    max_batch_tokens: 0,
                    ..good.clone()
                },
            ),
            (
                "max_running",
                EngineConfig {
                    max_running: 0,
                    ..good.clone()
                },
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_entries_in_order() {
        // softmax([ln 1, ln 2, ln 5, ln 2]) = [0.1, 0.2, 0.5, 0.2]
        let logits: Vec<f32> = [1.0f32, 2.0, 5.0, 2.0].iter().map(|x| x.ln()).collect();
        let lp = TokenLogprob::from_logits(&logits, 0, 3);
        assert!((lp.logprob - 0.1f32.ln()).abs() < 1e-5, "{}", lp.logprob);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        // Ties (tokens 1 and 3) go to the lower id.
        assert_eq!(ids, vec![2, 1, 3]);
        assert!((lp.top[0].1 - 0.5f32.ln()).abs() < 1e-5);
        assert!(TokenLogprob::from_logits(&logits, 2, 0).top.is_empty());
        assert_eq!(TokenLogprob::from_logits(&logits, 2, 10).top.len(), 4);
    }
}
