//! Turning request records into rows, summaries and verdicts.
//!
//! A row (one test, one target) is computed per repeat, then averaged over repeats; the spread
//! across repeats is the noise a difference between targets is judged against.

use serde::{Deserialize, Serialize};

use crate::runner::RequestRecord;

/// mean, p50, p90, p99 of a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Percentile by linear interpolation between closest ranks (numpy's default).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn summarize(values: impl IntoIterator<Item = f64>) -> Option<Summary> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(Summary {
        n: v.len(),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: percentile(&v, 0.5),
        p90: percentile(&v, 0.9),
        p99: percentile(&v, 0.99),
    })
}

/// Mean and sample standard deviation.
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Decode speed of one request: tokens after the first over the time after the first.
pub fn decode_tps(r: &RequestRecord) -> Option<f64> {
    let (ttft, n) = (r.m.ttft?, r.m.completion_tokens?);
    let t = r.m.e2e - ttft;
    (n > 1 && t > 0.0).then(|| (n - 1) as f64 / t)
}

/// Overall speed of one request: response tokens over its whole duration (the published
/// tables' tok/s).
pub fn overall_tps(r: &RequestRecord) -> Option<f64> {
    let n = r.m.completion_tokens?;
    (r.m.e2e > 0.0 && r.m.error.is_none()).then(|| n as f64 / r.m.e2e)
}

/// Time per output token after the first.
pub fn tpot(r: &RequestRecord) -> Option<f64> {
    decode_tps(r).map(|t| 1.0 / t)
}

/// One table row: a test on a target, mean over its requests in one repeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    /// The repeat this row measured (rows of two targets are paired by it).
    #[serde(default)]
    pub repeat: usize,
    pub requests: usize,
    pub errors: usize,
    pub duration_s: f64,
    pub ttft_s: f64,
    pub prompt_tokens: f64,
    pub cached_tokens: Option<f64>,
    pub response_tokens: f64,
    pub decode_tps: f64,
    pub overall_tps: f64,
    /// Any count here was estimated rather than reported.
    pub estimated: bool,
}

fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

pub fn row(records: &[&RequestRecord]) -> Row {
    let ok: Vec<&&RequestRecord> = records.iter().filter(|r| r.m.error.is_none()).collect();
    let cached: Vec<f64> = ok
        .iter()
        .filter_map(|r| r.m.cached_tokens.map(|c| c as f64))
        .collect();
    Row {
        repeat: records.first().map_or(0, |r| r.repeat),
        requests: records.len(),
        errors: records.len() - ok.len(),
        duration_s: mean(ok.iter().map(|r| r.m.e2e)),
        ttft_s: mean(ok.iter().filter_map(|r| r.m.ttft)),
        prompt_tokens: mean(
            ok.iter()
                .filter_map(|r| r.m.prompt_tokens.map(|p| p as f64)),
        ),
        cached_tokens: (!cached.is_empty() && cached.len() == ok.len()).then(|| mean(cached)),
        response_tokens: mean(
            ok.iter()
                .filter_map(|r| r.m.completion_tokens.map(|c| c as f64)),
        ),
        decode_tps: mean(ok.iter().filter_map(|r| decode_tps(r))),
        overall_tps: mean(ok.iter().filter_map(|r| overall_tps(r))),
        estimated: ok.iter().any(|r| {
            r.m.prompt_source != Some(crate::client::CountSource::Usage)
                || r.m.completion_source != Some(crate::client::CountSource::Usage)
        }),
    }
}

/// A metric over repeats.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Spread {
    pub mean: f64,
    /// Sample standard deviation across repeats (NaN with one repeat).
    pub sd: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        let (mean, sd) = mean_sd(&v);
        Spread {
            mean,
            sd,
            n: v.len(),
        }
    }
}

/// How two targets compare on one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    /// `winner` is `ratio` times better.
    Better {
        winner: String,
        loser: String,
        ratio: f64,
    },
    /// The difference is within run-to-run noise.
    WithinNoise { a: String, b: String, ratio: f64 },
    /// One run each: noise unknown.
    Unknown {
        winner: String,
        loser: String,
        ratio: f64,
    },
}

/// Compares `a` and `b` (higher is better unless `lower_is_better`). A difference counts when
/// the means are further apart than twice the standard error of their difference (about 95%
/// confidence for normal noise), and by more than 2% (below that no one should care).
pub fn judge(
    a_name: &str,
    a: Spread,
    b_name: &str,
    b: Spread,
    lower_is_better: bool,
) -> Option<Verdict> {
    if !(a.mean.is_finite() && b.mean.is_finite()) || a.mean <= 0.0 || b.mean <= 0.0 {
        return None;
    }
    let a_better = if lower_is_better {
        a.mean < b.mean
    } else {
        a.mean > b.mean
    };
    let (w, l, wn, ln) = if a_better {
        (a, b, a_name, b_name)
    } else {
        (b, a, b_name, a_name)
    };
    let ratio = if lower_is_better {
        l.mean / w.mean
    } else {
        w.mean / l.mean
    };
    if a.n < 2 || b.n < 2 || !a.sd.is_finite() || !b.sd.is_finite() {
        return Some(Verdict::Unknown {
            winner: wn.into(),
            loser: ln.into(),
            ratio,
        });
    }
    let se = (a.sd.powi(2) / a.n as f64 + b.sd.powi(2) / b.n as f64).sqrt();
    if (a.mean - b.mean).abs() <= 2.0 * se || ratio < 1.02 {
        return Some(Verdict::WithinNoise {
            a: a_name.into(),
            b: b_name.into(),
            ratio,
        });
    }
    Some(Verdict::Better {
        winner: wn.into(),
        loser: ln.into(),
        ratio,
    })
}

impl Verdict {
    pub fn sentence(&self, what: &str, test: &str) -> String {
        match self {
            Verdict::Better { winner, loser, ratio } => {
                format!("{winner} was {ratio:.2}x faster than {loser} in {what} on {test}")
            }
            Verdict::WithinNoise { a, b, ratio } => {
                format!("no real difference between {a} and {b} in {what} on {test}: {ratio:.2}x is within run-to-run noise")
            }
            Verdict::Unknown { winner, loser, ratio } => format!(
                "{winner} was {ratio:.2}x faster than {loser} in {what} on {test} (one run each: noise unknown, use --repeats 3)"
            ),
        }
    }
}

/// Aggregates over a whole run (every test): latency distributions and throughput.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunSummary {
    pub requests: usize,
    pub errors: usize,
    pub ttft: Option<Summary>,
    pub tpot: Option<Summary>,
    pub itl: Option<Summary>,
    pub e2e: Option<Summary>,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Cached / prompt tokens, when the server reports cached tokens.
    pub cache_hit_ratio: Option<f64>,
}

pub fn run_summary(records: &[&RequestRecord], wall_s: f64) -> RunSummary {
    let ok: Vec<&&RequestRecord> = records.iter().filter(|r| r.m.error.is_none()).collect();
    let prompt: usize = ok.iter().filter_map(|r| r.m.prompt_tokens).sum();
    let cached: Vec<usize> = ok.iter().filter_map(|r| r.m.cached_tokens).collect();
    let out: usize = ok.iter().filter_map(|r| r.m.completion_tokens).sum();
    RunSummary {
        requests: records.len(),
        errors: records.len() - ok.len(),
        ttft: summarize(ok.iter().filter_map(|r| r.m.ttft)),
        tpot: summarize(ok.iter().filter_map(|r| tpot(r))),
        itl: summarize(ok.iter().flat_map(|r| r.m.itl.iter().copied())),
        e2e: summarize(ok.iter().map(|r| r.m.e2e)),
        requests_per_s: if wall_s > 0.0 {
            ok.len() as f64 / wall_s
        } else {
            0.0
        },
        output_tokens_per_s: if wall_s > 0.0 {
            out as f64 / wall_s
        } else {
            0.0
        },
        cache_hit_ratio: (cached.len() == ok.len() && prompt > 0)
            .then(|| cached.iter().sum::<usize>() as f64 / prompt as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 4.0);
        let s = summarize([3.0, f64::NAN, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.mean, s.p50), (3, 2.0, 2.0));
        assert!(summarize([]).is_none());
    }

    #[test]
    fn verdicts_respect_noise() {
        let s = |mean, sd| Spread { mean, sd, n: 3 };
        // Clearly apart.
        match judge("a", s(100.0, 2.0), "b", s(80.0, 2.0), false).unwrap() {
            Verdict::Better { winner, ratio, .. } => {
                assert_eq!(winner, "a");
                assert!((ratio - 1.25).abs() < 1e-9);
            }
            v => panic!("{v:?}"),
        }
        // Same means up to noise.
        assert!(matches!(
            judge("a", s(100.0, 10.0), "b", s(95.0, 10.0), false).unwrap(),
            Verdict::WithinNoise { .. }
        ));
        // Lower is better (TTFT): b wins.
        match judge("a", s(2.0, 0.01), "b", s(1.0, 0.01), true).unwrap() {
            Verdict::Better { winner, ratio, .. } => {
                assert_eq!((winner.as_str(), ratio), ("b", 2.0))
            }
            v => panic!("{v:?}"),
        }
        // One repeat: no noise estimate.
        let one = |mean| Spread {
            mean,
            sd: f64::NAN,
            n: 1,
        };
        assert!(matches!(
            judge("a", one(2.0), "b", one(1.0), false).unwrap(),
            Verdict::Unknown { .. }
        ));
        assert!(judge("a", one(f64::NAN), "b", one(1.0), false).is_none());
    }
}
