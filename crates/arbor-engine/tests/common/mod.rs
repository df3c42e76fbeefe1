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
