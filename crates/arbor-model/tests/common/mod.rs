//! Shared helpers of the integration tests: where the default model and fixtures live.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use arbor_model::{Device, KvPool, LoadedModel, LogitsWanted, SeqStep};

/// A fixture's JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    repo_root().join("fixtures")
}

pub fn read_fixture(name: &str) -> serde_json::Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixtures are valid JSON")
}

/// The default model (SmolLM2-135M-Instruct Q4_1). The README's test command fetches it.
pub fn default_model_path() -> PathBuf {
    let dir = std::env::var_os("ARBOR_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `cargo run --release -- fetch-model` (the README's test command does)",
        p.display()
    );
    p
}

/// Loaded once per test binary; the forward pass takes `&self`, so tests share it.
pub fn default_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        arbor_model::load_model(&default_model_path(), &Device::Cpu).expect("default model loads")
    })
}

/// Logits at every position of one prefill of `tokens`.
pub fn logits_all(m: &LoadedModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut pool = KvPool::new(&m.model.config, tokens.len());
    let slots: Vec<u32> = (0..tokens.len() as u32).collect();
    m.model
        .forward(
            &[SeqStep {
                tokens,
                slots: &slots,
                logits: LogitsWanted::All,
            }],
            &mut pool,
        )
        .unwrap()
}

/// A fixture's list, checked to hold exactly the cases its generator wrote: a loop over it
/// cannot pass by running zero times, or quietly over a truncated fixture.
#[allow(dead_code)]
pub fn cases<'a>(fx: &'a serde_json::Value, key: &str, expected: usize) -> &'a [serde_json::Value] {
    let list = fx[key]
        .as_array()
        .unwrap_or_else(|| panic!("fixture has no list `{key}`"));
    assert_eq!(
        list.len(),
        expected,
        "fixture list `{key}` has {} cases",
        list.len()
    );
    list
}
