//! The scheduler: which requests run, and what each runs in the next step. Pure planning over
//! token counts and KV slots; it never touches a model.
//!
//! It owns the request queues and the [`KvManager`] (which slots are free, cached or whose).
//! [`Scheduler::schedule`]:
//! 1. admits waiting requests (longest cached prefix first) while the pool can hold the
//!    uncached part of their prompt; a request whose prompt another running request is
//!    prefilling right now waits for that prefill to land in the cache instead of computing
//!    it twice;
//!    then, while no request waits, a history warm-up (a prefix computed into the cache for
//!    a conversation's next turn, see `Engine::warm_prefix`): it runs only in steps with no
//!    other work (beside decodes only within a step time budget), in chunks of at most
//!    `MAX_WARM_CHUNK` tokens, is preempted first, and gives way to any request kept waiting;
//! 2. preempts the youngest running requests while the running decodes do not fit;
//! 3. plans one step: a decode token for every running sequence that is generating, then
//!    prefill chunks of the others until the token budget is spent (a long prompt is cut into
//!    chunks so it never stalls the running decodes for long; with a step time budget the
//!    chunks beside running decodes are also cut to what the learned step-time model says
//!    fits, see [`crate::step_cost`]), and grows each planned sequence's KV by the slots its
//!    new tokens need.
//!
//! Prefix reuse: at admission a request's prompt is matched against the prefix cache; the
//! matched prefix joins the sequence as already computed and stays locked while it runs
//! ([`SeqKv`]). Preemption sends the youngest request back to the front of the queue with its
//! computed tokens in the cache, to be recomputed (mostly from the cache) and continued
//! exactly where it stopped: nothing runs out of memory and no request is lost.

use std::collections::VecDeque;

use arbor_cache::{KvManager, Namespace, SeqKv};
use arbor_model::IncrementalDecoder;

use crate::engine::PrefixCacheMode;
use crate::request::{RequestId, Timing};
use crate::step_cost::{largest_chunk_within, StepCostModel, StepShape};
use crate::stop::StopMatcher;

/// A waiting request defers admission while a running request's prefill would give it at
/// least this many more cached tokens: computing a shared prefix twice costs more than a short
/// wait (see `Scheduler::shares_prefill_in_progress`).
const MIN_SHARED_PREFILL_TO_WAIT: usize = 32;

/// Up to this many waiting requests are admitted in cache-aware order; beyond, in arrival
/// order (the queue is long: fairness first, and sorting stops paying).
const CACHE_AWARE_MAX_QUEUE: usize = 128;

/// Under a step time budget, the first prefill chunk of a step has at least this many tokens
/// (a budget below what the decodes alone take must not stall prefills forever).
const MIN_TIMED_PREFILL_CHUNK: usize = 64;

/// Warm-ups queued at most; beyond, the oldest is dropped (its conversation has likely moved
/// on, or its client gone).
pub(crate) const MAX_WARMING: usize = 64;

/// Warm-ups running at once: they fill idle capacity, one prefill at a time is plenty.
const MAX_WARM_RUNNING: usize = 1;

/// Most tokens of a warm-up in one step: a request arriving meanwhile waits for at most that
/// step (on the GPU a few milliseconds for an 8B model; on a small CPU a tenth of a second).
const MAX_WARM_CHUNK: usize = 128;

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A request inside the engine, waiting or running.
#[derive(Debug)]
pub(crate) struct Sequence {
    pub id: RequestId,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// The KV of `tokens[..kv.len()]` while admitted (`None` while waiting): its cached
    /// prefix is locked through it, and it frees what it owns when dropped.
    pub kv: Option<SeqKv>,
    /// Prompt tokens found in the cache at admission (reported as `cached_tokens`).
    pub reused: usize,
    pub namespace: Namespace,
    /// Admission order (larger is younger): the youngest is preempted first.
    pub admitted_at: u64,
    /// Times admitted (more than once after a preemption).
    pub admissions: u32,
    pub max_new: usize,
    /// Tokens that end the request: the request's stop ids, plus the model's unless
    /// `ignore_eos`; sorted, built once at admission so the per-token check is a binary search.
    pub stop_set: Vec<u32>,
    pub decoder: IncrementalDecoder,
    pub matcher: StopMatcher,
    pub timing: Timing,
    /// Structured output: the constraint, and the buffer its allowed tokens are written to
    /// before each sampling step.
    pub constraint: Option<(Box<dyn crate::request::Constraint>, Vec<u32>)>,
    /// A history warm-up ([`crate::Engine::warm_prefix`]): its tokens are computed into the
    /// prefix cache and nothing is sampled. It runs only on capacity no request wants.
    pub warm: bool,
    /// The step in flight samples this sequence's next token: it is not in `tokens` yet, and
    /// the next step's plan may already give it its decode row (the token joins before that
    /// step launches). Such a sequence is never preempted.
    pub in_flight: bool,
    /// Its next row needs the last token before launch (a constraint's mask, penalties over
    /// the output): while it runs, steps are not planned ahead.
    pub needs_last_token: bool,
}

impl Sequence {
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
    /// Tokens whose K/V is computed (0 while waiting).
    pub fn computed(&self) -> usize {
        self.kv.as_ref().map_or(0, SeqKv::len)
    }
    /// Tokens known, or being sampled, whose K/V is not computed.
    fn pending(&self) -> usize {
        self.tokens.len() + usize::from(self.in_flight) - self.computed()
    }
    /// The token in flight is its last: it ends when that token comes back.
    fn ending(&self) -> bool {
        self.in_flight && self.generated() + 1 >= self.max_new
    }
    /// Generating: only the last sampled token is new.
    fn decoding(&self) -> bool {
        !self.warm && !self.ending() && self.pending() == 1 && self.computed() >= self.prompt_len
    }
    /// A warm-up whose every token is computed: it is done.
    pub fn warmed(&self) -> bool {
        self.warm && self.pending() == 0
    }
}

/// One step's work: `(index into running, new tokens)` per sequence, decodes first. Each
/// planned sequence's KV already holds slots for its new tokens.
#[derive(Debug, Default)]
pub(crate) struct StepPlan {
    pub rows: Vec<(usize, usize)>,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub preempted: usize,
    /// What the step computes, for the step-time model.
    pub shape: StepShape,
}

pub(crate) struct Scheduler {
    /// Which slots are free, cached or whose: every sequence's slots go through it.
    pub kv: KvManager,
    pub waiting: VecDeque<Sequence>,
    /// Warm-ups not yet running, oldest first (bounded: see [`MAX_WARMING`]).
    pub warming: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    prefix_cache: PrefixCacheMode,
    max_batch_tokens: usize,
    max_running: usize,
    admissions: u64,
}

impl Scheduler {
    pub fn new(
        kv: KvManager,
        prefix_cache: PrefixCacheMode,
        max_batch_tokens: usize,
        max_running: usize,
    ) -> Self {
        Self {
            kv,
            waiting: VecDeque::new(),
            warming: VecDeque::new(),
            running: Vec::new(),
            prefix_cache,
            max_batch_tokens,
            max_running,
            admissions: 0,
        }
    }

    /// Admission, preemption, and the next step's plan (empty when nothing can run now). With
    /// `time_limit` (a step-time model and seconds), prefill chunks beside running decodes are
    /// cut so that the step's predicted time stays within the limit.
    pub fn schedule(&mut self, mut time_limit: Option<(&mut StepCostModel, f64)>) -> StepPlan {
        self.admit();
        let mut plan = StepPlan::default();
        // Decodes need one slot each; preempt the youngest requests until they fit. (A request
        // whose token is in flight is not preempted: it waits a step instead, and is a
        // candidate again once its token is back.)
        loop {
            let decodes = self.running.iter().filter(|s| s.decoding()).count();
            if decodes <= self.kv.available() || self.running.len() <= 1 || !self.preempt_youngest()
            {
                break;
            }
            plan.preempted += 1;
        }
        let mut budget = self.max_batch_tokens;
        let mut memory = self.kv.available();
        // Decodes first: one token each, they keep the running requests moving.
        for (i, s) in self.running.iter().enumerate() {
            if s.decoding() && budget > 0 && memory > 0 {
                plan.rows.push((i, 1));
                budget -= 1;
                memory -= 1;
                plan.decode_tokens += 1;
                plan.shape.add_decode(s.computed() + 1);
            }
        }
        // Then prefill chunks (new prompts, or resumed requests) in admission order; warm-ups
        // last, with what the requests left.
        let prefills = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.warm)
            .chain(self.running.iter().enumerate().filter(|(_, s)| s.warm));
        for (i, s) in prefills {
            if budget == 0 || memory == 0 {
                break;
            }
            if s.warm && !plan.rows.is_empty() && time_limit.is_none() {
                // Without a step time budget, any work beside a warm-up would wait for it.
                break;
            }
            if !s.decoding() && !s.in_flight && s.pending() > 0 {
                let mut n = s.pending().min(budget).min(memory);
                if s.warm {
                    n = n.min(MAX_WARM_CHUNK);
                }
                if let (Some((model, limit)), true) = (time_limit.as_mut(), plan.decode_tokens > 0)
                {
                    // Decodes are waiting on this step: keep it within the time budget. The
                    // step's first chunk always advances; later ones only where time is left.
                    let min = if plan.prefill_tokens == 0 && !s.warm {
                        MIN_TIMED_PREFILL_CHUNK
                    } else {
                        0
                    };
                    n = largest_chunk_within(model, plan.shape, s.computed(), n, min, *limit)
                        .unwrap_or(n);
                }
                if n == 0 {
                    break;
                }
                plan.shape.add_prefill(s.computed(), n);
                plan.rows.push((i, n));
                budget -= n;
                memory -= n;
                plan.prefill_tokens += n;
            }
        }
        if plan.rows.is_empty() {
            if self.running.len() > 1 && self.preempt_youngest() {
                // Everyone is stuck on memory: free the youngest for the others.
                plan.preempted += 1;
            }
            return plan;
        }
        // Slots for the new tokens join the sequences before the step: the forward pass writes
        // their K/V and attends over the whole list.
        for &(i, n) in &plan.rows {
            self.running[i]
                .kv
                .as_mut()
                .expect("running sequences hold KV")
                .grow(n)
                .expect("the step planned no more slots than free + evictable");
        }
        plan
    }

    /// Takes back the slots a failed step's plan had grown.
    pub fn undo(&mut self, plan: &StepPlan) {
        for &(i, n) in &plan.rows {
            if let Some(kv) = self.running[i].kv.as_mut() {
                kv.truncate(kv.len() - n);
            }
        }
    }

    /// Takes sequence `i`'s decode row out of a plan not launched yet (the token it had in
    /// flight ended it, or failed), giving back the slot grown for it. A sequence with a token
    /// in flight is planned only as a decode (see `schedule`).
    pub fn drop_decode_row(&mut self, plan: &mut StepPlan, i: usize) {
        let Some(at) = plan.rows.iter().position(|&(j, _)| j == i) else {
            return;
        };
        let (_, n) = plan.rows.remove(at);
        debug_assert_eq!(n, 1, "a sequence with a token in flight decodes");
        if let Some(kv) = self.running[i].kv.as_mut() {
            kv.truncate(kv.len() - n);
        }
        plan.decode_tokens -= n;
    }

    /// After a step: prefill chunks go into the prefix cache at once, for requests arriving
    /// meanwhile (see [`SeqKv::commit`]: where the cache already had the same tokens its slots
    /// replace the sequence's, bit-identical K/V since every kernel is batch-invariant).
    pub fn commit_prefills(&mut self, plan: &StepPlan) {
        for &(i, n) in &plan.rows {
            let s = &mut self.running[i];
            if n > 1 || s.computed() <= s.prompt_len {
                if let Some(kv) = s.kv.as_mut() {
                    let n = kv.len();
                    kv.commit(&s.tokens[..n]);
                }
            }
        }
    }

    /// Removes a waiting or running request (its KV still held; see [`Scheduler::release`]).
    pub fn remove(&mut self, id: RequestId) -> Option<Sequence> {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i)
        } else if let Some(i) = self.warming.iter().position(|s| s.id == id) {
            self.warming.remove(i)
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.swap_remove(i))
        } else {
            None
        }
    }

    /// Gives up a sequence's KV: its computed tokens go into the prefix cache (or their slots
    /// back to the pool) and its lock on the matched prefix is released.
    pub fn release(seq: &mut Sequence) {
        if let Some(mut kv) = seq.kv.take() {
            // A slot grown for a token that never came (a failed step) holds nothing.
            if kv.len() > seq.tokens.len() {
                kv.truncate(seq.tokens.len());
            }
            let n = kv.len();
            kv.release(&seq.tokens[..n]);
        }
    }

    fn admit(&mut self) {
        if self.admit_requests() && self.running.iter().any(|s| s.warm) {
            // A request is kept waiting (memory, or the running limit): warm-ups give way.
            while let Some(i) = self.running.iter().position(|s| s.warm) {
                let mut seq = self.running.swap_remove(i);
                Self::release(&mut seq);
                self.warming.push_front(seq);
            }
            self.admit_requests();
        }
        if self.waiting.is_empty() {
            self.admit_warmups();
        }
    }

    /// Admits waiting requests; true when one is left waiting for memory or the running limit
    /// (not when it only waits for another request's prefill).
    fn admit_requests(&mut self) -> bool {
        self.order_waiting_by_cached_prefix();
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.max_running {
            let seq = &self.waiting[i];
            // The last token is always computed: its logits give the next token. The matched
            // prefix is locked from here (the handle), so making room cannot evict it.
            let known = seq.tokens.len() - 1;
            let kv = self.kv.acquire(seq.namespace, &seq.tokens[..known]);
            let cached = kv.len();
            if self.prefix_cache != PrefixCacheMode::Off
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
                return true;
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
        i < self.waiting.len() && self.running.len() >= self.max_running
    }

    /// Starts queued warm-ups while no request waits, up to [`MAX_WARM_RUNNING`]. One already
    /// cached, or being computed by a running sequence, is dropped: it has nothing to add.
    fn admit_warmups(&mut self) {
        while self.running.iter().filter(|s| s.warm).count() < MAX_WARM_RUNNING
            && self.running.len() < self.max_running
        {
            let Some(mut seq) = self.warming.pop_front() else {
                return;
            };
            // Every token is computed: what follows it is the next request's.
            let kv = self.kv.acquire(seq.namespace, &seq.tokens);
            let cached = kv.len();
            let covered = self.running.iter().any(|r| {
                r.namespace == seq.namespace && common_prefix(&r.tokens, &seq.tokens) > cached
            });
            if cached == seq.tokens.len() || covered {
                continue;
            }
            let need = seq.tokens.len() - cached + self.running.len();
            if self.kv.available() < need {
                if !self.running.is_empty() {
                    // Room may come when the running requests end.
                    drop(kv);
                    self.warming.push_front(seq);
                }
                // Alone it can never fit: dropped.
                return;
            }
            seq.admissions += 1;
            self.admissions += 1;
            seq.admitted_at = self.admissions;
            seq.kv = Some(kv);
            self.running.push(seq);
        }
    }

    /// Sends the youngest running request back to the front of the queue, its computed
    /// tokens kept in the cache for a cheap resume; false when every running request has a
    /// token in flight.
    fn preempt_youngest(&mut self) -> bool {
        // Warm-ups first: no one waits on them.
        let Some(i) = (0..self.running.len())
            .filter(|&i| !self.running[i].in_flight)
            .max_by_key(|&i| (self.running[i].warm, self.running[i].admitted_at))
        else {
            return false;
        };
        let mut seq = self.running.swap_remove(i);
        Self::release(&mut seq);
        if seq.warm {
            self.warming.push_front(seq);
            return true;
        }
        tracing::debug!(
            id = seq.id,
            tokens = seq.tokens.len(),
            "preempted for KV memory"
        );
        self.waiting.push_front(seq);
        true
    }

    /// Cache-aware admission order (SGLang's longest-prefix-match policy): requests whose
    /// prompts are cached furthest go first, since they cost least to start and keep their
    /// prefix hot. A stable sort keeps arrival order among equals, and beyond
    /// `CACHE_AWARE_MAX_QUEUE` waiting requests the queue stays first-come first-served, so a
    /// request with nothing cached is never overtaken without bound.
    fn order_waiting_by_cached_prefix(&mut self) {
        if self.prefix_cache == PrefixCacheMode::Off
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
}
