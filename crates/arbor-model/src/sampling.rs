//! Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, seeded RNG,
//! and the log-probabilities reported with it. This is the one definition of sampling's
//! semantics: every runner samples this way (the CPU runner by calling it; a device sampler
//! must give the same greedy tokens and the same distribution for seeded draws).
//!
//! The order follows vLLM: penalties on the raw logits, then temperature, then the truncations
//! (top-k, top-p, min-p) on the resulting distribution, then a draw. Temperature 0 is greedy
//! (argmax after penalties; ties go to the lowest id, like llama.cpp's and PyTorch's argmax).

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A sampling parameter out of its range, naming it (the server reports it as OpenAI's
/// `param`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct InvalidParam {
    pub param: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub min_p: f32,
    /// Multiplicative penalty on tokens seen in the prompt or output (1 means off; HF/vLLM
    /// semantics: positive logits divided, negative multiplied).
    pub repetition_penalty: f32,
    /// Subtracted once from tokens present in the output (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Same seed, same prompt, same parameters: same tokens.
    pub seed: Option<u64>,
    /// Added to a token's logit before anything else (OpenAI's `logit_bias`; -100 bans it).
    /// Shared, not copied, by the choices of one API call.
    pub logit_bias: Arc<[(u32, f32)]>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Arc::new([]),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks every parameter's range; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |param: &'static str, message: String| Err(InvalidParam { param, message });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("temperature must be >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(
                "min_p",
                format!("min_p must be in [0, 1], got {}", self.min_p),
            );
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be > 0, got {}",
                    self.repetition_penalty
                ),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }
}

/// Per-sequence sampling state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the prompt (for the repetition penalty).
    prompt_tokens: Vec<u32>,
    /// Occurrences of each generated token.
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let mut prompt_tokens = if params.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        prompt_tokens.sort_unstable();
        prompt_tokens.dedup();
        Self {
            params,
            rng,
            prompt_tokens,
            output_counts: HashMap::new(),
        }
    }

    /// Records a generated token (for the penalties).
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_insert(0) += 1;
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(t, bias) in p.logit_bias.iter() {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            // Each distinct token once: the prompt's (sorted, deduplicated), then generated
            // tokens the prompt does not have. No allocation per token.
            let from_output = self
                .output_counts
                .keys()
                .filter(|t| self.prompt_tokens.binary_search(t).is_err());
            for &t in self.prompt_tokens.iter().chain(from_output) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    /// Picks the next token; `banned` tokens (e.g. EOS before `min_tokens`) are never picked.
    pub fn sample(&mut self, logits: &mut [f32], banned: &[u32]) -> u32 {
        let (cand, probs) = self.candidates(logits, banned);
        if cand.len() == 1 {
            return cand[0];
        }
        let mass: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (i, &p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i];
            }
        }
        cand[cand.len() - 1]
    }

    /// The distribution [`Sampler::sample`] draws from: the tokens it can pick, most likely
    /// first, with their probabilities (summing to 1). A device sampler is checked against it.
    pub fn distribution(&self, logits: &mut [f32], banned: &[u32]) -> Vec<(u32, f64)> {
        let (cand, probs) = self.candidates(logits, banned);
        let mass: f64 = probs.iter().map(|&p| p as f64).sum();
        cand.into_iter()
            .zip(probs)
            .map(|(t, p)| (t, p as f64 / mass))
            .collect()
    }

    /// Penalties, bans, temperature and truncation: the candidates in order (logit
    /// descending, then id) with their unnormalized probabilities; one candidate when greedy.
    /// Ties at a cut keep the lowest ids, so the kept set is a function of the logits alone.
    fn candidates(&self, logits: &mut [f32], banned: &[u32]) -> (Vec<u32>, Vec<f32>) {
        self.apply_penalties(logits);
        for &b in banned {
            if let Some(l) = logits.get_mut(b as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let p = &self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return (vec![argmax(logits)], vec![1.0]);
        }
        let by_rank = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        // Candidates sorted by logit, highest first; top-k cuts the list before sorting.
        let mut cand: Vec<u32> = (0..logits.len() as u32).collect();
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_rank);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_rank);
        let max = logits[cand[0] as usize];
        // Unnormalized weights: the maximum's is exactly 1.
        let mut probs: Vec<f32> = cand
            .iter()
            .map(|&t| ((logits[t as usize] - max) / p.temperature).exp())
            .collect();
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            // In f64: an f32 running sum over thousands of candidates drifts by 1e-5 of the
            // total, enough to move the cut by a token (and a GPU's sum in another order with it).
            let need = p.top_p as f64 * probs.iter().map(|&w| w as f64).sum::<f64>();
            let mut cum = 0f64;
            for (i, &w) in probs.iter().enumerate() {
                cum += w as f64;
                if cum >= need {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            // p >= min_p * p_max, with p_max's weight 1.
            keep = keep.min(probs.iter().take_while(|&&w| w >= p.min_p).count().max(1));
        }
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        cand.truncate(keep);
        probs.truncate(keep);
        (cand, probs)
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

/// Index of the largest value; the first one on ties. NaN never wins.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in xs.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            ..Default::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[]), 1);
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[1]), 2);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits = vec![0.1f32; 50];
        let draw = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)), &[]);
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn top_k_and_min_p_restrict_the_support() {
        let base = vec![5.0f32, 4.9, 4.8, 0.0, -1.0, -2.0];
        let mut s = Sampler::new(params(|p| p.top_k = 2), &[]);
        for _ in 0..200 {
            assert!(s.sample(&mut base.clone(), &[]) < 2);
        }
        // min_p 0.5: only tokens with p >= 0.5 * p_max, i.e. the three near 5.
        let mut s = Sampler::new(params(|p| p.min_p = 0.5), &[]);
        for _ in 0..200 {
            assert!(s.sample(&mut base.clone(), &[]) < 3);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // p ~ [0.97, 0.01, ...]: top_p 0.9 keeps only the first.
        let base = vec![10.0f32, 5.5, 5.0, 4.0];
        let mut s = Sampler::new(params(|p| p.top_p = 0.9), &[]);
        for _ in 0..200 {
            assert_eq!(s.sample(&mut base.clone(), &[]), 0);
        }
    }

    #[test]
    fn penalties_change_the_greedy_choice() {
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 1.0,
                ..Default::default()
            },
            &[],
        );
        s.observe(0);
        s.observe(0);
        // 3.0 - 2*1.0 = 1.0 < 2.0
        assert_eq!(s.sample(&mut [3.0, 2.0], &[]), 1);
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..Default::default()
            },
            &[0],
        );
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(s.sample(&mut [3.0, 2.0], &[]), 1);
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 1.5,
                ..Default::default()
            },
            &[],
        );
        s.observe(0);
        assert_eq!(s.sample(&mut [3.0, 2.0], &[]), 1);
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(1, 1.5)].into(),
                ..Default::default()
            },
            &[],
        );
        assert_eq!(s.sample(&mut [3.0, 2.0], &[]), 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25]
        let mut s = Sampler::new(params(|_| {}), &[]);
        let n = 20_000;
        let hits = (0..n)
            .filter(|_| s.sample(&mut [3f32.ln(), 0.0], &[]) == 0)
            .count();
        let frac = hits as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
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

    #[test]
    fn invalid_params_are_rejected() {
        assert_eq!(
            params(|p| p.temperature = -1.0)
                .validate()
                .unwrap_err()
                .param,
            "temperature"
        );
        assert!(params(|p| p.top_p = 0.0).validate().is_err());
        assert!(params(|p| p.min_p = 1.5).validate().is_err());
        assert_eq!(
            params(|p| p.presence_penalty = 3.0)
                .validate()
                .unwrap_err()
                .param,
            "presence_penalty"
        );
        assert!(params(|_| {}).validate().is_ok());
    }
}
