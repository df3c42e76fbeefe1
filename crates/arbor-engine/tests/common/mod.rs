//! What the engine's model tests share: where the repository, the default model and the
//! llama.cpp fixture are.
#![allow(dead_code)]

use std::path::PathBuf;

use arbor_engine::{Request, SamplingParams, StopConditions};
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default model (SmolLM2-135M-Instruct Q4_1); the README's test command fetches it.
pub fn default_model_path() -> PathBuf {
    let dir = std::env::var_os("ARBOR_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} missing: the README's test command fetches it",
        path.display()
    );
    path
}

/// A fixture's JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// llama.cpp's greedy continuations of the default model (scripts/make_fixtures_llamacpp.py).
pub fn llama_cpp_fixture() -> Value {
    let p = repo_root().join("fixtures/llamacpp_smollm2.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A greedy request for `max_tokens` tokens.
pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        logprobs: None,
        namespace: 0,
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens,
            ..Default::default()
        },
        constraint: None,
    }
}

/// A request's tokens and how it ended.
pub type Outcome = (Vec<u32>, arbor_engine::FinishReason);

/// Random traffic around an engine's steps, as a server sees it: requests arriving, history
/// warm-ups (part of some prompt with a rewritten tail, as a chat template renders the next
/// turn: they must never change an output) and cancellations, with every event gathered.
#[derive(Default)]
pub struct Traffic {
    /// Requests added so far (the next to add is `reqs[next]`).
    pub next: usize,
    /// Engine id -> index into the requests.
    pub ids: std::collections::HashMap<arbor_engine::RequestId, usize>,
    pub cancelled: Vec<arbor_engine::RequestId>,
    tokens: std::collections::HashMap<arbor_engine::RequestId, Vec<u32>>,
    pub done: std::collections::HashMap<arbor_engine::RequestId, Outcome>,
}

impl Traffic {
    /// Before a step: maybe the next of `reqs` arrives, maybe a warm-up of up to `warm_tail`
    /// rewritten tokens after a prefix of one of `prompts`, maybe a live request is cancelled.
    pub fn before_step(
        &mut self,
        rng: &mut rand::rngs::StdRng,
        e: &mut arbor_engine::Engine,
        reqs: &[Request],
        prompts: &[Vec<u32>],
        warm_tail: usize,
    ) {
        use rand::Rng;
        if self.next < reqs.len() && rng.random_bool(0.4) {
            let id = e.add_request(reqs[self.next].clone()).unwrap();
            self.ids.insert(id, self.next);
            self.next += 1;
        }
        if rng.random_bool(0.1) {
            let base = &prompts[rng.random_range(0..prompts.len())];
            let mut warm = base[..rng.random_range(1..=base.len())].to_vec();
            warm.extend((0..rng.random_range(0..warm_tail)).map(|_| rng.random_range(10..128)));
            e.warm_prefix(0, warm).unwrap();
        }
        if rng.random_bool(0.05) {
            let live: Vec<arbor_engine::RequestId> = self
                .ids
                .keys()
                .copied()
                .filter(|id| !self.done.contains_key(id))
                .collect();
            if let Some(&id) = live.get(rng.random_range(0..live.len().max(1))) {
                if let Some(ev) = e.cancel(id) {
                    self.cancelled.push(id);
                    self.take(vec![ev]);
                }
            }
        }
    }

    /// Gathers a step's events.
    pub fn take(&mut self, events: Vec<arbor_engine::Event>) {
        use arbor_engine::Event;
        for ev in events {
            match ev {
                Event::Token { id, token, .. } => self.tokens.entry(id).or_default().push(token),
                Event::Finished { id, reason, .. } => {
                    let tokens = self.tokens.remove(&id).unwrap_or_default();
                    self.done.insert(id, (tokens, reason));
                }
            }
        }
    }

    /// Every request ended; each gave `want[i]`, or a prefix of it where it was cancelled.
    pub fn check(&self, want: &[Outcome], what: &str) {
        assert_eq!(self.done.len(), want.len(), "{what}: requests that ended");
        for (id, &i) in &self.ids {
            if self.cancelled.contains(id) {
                assert!(
                    want[i].0.starts_with(&self.done[id].0),
                    "{what}, request {i}"
                );
            } else {
                assert_eq!(self.done[id], want[i], "{what}, request {i}");
            }
        }
    }
}
