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

/// Decode-only steps packed for replay (the CUDA backend's graphs): every part of a step's
/// metadata at a fixed offset of one `u32` buffer, so that a captured graph keeps reading the
/// right addresses, and the rows padded up to a bucket.
pub mod decode {
    use super::{LogitsWanted, SeqStep};

    /// Decode batches are padded up to the next of these sizes: one captured graph per bucket
    /// serves every batch size down to the previous bucket.
    pub const BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

    /// The largest decode step that is packed; larger ones run launch by launch.
    pub const MAX_ROWS: usize = 256;

    /// Where each part starts: token ids, positions, new slots, each row's slot-list offset
    /// and key count, the decode row list (0, 1, 2, ...), then the slot lists.
    pub const TOKENS: usize = 0;
    pub const POSITIONS: usize = MAX_ROWS;
    pub const NEW_SLOTS: usize = 2 * MAX_ROWS;
    pub const ROW_OFFSET: usize = 3 * MAX_ROWS;
    pub const ROW_KEYS: usize = 4 * MAX_ROWS;
    pub const ROW_LIST: usize = 5 * MAX_ROWS;
    pub const FLAT: usize = 6 * MAX_ROWS;

    /// Whether `batch` is a step packed here: one new token per row, whose next-token logits
    /// are wanted, and at most [`MAX_ROWS`] rows.
    pub fn takes(batch: &[SeqStep]) -> bool {
        !batch.is_empty()
            && batch.len() <= MAX_ROWS
            && batch.iter().all(|s| {
                s.tokens.len() == 1 && !s.slots.is_empty() && s.logits == LogitsWanted::Last
            })
    }

    /// The bucket `rows` rows are padded to.
    pub fn bucket(rows: usize) -> Option<usize> {
        BUCKETS.into_iter().find(|&b| b >= rows)
    }

    /// Words a packed step of `batch` takes: the fixed parts, every slot list, and one entry
    /// (the scratch slot) that the padding rows attend.
    pub fn words(batch: &[SeqStep]) -> usize {
        FLAT + batch.iter().map(|s| s.slots.len()).sum::<usize>() + 1
    }

    /// What [`pack`] wrote.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Packed {
        /// Rows after padding.
        pub bucket: usize,
        /// Words written (from 0): what goes up to the device.
        pub words: usize,
        /// The longest context of the step (keys of its widest row).
        pub max_keys: usize,
    }

    /// Packs a step [`takes`] accepts into `out` (at least [`words`] long). Row i is
    /// `batch[i]`: its token at position `slots.len() - 1` into its last slot, attending its
    /// whole slot list. Padding rows up to the bucket compute token 0 at position 0 into
    /// `scratch` (a slot no sequence owns) and attend only it.
    pub fn pack(batch: &[SeqStep], scratch: u32, out: &mut [u32]) -> Packed {
        let n = batch.len();
        let bucket = bucket(n).unwrap_or(MAX_ROWS);
        for (i, r) in out[ROW_LIST..ROW_LIST + MAX_ROWS].iter_mut().enumerate() {
            *r = i as u32;
        }
        let mut at = 0usize;
        let mut max_keys = 1;
        for (i, s) in batch.iter().enumerate() {
            let keys = s.slots.len();
            out[TOKENS + i] = s.tokens[0];
            out[POSITIONS + i] = (keys - 1) as u32;
            out[NEW_SLOTS + i] = s.slots[keys - 1];
            out[ROW_OFFSET + i] = at as u32;
            out[ROW_KEYS + i] = keys as u32;
            out[FLAT + at..FLAT + at + keys].copy_from_slice(s.slots);
            at += keys;
            max_keys = max_keys.max(keys);
        }
        out[FLAT + at] = scratch;
        for i in n..bucket {
            out[TOKENS + i] = 0;
            out[POSITIONS + i] = 0;
            out[NEW_SLOTS + i] = scratch;
            out[ROW_OFFSET + i] = at as u32;
            out[ROW_KEYS + i] = 1;
        }
        Packed {
            bucket,
            words: FLAT + at + 1,
            max_keys,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn step<'a>(tokens: &'a [u32], slots: &'a [u32]) -> SeqStep<'a> {
            SeqStep {
                tokens,
                slots,
                logits: LogitsWanted::Last,
            }
        }

        #[test]
        fn rows_pad_to_their_bucket_and_padding_attends_only_the_scratch_slot() {
            let (a, b, c) = ([5u32, 9, 2], [7u32], [4u32, 8, 6, 1, 3]);
            let batch = [step(&[11], &a), step(&[12], &b), step(&[13], &c)];
            assert!(takes(&batch));
            let mut out = vec![u32::MAX; words(&batch)];
            let p = pack(&batch, 99, &mut out);
            assert_eq!(
                p,
                Packed {
                    bucket: 4,
                    words: FLAT + 9 + 1,
                    max_keys: 5
                }
            );
            assert_eq!(p.words, out.len());
            assert_eq!(&out[TOKENS..TOKENS + 4], &[11, 12, 13, 0]);
            // Positions follow the context; the new slot is the last of each list.
            assert_eq!(&out[POSITIONS..POSITIONS + 4], &[2, 0, 4, 0]);
            assert_eq!(&out[NEW_SLOTS..NEW_SLOTS + 4], &[2, 7, 3, 99]);
            assert_eq!(&out[ROW_OFFSET..ROW_OFFSET + 4], &[0, 3, 4, 9]);
            assert_eq!(&out[ROW_KEYS..ROW_KEYS + 4], &[3, 1, 5, 1]);
            assert_eq!(&out[FLAT..FLAT + 10], &[5, 9, 2, 7, 4, 8, 6, 1, 3, 99]);
            assert!(out[ROW_LIST..ROW_LIST + MAX_ROWS]
                .iter()
                .enumerate()
                .all(|(i, &r)| r == i as u32));
            // Each row's slot list, read back through its offset and key count.
            for (i, s) in batch.iter().enumerate() {
                let (o, k) = (out[ROW_OFFSET + i] as usize, out[ROW_KEYS + i] as usize);
                assert_eq!(&out[FLAT + o..FLAT + o + k], s.slots);
            }
        }

        #[test]
        fn only_decode_steps_of_at_most_max_rows_are_packed() {
            let slots = [1u32, 2];
            assert!(!takes(&[]));
            assert!(!takes(&[step(&[1, 2], &slots)]), "a prefill chunk");
            let no_logits = SeqStep {
                logits: LogitsWanted::None,
                ..step(&[1], &slots)
            };
            assert!(!takes(&[no_logits]));
            let many = vec![step(&[1], &slots); MAX_ROWS + 1];
            assert!(!takes(&many));
            assert!(takes(&many[..MAX_ROWS]));
            assert_eq!(bucket(1), Some(1));
            assert_eq!(bucket(3), Some(4));
            assert_eq!(bucket(65), Some(128));
            assert_eq!(bucket(MAX_ROWS), Some(MAX_ROWS));
            assert_eq!(bucket(MAX_ROWS + 1), None);
        }
    }
}
