//! The host side of sampling on a device: per-sequence state and the packed batch a device
//! sampler reads (`cuda/sampler.cu` reads exactly this layout). Plain host code, so that the
//! CPU build tests it: the adjustments it derives reproduce [`crate::sampling::Sampler`]'s
//! penalties, bias and bans to the bit.

use std::collections::BTreeMap;

use crate::sampling::SamplingParams;

/// Most top alternatives a row reports (OpenAI's limit; `MAX_TOP` in the kernel).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Words of one row's parameters (`RowParams` in the kernel).
pub const ROW_WORDS: usize = 16;
/// Words of one [`Adjust`] entry.
pub const ADJUST_WORDS: usize = 4;
/// Words of one row's result: token, log-probability, top ids, top log-probabilities.
pub const OUT_WORDS: usize = 2 + 2 * MAX_TOP_LOGPROBS;

/// How one token's logit changes before sampling, in the CPU sampler's order: `bias` added,
/// then the repetition penalty where `repetition`, then `subtract` (presence + frequency x
/// count), then a ban.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adjust {
    pub token: u32,
    pub bias: f32,
    pub repetition: bool,
    pub subtract: f32,
    pub banned: bool,
}

impl Adjust {
    /// The adjusted logit, as the device computes it (IEEE single precision, in this order).
    pub fn apply(&self, logit: f32, repetition_penalty: f32) -> f32 {
        let mut l = logit + self.bias;
        if self.repetition {
            l = if l > 0.0 {
                l / repetition_penalty
            } else {
                l * repetition_penalty
            };
        }
        l -= self.subtract;
        if self.banned {
            f32::NEG_INFINITY
        } else {
            l
        }
    }
}

/// A token whose logit changes whatever the sequence generated.
#[derive(Debug, Clone, Copy)]
struct FixedAdjust {
    token: u32,
    bias: f32,
    in_prompt: bool,
    stop_token: bool,
}

/// One sequence's sampling state on the host side of the GPU sampler: its Philox key, its
/// draw count (the counter: a preempted sequence continues its stream), the output token
/// counts the penalties read, and the adjustments fixed at registration (logit bias, prompt
/// tokens under a repetition penalty, stop tokens banned before `min_tokens`), sorted by token.
#[derive(Debug)]
pub struct SeqSamplingState {
    params: SamplingParams,
    min_tokens: usize,
    seed: u64,
    draws: u64,
    generated: usize,
    /// Sorted by token, one entry per token.
    fixed: Vec<FixedAdjust>,
    /// Generated tokens and their counts, kept when a penalty reads them.
    output_counts: BTreeMap<u32, u32>,
    counts_output: bool,
}

impl SeqSamplingState {
    /// `seed` from the parameters, or a random one.
    pub fn new(
        params: &SamplingParams,
        prompt: &[u32],
        min_tokens: usize,
        banned_before_min: &[u32],
    ) -> Self {
        let p = params;
        let mut fixed: Vec<FixedAdjust> = Vec::new();
        let entry = |token| FixedAdjust {
            token,
            bias: 0.0,
            in_prompt: false,
            stop_token: false,
        };
        for &(token, bias) in p.logit_bias.iter() {
            let mut e = entry(token);
            e.bias = bias;
            fixed.push(e);
        }
        if p.repetition_penalty != 1.0 {
            fixed.extend(prompt.iter().map(|&t| FixedAdjust {
                in_prompt: true,
                ..entry(t)
            }));
        }
        if min_tokens > 0 {
            fixed.extend(banned_before_min.iter().map(|&t| FixedAdjust {
                stop_token: true,
                ..entry(t)
            }));
        }
        fixed.sort_by_key(|e| e.token);
        // One entry per token: biases add up, flags combine.
        fixed.dedup_by(|later, kept| {
            if later.token != kept.token {
                return false;
            }
            kept.bias += later.bias;
            kept.in_prompt |= later.in_prompt;
            kept.stop_token |= later.stop_token;
            true
        });
        let counts_output =
            p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        Self {
            seed: p.seed.unwrap_or_else(rand::random),
            params: p.clone(),
            min_tokens,
            draws: 0,
            generated: 0,
            fixed,
            output_counts: BTreeMap::new(),
            counts_output,
        }
    }

    /// This step's adjustments: the fixed entries merged with the output counts, in token
    /// order, each token once, those that change nothing left out.
    pub fn adjustments(&self) -> impl Iterator<Item = Adjust> + '_ {
        let p = &self.params;
        let before_min = self.generated < self.min_tokens;
        let mut fixed = self.fixed.iter().peekable();
        let mut counts = self.output_counts.iter().peekable();
        // (token, its fixed entry, its output count), in token order.
        std::iter::from_fn(move || {
            let next_fixed = fixed.peek().map(|f| f.token);
            let next_counted = counts.peek().map(|(&t, _)| t);
            match (next_fixed, next_counted) {
                (None, None) => None,
                (Some(a), Some(b)) if a == b => {
                    let n = counts.next().map_or(0, |(_, &n)| n);
                    Some((a, fixed.next().copied(), n))
                }
                (Some(a), b) if b.is_none_or(|b| a < b) => Some((a, fixed.next().copied(), 0)),
                _ => counts.next().map(|(&t, &n)| (t, None, n)),
            }
        })
        .filter_map(move |(token, f, count)| {
            let a = Adjust {
                token,
                bias: f.map_or(0.0, |f| f.bias),
                repetition: p.repetition_penalty != 1.0
                    && (count > 0 || f.is_some_and(|f| f.in_prompt)),
                subtract: if count > 0 && (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0)
                {
                    p.presence_penalty + p.frequency_penalty * count as f32
                } else {
                    0.0
                },
                banned: before_min && f.is_some_and(|f| f.stop_token),
            };
            let changes = a.bias != 0.0 || a.repetition || a.subtract != 0.0 || a.banned;
            changes.then_some(a)
        })
    }

    /// Records a drawn token: the next draw uses the next counter ([`Self::begin_draw`] and
    /// [`Self::count_output`] in one).
    pub fn observe(&mut self, token: u32) {
        self.begin_draw();
        self.count_output(token);
    }

    /// A draw was packed (its counter used): the next one uses the next counter, and it counts
    /// toward `min_tokens`. Called when the row is launched, so that a step launched before
    /// this one's token is back draws fresh numbers.
    pub fn begin_draw(&mut self) {
        self.draws += 1;
        self.generated += 1;
    }

    /// The drawn token, for the penalties (which therefore need it before the next launch).
    pub fn count_output(&mut self, token: u32) {
        if self.counts_output {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
    }
}

/// The rows of one sampling launch, packed as the kernel reads them.
#[derive(Debug, Default)]
pub struct SampleBatch {
    rows: Vec<u32>,
    adjust: Vec<u32>,
    top_n: Vec<Option<usize>>,
}

impl SampleBatch {
    pub fn clear(&mut self) {
        self.rows.clear();
        self.adjust.clear();
        self.top_n.clear();
    }

    pub fn len(&self) -> usize {
        self.top_n.len()
    }

    pub fn is_empty(&self) -> bool {
        self.top_n.is_empty()
    }

    /// The rows' parameters, [`ROW_WORDS`] each.
    pub fn row_words(&self) -> &[u32] {
        &self.rows
    }

    /// The adjustment entries, [`ADJUST_WORDS`] each.
    pub fn adjust_words(&self) -> &[u32] {
        &self.adjust
    }

    /// Per row: the top alternatives asked for, or no log-probabilities.
    pub fn top_n(&self) -> &[Option<usize>] {
        &self.top_n
    }

    /// The logit row each sampling row reads.
    pub fn logit_rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.rows.chunks_exact(ROW_WORDS).map(|r| r[12] as usize)
    }

    /// A row sampling logit row `logit_row` with `params`; `seed` and `draw` pick the random
    /// numbers (a sequence's seed and how many tokens it drew before); `adjust` names each
    /// changed token once; `top_n` asks for log-probabilities with that many alternatives.
    pub fn push(
        &mut self,
        logit_row: usize,
        params: &SamplingParams,
        seed: u64,
        draw: u64,
        top_n: Option<usize>,
        adjust: impl IntoIterator<Item = Adjust>,
    ) {
        let start = self.adjust.len() / ADJUST_WORDS;
        for a in adjust {
            let flags = u32::from(a.repetition) | (u32::from(a.banned) << 1);
            self.adjust
                .extend([a.token, a.bias.to_bits(), a.subtract.to_bits(), flags]);
        }
        let len = self.adjust.len() / ADJUST_WORDS - start;
        let top_n = top_n.map(|n| n.min(MAX_TOP_LOGPROBS));
        let top_k = u32::try_from(params.top_k).unwrap_or(u32::MAX);
        self.rows.extend([
            params.temperature.to_bits(),
            params.top_p.to_bits(),
            params.min_p.to_bits(),
            params.repetition_penalty.to_bits(),
            top_k,
            start as u32,
            len as u32,
            top_n.map_or(-1i32, |n| n as i32) as u32,
            seed as u32,
            (seed >> 32) as u32,
            draw as u32,
            (draw >> 32) as u32,
            logit_row as u32,
            // The row's token mask, in words into the adjustment region (none).
            u32::MAX,
            0,
            0,
        ]);
        self.top_n.push(top_n);
    }
}

impl SampleBatch {
    /// A row for a registered sequence: its parameters and state; `allowed` (a
    /// `StepRow::allowed` mask over `vocab` tokens) bans every token it leaves out.
    pub fn push_seq(
        &mut self,
        logit_row: usize,
        state: &SeqSamplingState,
        top_n: Option<usize>,
        allowed: Option<(&[u32], usize)>,
    ) {
        self.push(
            logit_row,
            &state.params,
            state.seed,
            state.draws,
            top_n,
            state.adjustments(),
        );
        if let Some((mask, vocab)) = allowed {
            self.push_mask(mask, vocab);
        }
    }

    /// Restricts the last row pushed to the tokens `mask` allows (bit `t % 32` of word
    /// `t / 32`), as if every other token were banned: the kernel reads the mask's
    /// `vocab.div_ceil(32)` words from the adjustment region, where the row's word 13 says
    /// (`u32::MAX`: no mask), padded to whole entries so later rows' entries stay aligned.
    pub fn push_mask(&mut self, mask: &[u32], vocab: usize) {
        let row = self.rows.len() - ROW_WORDS;
        self.rows[row + 13] = self.adjust.len() as u32;
        let words = vocab.div_ceil(32);
        self.adjust
            .extend((0..words).map(|i| mask.get(i).copied().unwrap_or(0)));
        let padded = self.adjust.len().next_multiple_of(ADJUST_WORDS);
        self.adjust.resize(padded, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::{greedy_cases, sampler_cases, SamplerCase};

    fn state_of(case: &SamplerCase) -> SeqSamplingState {
        case.device_state()
    }

    /// What a device does with the adjustments must equal the CPU sampler's penalties, bias
    /// and bans to the bit: the GPU's greedy tokens depend on it.
    #[test]
    fn adjustments_reproduce_the_cpu_samplers_logits_bit_for_bit() {
        let cases: Vec<SamplerCase> = (0..4)
            .flat_map(|seed| sampler_cases(1000, seed))
            .chain(greedy_cases(1000, 12, 3))
            .collect();
        let mut adjusted_somewhere = 0;
        for case in &cases {
            let mut device = case.logits.clone();
            let state = state_of(case);
            let mut seen = std::collections::HashSet::new();
            for a in state.adjustments() {
                assert!(
                    seen.insert(a.token),
                    "{}: token {} twice",
                    case.name,
                    a.token
                );
                if let Some(l) = device.get_mut(a.token as usize) {
                    *l = a.apply(*l, case.params.repetition_penalty);
                }
            }
            adjusted_somewhere += usize::from(!seen.is_empty());
            let mut cpu = case.logits.clone();
            case.cpu_sampler().distribution(&mut cpu, case.banned());
            for (i, (d, c)) in device.iter().zip(&cpu).enumerate() {
                assert_eq!(
                    d.to_bits(),
                    c.to_bits(),
                    "{}: token {i}: {d} vs {c}",
                    case.name
                );
            }
        }
        // The cases exercise the adjustments, not only plain logits.
        assert!(
            adjusted_somewhere >= 16,
            "{adjusted_somewhere} of {}",
            cases.len()
        );
    }

    #[test]
    fn bans_last_until_min_tokens_and_draws_count_up() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(9),
            ..Default::default()
        };
        let mut s = SeqSamplingState::new(&params, &[1, 2, 3], 2, &[5, 7]);
        let banned = |s: &SeqSamplingState| {
            s.adjustments()
                .filter(|a| a.banned)
                .map(|a| a.token)
                .collect::<Vec<_>>()
        };
        assert_eq!(banned(&s), vec![5, 7]);
        s.observe(4);
        assert_eq!(banned(&s), vec![5, 7]);
        s.observe(4);
        assert!(banned(&s).is_empty());
        assert_eq!((s.seed, s.draws), (9, 2));
        // No penalties: the output counts are not kept, nothing to adjust.
        assert_eq!(s.adjustments().count(), 0);
        // Unseeded sequences get their own streams.
        let unseeded = SamplingParams {
            seed: None,
            ..params
        };
        let (a, b) = (
            SeqSamplingState::new(&unseeded, &[], 0, &[]),
            SeqSamplingState::new(&unseeded, &[], 0, &[]),
        );
        assert_ne!(a.seed, b.seed);
    }

    #[test]
    fn a_batch_packs_rows_as_the_kernel_reads_them() {
        let params = SamplingParams {
            temperature: 0.5,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.1,
            repetition_penalty: 1.2,
            ..Default::default()
        };
        let mut b = SampleBatch::default();
        let adjust = |token| Adjust {
            token,
            bias: 1.5,
            repetition: true,
            subtract: 0.25,
            banned: token == 8,
        };
        b.push(
            3,
            &params,
            0x1_0000_0002,
            0x3_0000_0004,
            Some(50),
            [adjust(7)],
        );
        b.push(1, &params, 5, 6, None, [adjust(8), adjust(9)]);
        assert_eq!(b.len(), 2);
        let r = b.row_words();
        assert_eq!(r.len(), 2 * ROW_WORDS);
        assert_eq!(f32::from_bits(r[0]), 0.5);
        assert_eq!(f32::from_bits(r[1]), 0.9);
        assert_eq!(f32::from_bits(r[2]), 0.1);
        assert_eq!(f32::from_bits(r[3]), 1.2);
        assert_eq!(&r[4..8], &[40, 0, 1, MAX_TOP_LOGPROBS as u32]);
        assert_eq!(&r[8..13], &[2, 1, 4, 3, 3]);
        // The second row's entries start after the first's; no log-probabilities is -1.
        assert_eq!(&r[ROW_WORDS + 4..ROW_WORDS + 8], &[40, 1, 2, u32::MAX]);
        assert_eq!(b.logit_rows().collect::<Vec<_>>(), vec![3, 1]);
        assert_eq!(b.top_n(), &[Some(MAX_TOP_LOGPROBS), None]);
        let a = b.adjust_words();
        assert_eq!(a.len(), 3 * ADJUST_WORDS);
        assert_eq!(
            &a[4..8],
            &[8, 1.5f32.to_bits(), 0.25f32.to_bits(), 0b11],
            "token, bias, subtract, flags (1 repetition, 2 banned)"
        );
        b.clear();
        assert!(b.is_empty() && b.row_words().is_empty() && b.adjust_words().is_empty());
    }

    /// A mask travels as bits after the row's own entries, whole entries long, and the next
    /// row's entries start after it; rows without one say so.
    #[test]
    fn a_mask_is_packed_after_its_rows_entries() {
        let params = SamplingParams::default();
        let adjust = |token| Adjust {
            token,
            bias: 1.0,
            repetition: false,
            subtract: 0.0,
            banned: false,
        };
        let mut b = SampleBatch::default();
        b.push(0, &params, 1, 0, None, [adjust(3)]);
        let vocab = 70; // 3 words of mask, padded to 4
        b.push_mask(&[0xFFFF_0000, 0x1, 0x8000_0000, 0xDEAD], vocab);
        b.push(1, &params, 1, 0, None, [adjust(4), adjust(5)]);
        let r = b.row_words();
        assert_eq!(
            r[13], ADJUST_WORDS as u32,
            "the mask follows row 0's one entry"
        );
        assert_eq!(r[ROW_WORDS + 13], u32::MAX, "row 1 has no mask");
        let a = b.adjust_words();
        assert_eq!(
            &a[4..8],
            &[0xFFFF_0000, 0x1, 0x8000_0000, 0],
            "3 words, padded"
        );
        assert_eq!(
            r[ROW_WORDS + 5],
            2,
            "row 1's entries start after the mask's entry"
        );
        assert_eq!(a[8], 4);
        assert_eq!(a.len(), 4 * ADJUST_WORDS);
    }
}
