//! A runner whose backend computes logit rows and whose host samples them.
//!
//! [`HostSampledRunner`] owns a [`LogitsBackend`] (weights and KV pool on some device) and the
//! sampling state of every registered sequence. Each step it runs the backend's forward pass,
//! then samples the rows on up to one thread per core once the step has enough logits to pay
//! for the threads. Each sequence owns its sampler and seeded RNG, so the tokens are the same
//! however the rows are spread; a panic while sampling one row fails that row alone.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use super::{
    panic_message, FaultInjector, FaultSite, ModelRunner, RowOutcome, Sampled, SeqId,
    SequenceSampling, StepOutput, StepRow,
};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::sampling::{Sampler, TokenLogprob};
use crate::{LogitsWanted, SeqStep};

/// A device that runs the model's forward pass over its own KV pool and returns logit rows
/// (the contract of [`crate::Llama::forward`]: one row per sequence that wants them).
pub trait LogitsBackend: Send {
    fn config(&self) -> &ModelConfig;
    fn device_name(&self) -> String;
    fn kv_slots(&self) -> usize;
    /// Bytes of KV memory one token slot takes (see [`ModelRunner::kv_bytes_per_slot`]).
    fn kv_bytes_per_slot(&self) -> usize {
        self.config().kv_bytes_per_slot()
    }
    fn forward(&mut self, batch: &[SeqStep]) -> Result<Vec<Vec<f32>>>;
    /// Logits of `tokens` from a scratch KV pool of their length.
    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>>;
    /// Test-only: a backend with fault sites of its own (tensor-parallel ranks) calls this.
    fn set_fault_injector(&mut self, _faults: Option<FaultInjector>) {}
}

/// A step of at least this many logits (rows x vocabulary) is sampled on several threads:
/// 64 rows of a 128k vocabulary took 13 ms a step on one thread behind a 26 ms GPU forward
/// pass. Below it, thread start-up costs more than it saves.
pub const DEFAULT_PARALLEL_SAMPLING_MIN_LOGITS: usize = 1 << 20;

/// One sequence's sampling state.
struct SeqSampling {
    sampler: Sampler,
    generated: usize,
    spec: SequenceSampling,
}

impl SeqSampling {
    /// The next token: penalties, bans (stop tokens before `min_tokens`), the draw, and the
    /// log-probabilities of the raw distribution when asked for.
    fn sample(&mut self, mut row: Vec<f32>, allowed: Option<&[u32]>) -> Sampled {
        let banned: &[u32] = if self.generated < self.spec.min_tokens {
            &self.spec.banned_before_min
        } else {
            &[]
        };
        // Log-probabilities come from the raw distribution: keep it until the token is known.
        let raw = self.spec.logprobs.map(|_| row.clone());
        if let Some(mask) = allowed {
            for (t, l) in row.iter_mut().enumerate() {
                if !super::mask_allows(mask, t as u32) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let token = self.sampler.sample(&mut row, banned);
        self.sampler.observe(token);
        self.generated += 1;
        let logprob =
            raw.map(|raw| TokenLogprob::from_logits(&raw, token, self.spec.logprobs.unwrap_or(0)));
        Sampled { token, logprob }
    }

    /// [`SeqSampling::sample`] behind the fault hook and a panic boundary.
    fn sample_isolated(
        &mut self,
        row: Vec<f32>,
        allowed: Option<&[u32]>,
        faults: Option<&FaultInjector>,
    ) -> RowOutcome {
        catch_unwind(AssertUnwindSafe(|| {
            if let Some(f) = faults {
                (f.0)(FaultSite::Sample {
                    prompt: &self.spec.prompt,
                });
            }
            self.sample(row, allowed)
        }))
        .map_err(|p| format!("sampling failed: {}", panic_message(p.as_ref())))
    }
}

/// A [`ModelRunner`] over a [`LogitsBackend`], sampling on the host.
pub struct HostSampledRunner<B> {
    backend: B,
    seqs: HashMap<SeqId, SeqSampling>,
    parallel_min_logits: usize,
    faults: Option<FaultInjector>,
}

impl<B: LogitsBackend> HostSampledRunner<B> {
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            seqs: HashMap::new(),
            parallel_min_logits: DEFAULT_PARALLEL_SAMPLING_MIN_LOGITS,
            faults: None,
        }
    }

    /// Steps with at least this many logits sample their rows on several threads (0: always,
    /// `usize::MAX`: never).
    pub fn with_parallel_sampling_min_logits(mut self, n: usize) -> Self {
        self.parallel_min_logits = n;
        self
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Samples the step's sampling rows, `logits` in row order. The rows' states leave the
    /// map for the step (a step names distinct sequences) and go back after: the work is
    /// per row, never per registered sequence.
    fn sample_rows(&mut self, rows: &[StepRow], logits: Vec<Vec<f32>>) -> Vec<RowOutcome> {
        type Work<'m> = (SeqId, Option<SeqSampling>, Vec<f32>, Option<&'m [u32]>);
        let work: Vec<Work> = rows
            .iter()
            .filter(|r| r.sample)
            .zip(logits)
            .map(|(r, row)| (r.seq, self.seqs.remove(&r.seq), row, r.allowed))
            .collect();
        let faults = self.faults.as_ref();
        let one = |(seq, mut state, row, allowed): Work| {
            let outcome = match state.as_mut() {
                Some(s) => s.sample_isolated(row, allowed, faults),
                None => Err(format!("sequence {seq} was never added to the runner")),
            };
            (seq, state, outcome)
        };
        let total: usize = work.iter().map(|w| w.2.len()).sum();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(work.len());
        let done: Vec<(SeqId, Option<SeqSampling>, RowOutcome)> =
            if threads < 2 || total < self.parallel_min_logits {
                work.into_iter().map(one).collect()
            } else {
                let per_thread = work.len().div_ceil(threads);
                let mut work = work;
                let mut chunks = Vec::new();
                while !work.is_empty() {
                    let rest = work.split_off(per_thread.min(work.len()));
                    chunks.push(std::mem::replace(&mut work, rest));
                }
                let one = &one;
                std::thread::scope(|scope| {
                    let handles: Vec<_> = chunks
                        .into_iter()
                        .map(|chunk| {
                            scope.spawn(move || chunk.into_iter().map(one).collect::<Vec<_>>())
                        })
                        .collect();
                    handles
                        .into_iter()
                        .flat_map(|h| {
                            h.join()
                                .expect("sampling panics are caught per row in sample_isolated")
                        })
                        .collect()
                })
            };
        done.into_iter()
            .map(|(seq, state, outcome)| {
                if let Some(state) = state {
                    self.seqs.insert(seq, state);
                }
                outcome
            })
            .collect()
    }
}

impl<B: LogitsBackend> ModelRunner for HostSampledRunner<B> {
    fn config(&self) -> &ModelConfig {
        self.backend.config()
    }

    fn device_name(&self) -> String {
        self.backend.device_name()
    }

    fn kv_slots(&self) -> usize {
        self.backend.kv_slots()
    }

    fn kv_bytes_per_slot(&self) -> usize {
        self.backend.kv_bytes_per_slot()
    }

    fn add_sequence(&mut self, seq: SeqId, spec: SequenceSampling) {
        let sampler = Sampler::new(spec.params.clone(), &spec.prompt);
        self.seqs.insert(
            seq,
            SeqSampling {
                sampler,
                generated: 0,
                spec,
            },
        );
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    fn step(&mut self, rows: &[StepRow]) -> Result<StepOutput> {
        let batch: Vec<SeqStep> = rows.iter().map(StepRow::seq_step).collect();
        let started = Instant::now();
        let logits = self.backend.forward(&batch)?;
        let forward_seconds = started.elapsed().as_secs_f64();
        Ok(StepOutput {
            sampled: self.sample_rows(rows, logits),
            forward_seconds,
        })
    }

    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>> {
        self.backend.logits_from_scratch(tokens, which)
    }

    fn set_fault_injector(&mut self, faults: Option<FaultInjector>) {
        self.backend.set_fault_injector(faults.clone());
        self.faults = faults;
    }
}
