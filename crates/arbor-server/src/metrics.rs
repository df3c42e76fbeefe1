//! Prometheus metrics (`GET /metrics`, text exposition format), all prefixed `arbor_`.
//!
//! Counters and histograms are written by the engine thread (token and latency figures) and
//! by the handlers (requests refused before they reach the engine); gauges are a snapshot the
//! engine thread refreshes after every step. One mutex guards it all: updates are a few per
//! step, far below contention.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use arbor_engine::SlotUsage;

/// How a request ended, the `outcome` label of `arbor_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Finished at a stop token or stop string.
    Stop,
    /// Finished at max_tokens or the end of the context.
    Length,
    /// The client went away mid-request.
    Cancelled,
    /// Ended by the server: shutdown deadline or an engine failure.
    Aborted,
    /// Refused as invalid (4xx).
    Invalid,
    /// Refused because the queue was full or the server was shutting down (503).
    Rejected,
    /// Failed while running: its own processing, or the engine.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::Aborted => "aborted",
            Outcome::Invalid => "invalid",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }
}

/// Cumulative histogram with fixed bucket bounds (seconds).
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Latency buckets from 5 ms to 10 minutes: CPU prefill of a long context takes a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Inter-token latency buckets from 1 ms to 10 s.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 10.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<Outcome, u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    cache_queried_tokens: u64,
    cache_hit_tokens: u64,
    /// Tokens computed by history warm-ups.
    warm_tokens: u64,
    /// History warm-ups queued or running in the engine.
    warmups: usize,
    /// Replies whose warm-ups are being prepared (rendered, tokenized) on the way to it.
    warmups_preparing: usize,
    slots: SlotUsage,
    queue_length: usize,
    running: usize,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                prompt_tokens: 0,
                generation_tokens: 0,
                cache_queried_tokens: 0,
                cache_hit_tokens: 0,
                warm_tokens: 0,
                warmups: 0,
                warmups_preparing: 0,
                slots: SlotUsage::default(),
                queue_length: 0,
                running: 0,
                ttft: Histogram::new(LATENCY_BUCKETS),
                itl: Histogram::new(ITL_BUCKETS),
                e2e: Histogram::new(LATENCY_BUCKETS),
            }),
        }
    }
}

/// One finished request's figures.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    pub outcome: Outcome,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// `None` when no token was generated.
    pub time_to_first_token: Option<f64>,
    pub end_to_end: f64,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain numbers behind: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request refused before it reached the engine.
    pub fn refused(&self, outcome: Outcome) {
        *self.lock().requests.entry(outcome).or_default() += 1;
    }

    pub fn finished(&self, f: Finished) {
        let mut m = self.lock();
        *m.requests.entry(f.outcome).or_default() += 1;
        m.prompt_tokens += f.prompt_tokens as u64;
        m.generation_tokens += f.generated_tokens as u64;
        m.cache_queried_tokens += f.prompt_tokens as u64;
        m.cache_hit_tokens += f.cached_tokens as u64;
        if let Some(t) = f.time_to_first_token {
            m.ttft.observe(t);
        }
        m.e2e.observe(f.end_to_end);
    }

    /// The engine's last published state: where the KV slots are, requests waiting and
    /// running (for load reports to a router).
    pub fn engine_state(&self) -> (SlotUsage, usize, usize) {
        let m = self.lock();
        (m.slots, m.queue_length, m.running)
    }

    /// A reply's warm-up is being prepared (`true`), or has reached the engine (`false`).
    pub fn warmup_preparing(&self, started: bool) {
        let mut m = self.lock();
        if started {
            m.warmups_preparing += 1;
        } else {
            m.warmups_preparing = m.warmups_preparing.saturating_sub(1);
        }
    }

    /// Tokens a step computed for history warm-ups.
    pub fn warmed(&self, tokens: usize) {
        self.lock().warm_tokens += tokens as u64;
    }

    pub fn inter_token_latency(&self, seconds: f64) {
        self.lock().itl.observe(seconds);
    }

    pub fn set_engine_state(
        &self,
        slots: SlotUsage,
        queue_length: usize,
        running: usize,
        warmups: usize,
    ) {
        let mut m = self.lock();
        m.slots = slots;
        m.queue_length = queue_length;
        m.running = running;
        m.warmups = warmups;
    }

    /// The Prometheus text, with vLLM's names for the gauges routers read (`model_name` labels
    /// them as vLLM does).
    pub fn render(&self, model_name: &str) -> String {
        let m = self.lock();
        let mut out = String::new();
        // (name, type, help, value) of every plain counter and gauge.
        let samples: [(&str, &str, &str, u64); 12] = [
            (
                "arbor_prompt_tokens_total",
                "counter",
                "Prompt tokens of finished requests.",
                m.prompt_tokens,
            ),
            (
                "arbor_generation_tokens_total",
                "counter",
                "Tokens generated by finished requests.",
                m.generation_tokens,
            ),
            (
                "arbor_prefix_cache_queried_tokens_total",
                "counter",
                "Prompt tokens looked up in the prefix cache.",
                m.cache_queried_tokens,
            ),
            (
                "arbor_prefix_cache_hit_tokens_total",
                "counter",
                "Prompt tokens whose KV came from the prefix cache.",
                m.cache_hit_tokens,
            ),
            (
                "arbor_history_warmup_tokens_total",
                "counter",
                "Tokens computed ahead for conversations' next turns (history warm-ups).",
                m.warm_tokens,
            ),
            (
                "arbor_history_warmups",
                "gauge",
                "History warm-ups being prepared, queued or running (they hold KV slots while they run).",
                (m.warmups + m.warmups_preparing) as u64,
            ),
            (
                "arbor_kv_slots_total",
                "gauge",
                "Token slots in the KV pool.",
                m.slots.total as u64,
            ),
            (
                "arbor_kv_slots_used",
                "gauge",
                "KV slots held by requests in flight (their own and the cached prefixes they use).",
                m.slots.held_by_requests as u64,
            ),
            (
                "arbor_kv_slots_cached",
                "gauge",
                "KV slots held only by the prefix cache (evictable).",
                m.slots.cached as u64,
            ),
            (
                "arbor_kv_slots_free",
                "gauge",
                "KV slots owned by no one.",
                m.slots.free as u64,
            ),
            (
                "arbor_queue_length",
                "gauge",
                "Requests waiting for admission.",
                m.queue_length as u64,
            ),
            (
                "arbor_requests_running",
                "gauge",
                "Requests admitted and holding KV.",
                m.running as u64,
            ),
        ];
        for (name, kind, help, value) in samples {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP arbor_requests_total Requests by outcome.\n# TYPE arbor_requests_total counter"
        );
        for o in [
            Outcome::Stop,
            Outcome::Length,
            Outcome::Cancelled,
            Outcome::Aborted,
            Outcome::Invalid,
            Outcome::Rejected,
            Outcome::Error,
        ] {
            let n = m.requests.get(&o).copied().unwrap_or(0);
            let _ = writeln!(out, "arbor_requests_total{{outcome=\"{}\"}} {n}", o.label());
        }
        m.ttft.render(
            &mut out,
            "arbor_time_to_first_token_seconds",
            "From arrival to the first generated token.",
        );
        m.itl.render(
            &mut out,
            "arbor_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request.",
        );
        m.e2e.render(
            &mut out,
            "arbor_e2e_request_latency_seconds",
            "From arrival to the end of a request.",
        );
        // The same figures under vLLM's names, for routers and autoscalers that read them
        // (llm-d's scheduler, KServe, Dynamo's planner): queue, running requests, and KV usage
        // as vLLM counts it (slots held by requests; cached-only slots are evictable, free).
        let usage = if m.slots.total == 0 {
            0.0
        } else {
            m.slots.held_by_requests as f64 / m.slots.total as f64
        };
        let label = model_name.replace('\\', "\\\\").replace('"', "\\\"");
        for (name, help, value) in [
            (
                "vllm:num_requests_waiting",
                "Requests waiting to be processed (alias of arbor_queue_length).",
                m.queue_length as f64,
            ),
            (
                "vllm:num_requests_running",
                "Requests running (alias of arbor_requests_running).",
                m.running as f64,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage, 1 = full (KV slots held by requests over the pool).",
                usage,
            ),
            (
                "vllm:gpu_cache_usage_perc",
                "KV-cache usage, 1 = full (vLLM's older name).",
                usage,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{label}\"}} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 5.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    #[test]
    fn finished_requests_feed_counters_by_outcome() {
        let m = Metrics::default();
        m.finished(Finished {
            outcome: Outcome::Stop,
            prompt_tokens: 10,
            cached_tokens: 4,
            generated_tokens: 3,
            time_to_first_token: Some(0.2),
            end_to_end: 0.5,
        });
        m.refused(Outcome::Invalid);
        let slots = SlotUsage {
            total: 1000,
            free: 500,
            cached: 250,
            held_by_requests: 250,
        };
        m.set_engine_state(slots, 3, 2, 1);
        let text = m.render("my \"model\"");
        for line in [
            "arbor_requests_total{outcome=\"stop\"} 1",
            "arbor_requests_total{outcome=\"invalid\"} 1",
            "arbor_requests_total{outcome=\"length\"} 0",
            "arbor_prefix_cache_queried_tokens_total 10",
            "arbor_prefix_cache_hit_tokens_total 4",
            "arbor_generation_tokens_total 3",
            "arbor_time_to_first_token_seconds_count 1",
            "arbor_queue_length 3",
            "arbor_history_warmups 1",
            "vllm:num_requests_waiting{model_name=\"my \\\"model\\\"\"} 3",
            "vllm:num_requests_running{model_name=\"my \\\"model\\\"\"} 2",
            "vllm:kv_cache_usage_perc{model_name=\"my \\\"model\\\"\"} 0.25",
            "vllm:gpu_cache_usage_perc{model_name=\"my \\\"model\\\"\"} 0.25",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }
}
