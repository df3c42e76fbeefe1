//! One forward step's input, the same for every backend: each sequence's new tokens and the
//! KV slots of its whole context ([`SeqStep`]), checked and flattened ([`FlatStep`]).

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Which logits a sequence wants from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// A prefill chunk that does not end the prompt.
    None,
    /// The next-token distribution after the last new token.
    Last,
    /// One row per new token (prompt log-probabilities, reference tests).
    All,
}

/// One sequence's part of a forward step.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// Tokens to run now (a prefill chunk, or the last sampled token for a decode).
    pub tokens: &'a [u32],
    /// Slots of the whole context after this step: the stored prefix, then one per new token.
    pub slots: &'a [u32],
    /// Which of the new tokens' logits to return.
    pub logits: LogitsWanted,
}

impl SeqStep<'_> {
    /// Checks one sequence of a step against the model and a KV pool of `pool_slots` slots:
    /// bad batches are errors, whatever the backend.
    pub fn validate(&self, cfg: &ModelConfig, pool_slots: usize) -> Result<()> {
        if self.tokens.is_empty() || self.slots.len() < self.tokens.len() {
            return Err(ModelError::BadBatch(format!(
                "{} new tokens with {} slots",
                self.tokens.len(),
                self.slots.len()
            )));
        }
        if self.slots.len() > cfg.max_position_embeddings {
            return Err(ModelError::ContextOverflow {
                len: self.slots.len(),
                max: cfg.max_position_embeddings,
            });
        }
        if let Some(&t) = self.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                token: t,
                vocab: cfg.vocab_size,
            });
        }
        if let Some(&s) = self.slots.iter().find(|&&s| s as usize >= pool_slots) {
            return Err(ModelError::BadBatch(format!(
                "slot {s} is outside the pool of {pool_slots} slots"
            )));
        }
        Ok(())
    }
}

/// A step's batch flattened for a forward pass, the same for every backend: each new token
/// in batch order with its position and its slot, and the rows whose logits are wanted.
pub(crate) struct FlatStep {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub new_slots: Vec<u32>,
    pub logit_rows: Vec<u32>,
}

impl FlatStep {
    /// Validates every sequence (see [`SeqStep::validate`]), then flattens the batch.
    pub(crate) fn gather(batch: &[SeqStep], cfg: &ModelConfig, pool_slots: usize) -> Result<Self> {
        let mut flat = Self {
            tokens: Vec::new(),
            positions: Vec::new(),
            new_slots: Vec::new(),
            logit_rows: Vec::new(),
        };
        for s in batch {
            s.validate(cfg, pool_slots)?;
            let past = s.slots.len() - s.tokens.len();
            let first_row = flat.tokens.len() as u32;
            flat.tokens.extend_from_slice(s.tokens);
            flat.positions.extend(past..s.slots.len());
            flat.new_slots.extend_from_slice(&s.slots[past..]);
            let end = flat.tokens.len() as u32;
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => flat.logit_rows.push(end - 1),
                LogitsWanted::All => flat.logit_rows.extend(first_row..end),
            }
        }
        Ok(flat)
    }
}
