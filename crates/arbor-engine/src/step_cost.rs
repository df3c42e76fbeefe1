//! How long a step takes, learned from the steps run so far: the model behind the per-step
//! time budget ([`crate::EngineConfig::max_step_time`]).
//!
//! A step's time is modelled as linear in what it computes: a fixed part (weights read once,
//! launches), a part per decoding sequence, a part per prefill token (the matmuls), and a part
//! per query-key pair of attention (a prefill chunk over a long cached prefix costs more than
//! the same chunk alone). The coefficients come from least squares over every observed step,
//! kept non-negative (a negative cost would let a step grow without bound). The scheduler asks
//! it how large a prefill chunk fits beside the running decodes: decode latency stays bounded
//! by a time, whatever the prompt lengths, the model or the device, instead of by a token
//! count that means 20 ms on one GPU and 2 s on a CPU.

/// What a step computes, in the terms its time depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Sequences decoding one token.
    pub decode_rows: usize,
    /// Prefill tokens (chunks of prompts).
    pub prefill_tokens: usize,
    /// Query-key pairs of attention over all rows.
    pub attention_pairs: f64,
}

impl StepShape {
    /// Adds a decode over `context` tokens (the new one included).
    pub fn add_decode(&mut self, context: usize) {
        self.decode_rows += 1;
        self.attention_pairs += context as f64;
    }

    /// Adds a prefill chunk of `n` tokens after `computed` ones.
    pub fn add_prefill(&mut self, computed: usize, n: usize) {
        self.prefill_tokens += n;
        self.attention_pairs += chunk_pairs(computed, n);
    }

    fn features(&self) -> [f64; FEATURES] {
        // Scaled to similar sizes for a well-conditioned fit.
        [
            1.0,
            self.decode_rows as f64 / 64.0,
            self.prefill_tokens as f64 / 1024.0,
            self.attention_pairs / 1e6,
        ]
    }
}

/// Query-key pairs of `n` causal queries after `computed` keys.
fn chunk_pairs(computed: usize, n: usize) -> f64 {
    let (c, n) = (computed as f64, n as f64);
    n * c + n * (n + 1.0) / 2.0
}

const FEATURES: usize = 4;
/// Steps with prefill tokens to see before predicting: below it the prefill cost is a guess.
const MIN_PREFILL_OBSERVATIONS: usize = 4;
/// Observations kept at full weight; beyond, old ones fade (the sums are halved), so the
/// model follows a machine whose speed drifts.
const MAX_WEIGHT: f64 = 4096.0;

/// Least squares over observed steps; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct StepCostModel {
    xtx: [[f64; FEATURES]; FEATURES],
    xty: [f64; FEATURES],
    weight: f64,
    prefill_observations: usize,
    coefficients: Option<[f64; FEATURES]>,
}

impl StepCostModel {
    /// Records a step of `shape` that took `seconds`.
    pub fn observe(&mut self, shape: StepShape, seconds: f64) {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return;
        }
        if self.weight >= MAX_WEIGHT {
            self.xtx.iter_mut().flatten().for_each(|v| *v *= 0.5);
            self.xty.iter_mut().for_each(|v| *v *= 0.5);
            self.weight *= 0.5;
        }
        let x = shape.features();
        for i in 0..FEATURES {
            for j in 0..FEATURES {
                self.xtx[i][j] += x[i] * x[j];
            }
            self.xty[i] += x[i] * seconds;
        }
        self.weight += 1.0;
        if shape.prefill_tokens > 0 {
            self.prefill_observations += 1;
        }
        self.coefficients = None;
    }

    /// Predicted seconds of a step of `shape`, once enough steps were seen.
    pub fn predict(&mut self, shape: StepShape) -> Option<f64> {
        if self.prefill_observations < MIN_PREFILL_OBSERVATIONS {
            return None;
        }
        if self.coefficients.is_none() {
            self.coefficients = Some(self.fit());
        }
        let c = self.coefficients?;
        Some(shape.features().iter().zip(c).map(|(x, c)| x * c).sum())
    }

    /// Non-negative least squares by elimination: solve on the active features, drop any whose
    /// coefficient comes out negative, repeat.
    fn fit(&self) -> [f64; FEATURES] {
        let mut active = [true; FEATURES];
        loop {
            let idx: Vec<usize> = (0..FEATURES).filter(|&i| active[i]).collect();
            let Some(sol) = solve(&self.xtx, &self.xty, &idx) else {
                return [0.0; FEATURES];
            };
            match sol.iter().position(|&(_, v)| v < 0.0) {
                Some(k) => active[sol[k].0] = false,
                None => {
                    let mut c = [0.0; FEATURES];
                    for (i, v) in sol {
                        c[i] = v;
                    }
                    return c;
                }
            }
            if !active.iter().any(|&a| a) {
                return [0.0; FEATURES];
            }
        }
    }
}

/// The normal equations restricted to `idx`, by Gaussian elimination with partial pivoting and
/// a small ridge (features that never varied get a zero coefficient, not a singular system).
fn solve(
    xtx: &[[f64; FEATURES]; FEATURES],
    xty: &[f64; FEATURES],
    idx: &[usize],
) -> Option<Vec<(usize, f64)>> {
    let n = idx.len();
    let scale = (0..FEATURES)
        .map(|i| xtx[i][i])
        .fold(0.0, f64::max)
        .max(1e-12);
    let mut a: Vec<Vec<f64>> = idx
        .iter()
        .map(|&i| {
            let mut row: Vec<f64> = idx.iter().map(|&j| xtx[i][j]).collect();
            row.push(xty[i]);
            row
        })
        .collect();
    for (k, row) in a.iter_mut().enumerate() {
        row[k] += scale * 1e-9;
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        a.swap(col, pivot);
        if a[col][col].abs() < 1e-300 {
            return None;
        }
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= f * p;
                }
            }
        }
    }
    Some(
        idx.iter()
            .enumerate()
            .map(|(k, &i)| (i, a[k][n] / a[k][k]))
            .collect(),
    )
}

/// The largest chunk of at most `max` tokens, after `computed` ones, that keeps a step of
/// `base` plus the chunk within `limit` seconds by `model` (at least `min` tokens, so that a
/// prompt always advances). `None` when the model cannot predict yet.
pub fn largest_chunk_within(
    model: &mut StepCostModel,
    base: StepShape,
    computed: usize,
    max: usize,
    min: usize,
    limit: f64,
) -> Option<usize> {
    let with = |n: usize| {
        let mut s = base;
        s.add_prefill(computed, n);
        s
    };
    model.predict(with(max))?;
    // The predicted time grows with n: bisect for the last n within the limit.
    let (mut lo, mut hi) = (0usize, max);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if model.predict(with(mid))? <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo.max(min.min(max)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(decodes: usize, context: usize, prefill: usize, prefill_after: usize) -> StepShape {
        let mut s = StepShape::default();
        for _ in 0..decodes {
            s.add_decode(context);
        }
        if prefill > 0 {
            s.add_prefill(prefill_after, prefill);
        }
        s
    }

    /// A made-up machine: 2 ms a step, 0.1 ms per decode, 20 us per prefill token, 1 ns per
    /// attention pair.
    fn truth(s: StepShape) -> f64 {
        2e-3 + 1e-4 * s.decode_rows as f64
            + 2e-5 * s.prefill_tokens as f64
            + 1e-9 * s.attention_pairs
    }

    #[test]
    fn learns_a_linear_machine_and_bounds_chunks_by_it() {
        let mut m = StepCostModel::default();
        let mut rng = 7u64;
        let mut next = |n: usize| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as usize % n
        };
        assert_eq!(
            m.predict(shape(1, 10, 10, 0)),
            None,
            "no prediction before prefills"
        );
        for i in 0..200 {
            let prefill = if i % 3 == 0 { 1 + next(4000) } else { 0 };
            let s = shape(1 + next(64), 100 + next(4000), prefill, next(8000));
            // 2% noise.
            let noise = 1.0 + (next(1000) as f64 - 500.0) / 25_000.0;
            m.observe(s, truth(s) * noise);
        }
        for s in [
            shape(8, 512, 0, 0),
            shape(64, 2000, 2048, 0),
            shape(1, 100, 500, 7000),
        ] {
            let p = m.predict(s).unwrap();
            assert!(
                (p / truth(s) - 1.0).abs() < 0.05,
                "{s:?}: {p} vs {}",
                truth(s)
            );
        }
        // 64 decodes over 2k tokens leave room for a chunk in a 60 ms step; its true time
        // stays within the limit and one more step of 10% would not.
        let base = shape(64, 2000, 0, 0);
        let n = largest_chunk_within(&mut m, base, 3000, 8192, 64, 0.060).unwrap();
        let mut s = base;
        s.add_prefill(3000, n);
        assert!(truth(s) <= 0.060 * 1.05, "{n}: {}", truth(s));
        let mut bigger = base;
        bigger.add_prefill(3000, n + n / 10);
        assert!(truth(bigger) > 0.060 * 0.97, "{n} is far below the limit");
        // A limit below the decodes alone still moves prompts forward by the minimum.
        assert_eq!(
            largest_chunk_within(&mut m, base, 0, 8192, 64, 1e-6),
            Some(64)
        );
    }

    #[test]
    fn costs_never_go_negative() {
        // Steps whose time falls with prefill tokens (a nonsense machine): the fit drops the
        // feature instead of predicting ever-shorter steps for longer chunks.
        let mut m = StepCostModel::default();
        for i in 0..50 {
            let s = shape(4, 100, 100 * (i % 5 + 1), 0);
            m.observe(s, 0.02 - 0.001 * (i % 5) as f64);
        }
        let small = m.predict(shape(4, 100, 100, 0)).unwrap();
        let large = m.predict(shape(4, 100, 5000, 0)).unwrap();
        assert!(large >= small && small > 0.0, "{small} {large}");
        // Garbage observations are ignored.
        m.observe(shape(1, 1, 1, 0), f64::NAN);
        m.observe(shape(1, 1, 1, 0), -1.0);
        assert!(m.predict(shape(4, 100, 100, 0)).unwrap().is_finite());
    }
}
