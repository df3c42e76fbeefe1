//! The engine: a short loop that ties the scheduler, a model runner and output processing.
//!
//! Callers add [`Request`]s and call [`Engine::step`]. Each step:
//! 1. the scheduler ([`crate::scheduler`]) admits, preempts and plans: which sequences run how
//!    many new tokens, with KV slots grown for them;
//! 2. the plan becomes [`StepRow`]s (token ids, slot ids) for the [`ModelRunner`], which runs
//!    the forward pass on its device and samples every row that finished its known tokens;
//! 3. prefill chunks are committed to the prefix cache, and output processing
//!    ([`crate::output`]) turns each sampled token into [`Event`]s and finished requests.
//!
//! Because every kernel is batch-invariant, a prefix's cached K/V are bit-identical to what
//! recomputing it would give: the cache never changes an output.
//!
//! Faults: a problem with one request (sampling its row in the runner, detokenizing, stop
//! checks) finishes that request with [`FinishReason::Error`] and the rest of the step goes on.
//! An error from the runner's step is returned from [`Engine::step`]: the caller treats it as
//! the engine's failure.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use arbor_cache::{BlockCache, KvEvent, KvManager, NoCache, PrefixCache, RadixCache, SeqKv};
use arbor_model::{
    panic_message, FaultInjector, FaultSite, IncrementalDecoder, Launched, ModelConfig,
    ModelRunner, RowOutcome, SequenceSampling, StepOutput, StepRow, Tokenizer,
};

use crate::error::EngineError;
use crate::output::{advance_with_token, finished_event, Flush};
use crate::request::{Completion, Event, FinishReason, Request, RequestId, Timing};
use crate::scheduler::{Scheduler, Sequence, StepPlan};
use crate::step_cost::{StepCostModel, StepShape};
use crate::stop::StopMatcher;

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

/// Host work overlapped with the device's (SGLang's overlap scheduler, vLLM's async
/// scheduling). With overlap, while step N runs on the device the host plans step N+1 (its
/// decode rows for the tokens step N is sampling), and as soon as step N's tokens are back it
/// launches step N+1 and only then detokenizes step N's tokens, checks stop strings and sends
/// the events. The device waits only for the launch itself.
///
/// What it costs: a request that a stop string ends has its token after the stop computed
/// once for nothing (a stop token ends it before the launch), and requests whose next row
/// needs their last token first (a structured-output mask, repetition / presence / frequency
/// penalties) make steps run one at a time while they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Where the runner's launch returns before its device finishes (the GPU runner).
    #[default]
    Auto,
    /// Always, even over a runner whose steps run at launch (tests of the logic on the CPU).
    On,
    Off,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub prefix_cache: PrefixCacheMode,
    /// Tokens per forward step (prefill chunk budget plus decodes).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Per-step time budget: while requests are decoding, prefill chunks are cut so that a
    /// step is predicted to take at most this long (bounding the time between tokens when long
    /// prompts arrive), on top of `max_batch_tokens`. `None`: the token budget alone.
    pub max_step_time: Option<std::time::Duration>,
    /// Whether the host plans and launches the next step before it turns the last one's
    /// tokens into text (see [`Overlap`]).
    pub overlap: Overlap,
    /// Test-only fault injection (see [`FaultInjector`]); `None` in every real configuration.
    /// The engine calls it before each forward pass and detokenization, and hands it to the
    /// runner for sampling.
    #[doc(hidden)]
    pub fault_injector: Option<FaultInjector>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            prefix_cache: PrefixCacheMode::Radix,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_running: 64,
            max_step_time: None,
            overlap: Overlap::Auto,
            fault_injector: None,
        }
    }
}

impl EngineConfig {
    /// Checks the settings an engine cannot run with, naming the setting: with no token budget
    /// or no running request a step plans nothing, forever.
    pub fn validate(&self) -> Result<(), EngineError> {
        for (name, value) in [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_running", self.max_running),
        ] {
            if value == 0 {
                return Err(EngineError::InvalidConfig(format!(
                    "{name} must be at least 1"
                )));
            }
        }
        if self.max_step_time.is_some_and(|t| t.is_zero()) {
            return Err(EngineError::InvalidConfig(
                "max_step_time must be above 0".into(),
            ));
        }
        Ok(())
    }
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

/// A launched step not yet collected: which sequences it samples, and its output when the
/// runner finished it at launch.
struct InFlight {
    /// The sampling rows' sequences, in row order (the order of the runner's outcomes).
    sampling: Vec<RequestId>,
    /// Sampling rows whose constraint failed before the launch: their outcome is this error.
    constraint_errors: Vec<(RequestId, String)>,
    output: Option<StepOutput>,
    started: Instant,
    shape: StepShape,
}

/// A collected step: each sampled row's outcome, its token already appended to its sequence,
/// by index into `running` (valid until the step's processing: a launch and its prefill
/// commits in between leave `running` as it is).
struct Collected {
    rows: Vec<(usize, RowOutcome)>,
    forward_seconds: f64,
}

/// What one step did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    /// Of `prefill_tokens`, those computed for history warm-ups ([`Engine::warm_prefix`]).
    pub warm_tokens: usize,
    /// Requests sent back to the queue for lack of KV memory.
    pub preempted: usize,
    /// Seconds spent in the model's forward pass (the rest of a step is scheduling, sampling
    /// and detokenizing on the host).
    pub forward_seconds: f64,
}

pub struct Engine {
    runner: Box<dyn ModelRunner>,
    tokenizer: Tokenizer,
    scheduler: Scheduler,
    config: EngineConfig,
    next_id: RequestId,
    /// Forward passes run so far (the fault hook's step number).
    steps: u64,
    /// Learned step times, for [`EngineConfig::max_step_time`].
    step_cost: StepCostModel,
    /// The step launched and not yet collected (see [`Overlap`]).
    in_flight: Option<InFlight>,
}

impl Engine {
    /// An engine over a runner (see `arbor_model::open`); refuses a configuration
    /// [`EngineConfig::validate`] refuses, or a runner without KV slots.
    pub fn new(
        mut runner: Box<dyn ModelRunner>,
        tokenizer: Tokenizer,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let slots = runner.kv_slots();
        if slots == 0 {
            return Err(EngineError::InvalidConfig(
                "kv_slots must be at least 1".into(),
            ));
        }
        let per_slot = runner.kv_bytes_per_slot();
        tracing::info!(
            "KV pool on {}: {} token slots ({} MiB, {} KiB per token), prefix cache {:?}",
            runner.device_name(),
            slots,
            (slots * per_slot) >> 20,
            per_slot >> 10,
            config.prefix_cache,
        );
        runner.set_fault_injector(config.fault_injector.clone());
        let kv = KvManager::new(slots, config.prefix_cache.build());
        Ok(Self {
            scheduler: Scheduler::new(
                kv,
                config.prefix_cache,
                config.max_batch_tokens,
                config.max_running,
            ),
            runner,
            tokenizer,
            config,
            next_id: 0,
            steps: 0,
            step_cost: StepCostModel::default(),
            in_flight: None,
        })
    }

    /// Starts logging the prefix cache's changes as pages of `page_size` tokens, for KV-aware
    /// routers (see `arbor_cache::events`); only before anything is cached.
    pub fn enable_kv_events(&self, page_size: usize) -> Result<(), EngineError> {
        self.scheduler
            .kv
            .enable_events(page_size)
            .map_err(EngineError::InvalidConfig)
    }

    /// Moves the prefix cache's page-view changes since the last call to `out` (nothing unless
    /// [`Engine::enable_kv_events`] was called).
    pub fn drain_kv_events(&self, out: &mut Vec<KvEvent>) {
        self.scheduler.kv.drain_events(out)
    }

    /// `Stored` events for every page cached now: what a subscriber that lost events rebuilds
    /// the view from, after a `Cleared`.
    pub fn kv_snapshot_events(&self) -> Vec<KvEvent> {
        self.scheduler.kv.snapshot_events()
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.runner.config()
    }

    pub fn runner(&self) -> &dyn ModelRunner {
        self.runner.as_ref()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Slots neither cached nor held by a request.
    pub fn free_slots(&self) -> usize {
        self.scheduler.kv.usage().free
    }

    /// Slots held only by the prefix cache (evictable) and by cached prefixes that running
    /// requests use (locked).
    pub fn cached_slots(&self) -> (usize, usize) {
        let u = self.scheduler.kv.usage();
        (u.evictable, u.locked)
    }

    /// Where every KV slot is: see [`SlotUsage`]. `held_by_requests` is counted from the
    /// requests themselves, not derived from the other numbers, so a leak shows up as
    /// `free + cached + held_by_requests < total`.
    pub fn slot_usage(&self) -> SlotUsage {
        let own: usize = self
            .scheduler
            .running
            .iter()
            .map(|s| s.kv.as_ref().map_or(0, SeqKv::own_len))
            .sum();
        let u = self.scheduler.kv.usage();
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
        self.scheduler.waiting.len()
    }

    /// Requests admitted and holding KV (warm-ups not counted: see [`Engine::warming_len`]).
    pub fn running_len(&self) -> usize {
        self.scheduler.running.iter().filter(|s| !s.warm).count()
    }

    pub fn has_work(&self) -> bool {
        self.in_flight.is_some()
            || !self.scheduler.waiting.is_empty()
            || !self.scheduler.running.is_empty()
            || !self.scheduler.warming.is_empty()
    }

    /// Warm-ups queued or running (see [`Engine::warm_prefix`]).
    pub fn warming_len(&self) -> usize {
        self.scheduler.warming.len() + self.scheduler.running.iter().filter(|s| s.warm).count()
    }

    /// Computes `tokens` into the prefix cache of `namespace` when the engine has nothing
    /// better to do: a history warm-up. Chat templates rewrite earlier turns when they render
    /// the next request (reasoning dropped, separators added), so the KV cached while a reply
    /// was generated stops matching where that reply starts; computing the history as the
    /// next request will render it, right after a reply ends, leaves the next turn only its
    /// new message to compute.
    ///
    /// A warm-up does not hold requests back: it is admitted only while none waits, runs only
    /// in steps with no other work (beside decodes only within
    /// [`EngineConfig::max_step_time`]), in chunks of at most 128 tokens (a request arriving
    /// meanwhile waits for that one step at most), is the first preempted, and gives way
    /// whenever a request waits for memory or a running slot. At most [`MAX_WARMING`] are queued (the
    /// oldest is dropped); one already cached, or being computed by a running request, is
    /// dropped. Produces no events. Tokens the cache cannot take (out of the vocabulary, too
    /// long for the context or the pool) are refused by name; with the prefix cache off this
    /// does nothing.
    ///
    /// [`MAX_WARMING`]: crate::scheduler::MAX_WARMING
    pub fn warm_prefix(
        &mut self,
        namespace: arbor_cache::Namespace,
        tokens: Vec<u32>,
    ) -> Result<(), EngineError> {
        if self.config.prefix_cache == PrefixCacheMode::Off || tokens.is_empty() {
            return Ok(());
        }
        let model = self.runner.config();
        let vocab = model.vocab_size;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange {
                param: "prompt",
                token: t,
                vocab,
            });
        }
        let context = model.max_position_embeddings;
        let total = self.scheduler.kv.total();
        if tokens.len() >= context || tokens.len() > total {
            return Err(EngineError::ContextOverflow {
                prompt: tokens.len(),
                max_tokens: 0,
                needed: tokens.len(),
                context: context.min(total),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.runner.add_sequence(
            id,
            SequenceSampling {
                params: Default::default(),
                prompt: Vec::new().into(),
                min_tokens: 0,
                banned_before_min: Vec::new().into(),
                logprobs: None,
            },
        );
        let warming = &mut self.scheduler.warming;
        if warming.len() >= crate::scheduler::MAX_WARMING {
            if let Some(oldest) = warming.pop_front() {
                self.runner.remove_sequence(oldest.id);
            }
        }
        self.scheduler.warming.push_back(Sequence {
            id,
            prompt_len: tokens.len(),
            tokens,
            kv: None,
            reused: 0,
            namespace,
            admitted_at: 0,
            admissions: 0,
            max_new: 0,
            matcher: StopMatcher::new(Vec::new().into()),
            stop_set: Vec::new(),
            decoder: IncrementalDecoder::new(),
            timing: Timing {
                queued_at: std::time::Instant::now(),
                first_token_at: None,
                finished_at: None,
            },
            constraint: None,
            warm: true,
            in_flight: false,
            needs_last_token: false,
        });
        Ok(())
    }

    /// Cancels every request (shutdown, or a step that failed): their slots are freed and a
    /// `Finished` event with [`FinishReason::Cancelled`] is returned for each.
    pub fn cancel_all(&mut self) -> Vec<Event> {
        if let Some(flight) = self.in_flight.take() {
            // Its tokens are dropped with their requests; a runner that fails here is failing
            // already.
            if flight.output.is_none() {
                let _ = self.runner.collect();
            }
            for &id in &flight.sampling {
                if let Some(s) = self.scheduler.running.iter_mut().find(|s| s.id == id) {
                    s.in_flight = false;
                }
            }
        }
        for mut seq in std::mem::take(&mut self.scheduler.warming) {
            self.runner.remove_sequence(seq.id);
            Scheduler::release(&mut seq);
        }
        while let Some(i) = self.scheduler.running.iter().position(|s| s.warm) {
            let mut seq = self.scheduler.running.swap_remove(i);
            Scheduler::release(&mut seq);
            self.runner.remove_sequence(seq.id);
        }
        let ids: Vec<RequestId> = self
            .scheduler
            .waiting
            .iter()
            .chain(&self.scheduler.running)
            .map(|s| s.id)
            .collect();
        ids.into_iter().filter_map(|id| self.cancel(id)).collect()
    }

    /// The validation boundary: a request becomes a sequence, or an error naming the field.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId, EngineError> {
        req.sampling.validate()?;
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let model = self.runner.config();
        let vocab = model.vocab_size;
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange {
                param: "prompt",
                token: t,
                vocab,
            });
        }
        if let Some(&t) = req
            .stop
            .stop_token_ids
            .iter()
            .find(|&&t| t as usize >= vocab)
        {
            return Err(EngineError::TokenOutOfRange {
                param: "stop_token_ids",
                token: t,
                vocab,
            });
        }
        if let Some(&(t, _)) = req
            .sampling
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= vocab)
        {
            return Err(EngineError::TokenOutOfRange {
                param: "logit_bias",
                token: t,
                vocab,
            });
        }
        let context = model.max_position_embeddings;
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
        let total = self.scheduler.kv.total();
        if needed > total {
            return Err(EngineError::PoolTooSmall { needed, total });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut stop_set: Vec<u32> = req.stop.stop_token_ids.to_vec();
        // Every stop token, the model's included, is banned until `min_tokens`.
        let mut banned_before_min = stop_set.clone();
        banned_before_min.extend_from_slice(&self.tokenizer.stop_ids);
        if !req.stop.ignore_eos {
            stop_set.extend_from_slice(&self.tokenizer.stop_ids);
        }
        for set in [&mut stop_set, &mut banned_before_min] {
            set.sort_unstable();
            set.dedup();
        }
        // Masks and output penalties read the last token before the next launch.
        let p = &req.sampling;
        let needs_last_token = req.constraint.is_some()
            || p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0;
        self.runner.add_sequence(
            id,
            SequenceSampling {
                params: req.sampling,
                prompt: req.prompt.as_slice().into(),
                min_tokens: req.stop.min_tokens,
                banned_before_min: banned_before_min.into(),
                logprobs: req.logprobs,
            },
        );
        let constraint = req
            .constraint
            .map(|f| (f.start(), vec![0u32; vocab.div_ceil(32)]));
        self.scheduler.waiting.push_back(Sequence {
            id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            kv: None,
            reused: 0,
            namespace: req.namespace,
            admitted_at: 0,
            admissions: 0,
            max_new,
            matcher: StopMatcher::new(req.stop.stop_strings),
            stop_set,
            decoder: IncrementalDecoder::new(),
            timing: Timing {
                queued_at: std::time::Instant::now(),
                first_token_at: None,
                finished_at: None,
            },
            constraint,
            warm: false,
            in_flight: false,
            needs_last_token,
        });
        Ok(id)
    }

    /// Cancels a waiting or running request and frees its slots at once.
    pub fn cancel(&mut self, id: RequestId) -> Option<Event> {
        let seq = self.scheduler.remove(id)?;
        Some(self.finish(seq, FinishReason::Cancelled, Flush::Drop, None))
    }

    /// Runs one batched step. With overlap ([`Overlap`]), the call plans step N+1, waits for
    /// step N's tokens, launches step N+1 and turns step N's tokens into events while it runs;
    /// the events returned are step N's. Without, it plans, runs and processes one step.
    pub fn step(&mut self) -> Result<(Vec<Event>, StepStats), EngineError> {
        let overlap = self.overlap_now();
        if !overlap {
            if let Some(flight) = self.in_flight.take() {
                // The next step cannot be planned before this one's tokens are back.
                let collected = self.collect(flight, None)?;
                let stats = StepStats {
                    forward_seconds: collected.forward_seconds,
                    ..Default::default()
                };
                return Ok((self.process(collected), stats));
            }
        }
        let limit = self.config.max_step_time.map(|t| t.as_secs_f64());
        let mut plan = self
            .scheduler
            .schedule(limit.map(|l| (&mut self.step_cost, l)));
        // The step in flight: its tokens join their sequences before the next step launches
        // (rows planned for them take those tokens as input).
        let previous = match self.in_flight.take() {
            Some(flight) => match self.collect(flight, Some(&mut plan)) {
                Ok(c) => Some(c),
                Err(e) => {
                    self.scheduler.undo(&plan);
                    return Err(e);
                }
            },
            None => None,
        };
        let warm_tokens = plan
            .rows
            .iter()
            .filter(|&&(i, _)| self.scheduler.running[i].warm)
            .map(|&(_, n)| n)
            .sum();
        let mut stats = StepStats {
            prefill_tokens: plan.prefill_tokens,
            decode_tokens: plan.decode_tokens,
            warm_tokens,
            preempted: plan.preempted,
            forward_seconds: previous.as_ref().map_or(0.0, |c| c.forward_seconds),
        };
        if !plan.rows.is_empty() {
            self.launch(&plan)?;
            // Computed prefills go into the prefix cache now: whatever reads them later runs
            // after this step on the device.
            self.scheduler.commit_prefills(&plan);
        }
        let mut events = previous.map(|c| self.process(c)).unwrap_or_default();
        if !overlap {
            if let Some(flight) = self.in_flight.take() {
                let collected = self.collect(flight, None)?;
                stats.forward_seconds = collected.forward_seconds;
                events.extend(self.process(collected));
            }
        }
        // Warm-ups whose tokens are all computed end silently: their KV stays in the cache.
        while let Some(i) = self.scheduler.running.iter().position(Sequence::warmed) {
            let mut seq = self.scheduler.running.swap_remove(i);
            Scheduler::release(&mut seq);
            self.runner.remove_sequence(seq.id);
        }
        Ok((events, stats))
    }

    /// Whether this step may be planned while the previous one runs: the runner works
    /// asynchronously (or [`Overlap::On`]), and no request needs its last token on the host
    /// before its next row launches (a constraint's mask, penalties over its output).
    fn overlap_now(&self) -> bool {
        let allowed = match self.config.overlap {
            Overlap::Auto => self.runner.overlaps(),
            Overlap::On => true,
            Overlap::Off => false,
        };
        allowed
            && !self
                .scheduler
                .running
                .iter()
                .chain(&self.scheduler.waiting)
                .any(|s| s.needs_last_token)
    }

    /// Launches a planned step: constraint masks, the runner's rows, and the record of what
    /// it samples. On failure the plan's slots are given back.
    fn launch(&mut self, plan: &StepPlan) -> Result<(), EngineError> {
        // Structured output: the tokens each constrained sampling row may draw. A constraint
        // that fails fails its request alone (its row runs unconstrained; its token is dropped).
        // Masks take a fraction of a millisecond each on the host: rows in parallel.
        let planned: Vec<usize> = plan.rows.iter().map(|&(i, _)| i).collect();
        let constrained: Vec<(usize, &mut Sequence)> = self
            .scheduler
            .running
            .iter_mut()
            .enumerate()
            .filter(|(i, s)| {
                s.constraint.is_some()
                    && planned.contains(i)
                    && s.kv.as_ref().is_some_and(|kv| kv.len() == s.tokens.len())
            })
            .collect();
        let fill = |(i, s): (usize, &mut Sequence)| {
            let (c, mask) = s.constraint.as_mut()?;
            mask.fill(0);
            let filled = catch_unwind(AssertUnwindSafe(|| c.allowed(mask)))
                .unwrap_or_else(|p| Err(panic_message(p.as_ref())));
            filled
                .err()
                .map(|e| (i, format!("the output constraint failed: {e}")))
        };
        let constraint_errors: Vec<(usize, String)> = if constrained.len() > 1 {
            use rayon::prelude::*;
            constrained.into_par_iter().filter_map(fill).collect()
        } else {
            constrained.into_iter().filter_map(fill).collect()
        };
        let running = &self.scheduler.running;
        let rows: Vec<StepRow> = plan
            .rows
            .iter()
            .map(|&(i, n)| {
                let s = &running[i];
                let slots = s.kv.as_ref().expect("running sequences hold KV").slots();
                let sample = !s.warm && slots.len() == s.tokens.len();
                let failed = constraint_errors.iter().any(|(j, _)| *j == i);
                StepRow {
                    seq: s.id,
                    tokens: &s.tokens[slots.len() - n..slots.len()],
                    slots,
                    sample,
                    allowed: s
                        .constraint
                        .as_ref()
                        .filter(|_| sample && !failed)
                        .map(|(_, mask)| mask.as_slice()),
                }
            })
            .collect();
        // Rows that sample, as indices into running, in row order (the runner's output order).
        let sampling: Vec<usize> = plan
            .rows
            .iter()
            .zip(&rows)
            .filter(|(_, r)| r.sample)
            .map(|(&(i, _), _)| i)
            .collect();
        if let Some(f) = &self.config.fault_injector {
            (f.0)(FaultSite::Forward { step: self.steps });
        }
        self.steps += 1;
        let started = std::time::Instant::now();
        let launched = match self.runner.launch(&rows) {
            Ok(launched) => launched,
            Err(e) => {
                // Give the step's slots back so that state stays consistent, then report.
                drop(rows);
                self.scheduler.undo(plan);
                return Err(e.into());
            }
        };
        let running = &mut self.scheduler.running;
        let constraint_errors = constraint_errors
            .into_iter()
            .map(|(i, e)| (running[i].id, e))
            .collect();
        let sampling = sampling
            .into_iter()
            .map(|i| {
                running[i].in_flight = true;
                running[i].id
            })
            .collect();
        self.in_flight = Some(InFlight {
            sampling,
            constraint_errors,
            output: match launched {
                Launched::Done(output) => Some(output),
                Launched::Running => None,
            },
            started,
            shape: plan.shape,
        });
        Ok(())
    }

    /// Waits for the step in flight and appends each sampled token to its sequence (those that
    /// ended meanwhile are skipped). With `next` (the plan of the step about to launch), a
    /// sequence whose token ends it (a stop token) or whose row failed loses its row there.
    fn collect(
        &mut self,
        flight: InFlight,
        mut next: Option<&mut StepPlan>,
    ) -> Result<Collected, EngineError> {
        let InFlight {
            sampling,
            mut constraint_errors,
            output,
            started,
            shape,
        } = flight;
        let output = match output {
            Some(output) => output,
            None => self.runner.collect()?,
        };
        // The runner's whole step (forward pass and sampling) is what the decodes wait for.
        self.step_cost
            .observe(shape, started.elapsed().as_secs_f64());
        if output.sampled.len() != sampling.len() {
            return Err(EngineError::RequestFailed(format!(
                "the runner returned {} sampled rows for {} requested",
                output.sampled.len(),
                sampling.len()
            )));
        }
        let index: HashMap<RequestId, usize> = (self.scheduler.running.iter().enumerate())
            .map(|(i, s)| (s.id, i))
            .collect();
        let mut rows = Vec::with_capacity(sampling.len());
        for (id, outcome) in sampling.into_iter().zip(output.sampled) {
            // Cancelled, or ended by the token before (a stop string) while this step ran.
            let Some(&i) = index.get(&id) else { continue };
            let outcome = match constraint_errors.iter().position(|(j, _)| *j == id) {
                Some(k) => Err(constraint_errors.swap_remove(k).1),
                None => outcome,
            };
            let s = &mut self.scheduler.running[i];
            s.in_flight = false;
            let ends = match &outcome {
                Ok(sampled) => {
                    s.tokens.push(sampled.token);
                    s.timing.first_token_at.get_or_insert_with(Instant::now);
                    s.stop_set.binary_search(&sampled.token).is_ok()
                }
                Err(_) => true,
            };
            if ends {
                if let Some(plan) = next.as_deref_mut() {
                    self.scheduler.drop_decode_row(plan, i);
                }
            }
            rows.push((i, outcome));
        }
        Ok(Collected {
            rows,
            forward_seconds: output.forward_seconds,
        })
    }

    /// Turns collected tokens into events: constraints, detokenizing, stop strings, lengths;
    /// finished requests end here.
    fn process(&mut self, collected: Collected) -> Vec<Event> {
        let mut events = Vec::with_capacity(collected.rows.len());
        // (index into running, reason, text released at the end, error)
        let mut finished: Vec<(usize, FinishReason, Flush, Option<String>)> = Vec::new();
        let faults = self.config.fault_injector.as_ref();
        for (i, outcome) in collected.rows {
            let s = &mut self.scheduler.running[i];
            // A fault while handling one request (sampling, detokenizing, a stop check, its
            // constraint) ends that request with an error; the others in the step go on.
            let outcome = outcome.and_then(|sampled| {
                catch_unwind(AssertUnwindSafe(|| {
                    if let Some((c, _)) = &mut s.constraint {
                        c.accept(sampled.token).map_err(|e| {
                            format!("the output constraint refused token {}: {e}", sampled.token)
                        })?;
                    }
                    let (event, end) = advance_with_token(
                        s,
                        &self.tokenizer,
                        sampled.token,
                        sampled.logprob,
                        faults,
                    )?;
                    // A complete constraint ends the request (nothing else may follow).
                    let finished = s.constraint.as_ref().is_some_and(|(c, _)| c.is_finished());
                    let end = end.or(finished.then_some((FinishReason::Stop, Flush::Release)));
                    Ok((event, end))
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
            let seq = self.scheduler.running.swap_remove(i);
            events.push(self.finish(seq, reason, flush, error));
        }
        events
    }

    /// Ends a sequence: its KV is released (computed tokens into the prefix cache), its
    /// sampling state leaves the runner, and its `Finished` event is made.
    fn finish(
        &mut self,
        mut seq: Sequence,
        reason: FinishReason,
        flush: Flush,
        error: Option<String>,
    ) -> Event {
        Scheduler::release(&mut seq);
        self.runner.remove_sequence(seq.id);
        finished_event(seq, reason, flush, error)
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

#[cfg(test)]
mod tests {
    use super::{EngineConfig, PrefixCacheMode};

    #[test]
    fn a_config_that_cannot_run_is_refused_by_name() {
        let good = EngineConfig {
            prefix_cache: PrefixCacheMode::Radix,
            max_batch_tokens: 16,
            max_running: 4,
            max_step_time: Some(std::time::Duration::from_millis(50)),
            overlap: super::Overlap::Auto,
            fault_injector: None,
        };
        assert!(good.validate().is_ok());
        for (field, bad) in [
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
            (
                "max_step_time",
                EngineConfig {
                    max_step_time: Some(std::time::Duration::ZERO),
                    ..good.clone()
                },
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
