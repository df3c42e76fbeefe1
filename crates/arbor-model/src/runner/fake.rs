//! A deterministic toy model for testing what sits above the seam (scheduling, preemption,
//! cancellation, prefix sharing, fault handling) without model files, in microseconds.
//!
//! Its "K/V" for a slot is a hash of the token written there and its position; a row's logits
//! are a hash of everything its slot list holds, in order. So, like a real model, a sequence's
//! next token depends on every token of its context and where it stands, and only on that:
//! a slot list that points at the wrong K/V (a bad cache match, a slot freed and reused while
//! still in use, a wrong position) changes the output, and a slot read before anything was
//! written to it is an error. Batching never changes an output, exactly as with Arbor's
//! batch-invariant kernels, so "cache on = cache off" and "batched = alone" hold bit for bit.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::host::{HostSampledRunner, LogitsBackend};
use crate::config::{ModelConfig, RopeScaling, RopeStyle};
use crate::error::{ModelError, Result};
use crate::step::{LogitsWanted, SeqStep};
use crate::text::tokenizer::Tokenizer;

/// The toy model's end-of-sequence token.
pub const FAKE_EOS: u32 = 3;

/// The shape of a toy model.
#[derive(Debug, Clone, Copy)]
pub struct FakeModel {
    pub vocab: usize,
    pub context: usize,
    pub kv_slots: usize,
}

impl Default for FakeModel {
    fn default() -> Self {
        Self {
            vocab: 128,
            context: 4096,
            kv_slots: 4096,
        }
    }
}

/// Switches and counters a test shares with a running fake backend.
#[derive(Debug, Default)]
pub struct FakeControls {
    /// The next forward pass fails (once), as a device fault would.
    pub fail_next_forward: AtomicBool,
    /// Forward passes run.
    pub forwards: AtomicU64,
    /// The most rows one forward pass had.
    pub widest_batch: AtomicUsize,
    /// Tokens whose K/V were computed (prefill and decode), over all passes.
    pub tokens_computed: AtomicU64,
}

pub struct FakeBackend {
    config: ModelConfig,
    /// Per slot: a hash of (token, position), or `None` before anything was written.
    kv: Vec<Option<u64>>,
    controls: Arc<FakeControls>,
}

/// SplitMix64's finalizer: a cheap, well-mixed hash step.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl FakeBackend {
    pub fn new(model: FakeModel) -> (Self, Arc<FakeControls>) {
        let controls = Arc::new(FakeControls::default());
        let config = ModelConfig {
            architecture: "fake".into(),
            vocab_size: model.vocab,
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Halves,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: model.context,
            tie_word_embeddings: true,
            qkv_bias: false,
            ggml_rope_angles: false,
        };
        let backend = Self {
            config,
            kv: vec![None; model.kv_slots],
            controls: controls.clone(),
        };
        (backend, controls)
    }

    /// The logits after a context whose K/V entries are `entries`, in order.
    fn logits(&self, entries: impl Iterator<Item = u64>) -> Vec<f32> {
        let h = entries.fold(0x5EED_u64, |h, e| mix(h ^ e));
        (0..self.config.vocab_size as u64)
            .map(|t| {
                // In [0, 8): spread enough for a clear argmax, soft enough for sampling.
                (mix(h ^ mix(t + 1)) >> 40) as f32 / (1u64 << 24) as f32 * 8.0
            })
            .collect()
    }

    fn entry(token: u32, position: usize) -> u64 {
        mix(((position as u64) << 32) | u64::from(token))
    }

    fn check(&self, step: &SeqStep) -> Result<()> {
        step.validate(&self.config, self.kv.len())
    }
}

impl LogitsBackend for FakeBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device_name(&self) -> String {
        "fake".into()
    }

    fn kv_slots(&self) -> usize {
        self.kv.len()
    }

    fn forward(&mut self, batch: &[SeqStep]) -> Result<Vec<Vec<f32>>> {
        self.controls.forwards.fetch_add(1, Ordering::Relaxed);
        self.controls
            .widest_batch
            .fetch_max(batch.len(), Ordering::Relaxed);
        if self
            .controls
            .fail_next_forward
            .swap(false, Ordering::SeqCst)
        {
            return Err(ModelError::Cuda("injected device fault".into()));
        }
        for step in batch {
            self.check(step)?;
        }
        let mut rows = Vec::new();
        for step in batch {
            let start = step.slots.len() - step.tokens.len();
            for (j, (&t, &slot)) in step.tokens.iter().zip(&step.slots[start..]).enumerate() {
                self.kv[slot as usize] = Some(Self::entry(t, start + j));
            }
            self.controls
                .tokens_computed
                .fetch_add(step.tokens.len() as u64, Ordering::Relaxed);
            let upto = |n: usize| -> Result<Vec<f32>> {
                let mut entries = Vec::with_capacity(n);
                for &slot in &step.slots[..n] {
                    entries.push(self.kv[slot as usize].ok_or_else(|| {
                        ModelError::BadBatch(format!("slot {slot} read before it was written"))
                    })?);
                }
                Ok(self.logits(entries.into_iter()))
            };
            match step.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => rows.push(upto(step.slots.len())?),
                LogitsWanted::All => {
                    for n in start + 1..=step.slots.len() {
                        rows.push(upto(n)?);
                    }
                }
            }
        }
        Ok(rows)
    }

    fn logits_from_scratch(&self, tokens: &[u32], which: LogitsWanted) -> Result<Vec<Vec<f32>>> {
        let entries = |n: usize| (0..n).map(|p| Self::entry(tokens[p], p));
        Ok(match which {
            LogitsWanted::None => Vec::new(),
            LogitsWanted::Last => vec![self.logits(entries(tokens.len()))],
            LogitsWanted::All => (1..=tokens.len())
                .map(|n| self.logits(entries(n)))
                .collect(),
        })
    }
}

/// A fake runner, its tokenizer (one character per token id below 128, [`FAKE_EOS`] its stop
/// token) and its controls.
pub fn runner(model: FakeModel) -> (HostSampledRunner<FakeBackend>, Tokenizer, Arc<FakeControls>) {
    let (backend, controls) = FakeBackend::new(model);
    let mut tokenizer =
        Tokenizer::placeholder(model.vocab).expect("the placeholder tokenizer is well formed");
    tokenizer.stop_ids = vec![FAKE_EOS];
    (HostSampledRunner::new(backend), tokenizer, controls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{ModelRunner, SequenceSampling, StepRow};
    use crate::sampling::SamplingParams;

    fn greedy(prompt: &[u32]) -> SequenceSampling {
        SequenceSampling {
            params: SamplingParams::greedy(),
            prompt: prompt.into(),
            min_tokens: 0,
            banned_before_min: Arc::new([]),
            logprobs: None,
        }
    }

    #[test]
    fn the_output_depends_on_the_kv_behind_the_slots_and_nothing_else() {
        let (mut r, _, _) = runner(FakeModel::default());
        let prompt = [10u32, 11, 12, 13];
        let want = crate::sampling::argmax(
            &r.logits_from_scratch(&prompt, LogitsWanted::Last).unwrap()[0],
        );
        r.add_sequence(1, greedy(&prompt));
        // Prefill in two chunks into scattered slots: the same token as from scratch.
        let slots = [40u32, 7, 300, 2];
        let out = r
            .step(&[StepRow {
                seq: 1,
                tokens: &prompt[..2],
                slots: &slots[..2],
                sample: false,
                allowed: None,
            }])
            .unwrap();
        assert!(out.sampled.is_empty());
        let out = r
            .step(&[StepRow {
                seq: 1,
                tokens: &prompt[2..],
                slots: &slots,
                sample: true,
                allowed: None,
            }])
            .unwrap();
        assert_eq!(out.sampled[0].as_ref().unwrap().token, want);
        // A slot list pointing at other K/V gives another distribution; unwritten slots fail.
        let other = r
            .logits_from_scratch(&[10, 11, 13, 12], LogitsWanted::Last)
            .unwrap();
        let same = r.logits_from_scratch(&prompt, LogitsWanted::Last).unwrap();
        assert_ne!(other, same);
        r.add_sequence(2, greedy(&[1]));
        let e = r.step(&[StepRow {
            seq: 2,
            tokens: &[1],
            slots: &[999, 5],
            sample: true,
            allowed: None,
        }]);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("read before it was written"));
    }
}
