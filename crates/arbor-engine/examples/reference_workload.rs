//! The reference multi-turn workload (workloads/reference-multiturn.json) run in-process on one
//! engine, printing one JSON line per case: time to first token, decode speed, cached tokens.
//!
//!     cargo run --release -p arbor-engine --example reference_workload -- MODEL.gguf [radix|off]
//!
//! Three requests share a ~6,800-token system context and differ in the question; a fourth has
//! a small context; 150-token greedy answers. scripts/bench_reference.py runs the same cases
//! against llama.cpp's server and prints both side by side.

use std::path::PathBuf;
use std::sync::Arc;

use arbor_engine::{
    Engine, EngineConfig, PrefixCacheMode, Request, SamplingParams, StopConditions,
};
use arbor_model::{ChatMessage, Device};
use serde_json::Value;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model_path = PathBuf::from(
        args.next()
            .ok_or("usage: reference_workload MODEL [radix|off]")?,
    );
    let mode = match args.next().as_deref() {
        None | Some("radix") => PrefixCacheMode::Radix,
        Some("off") => PrefixCacheMode::Off,
        Some(other) => return Err(format!("unknown cache mode {other}").into()),
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let w: Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("workloads/reference-multiturn.json"),
    )?)?;
    let loaded = arbor_model::load_model(&model_path, &Device::Cpu)?;
    let template = loaded.chat_template;
    let tokenizer = loaded.tokenizer.clone();
    let cfg = EngineConfig {
        prefix_cache: mode,
        ..Default::default()
    };
    let mut engine = Engine::new(
        arbor_model::runner::cpu_runner(Arc::new(loaded.model), Some(65_536)),
        loaded.tokenizer,
        cfg,
    )?;

    // The recipe: the block repeated until the system message reaches the target size.
    let details: Vec<String> = w["technical_details"]
        .as_array()
        .ok_or("technical_details")?
        .iter()
        .map(|d| format!("- {}", d.as_str().unwrap_or_default()))
        .collect();
    let block = format!(
        "{}\n\nTechnical details:\n{}",
        w["base_content"].as_str().ok_or("base_content")?,
        details.join("\n")
    );
    let target = w["target_prompt_tokens"]
        .as_u64()
        .ok_or("target_prompt_tokens")? as usize;
    let mut large = block.clone();
    while tokenizer.encode(&large, false)?.len() < target {
        large = format!("{large}\n\n{block}");
    }
    let max_tokens = w["max_tokens"].as_u64().unwrap_or(150) as usize;

    for case in w["test_cases"].as_array().ok_or("test_cases")? {
        let mut messages = Vec::new();
        if case["system"].as_str() == Some("large_context") {
            messages.push(ChatMessage::new("system", large.clone()));
        }
        messages.push(ChatMessage::new(
            "user",
            case["user"].as_str().unwrap_or_default(),
        ));
        let prompt = tokenizer.encode(&template.render(&messages, true)?, true)?;
        let req = Request {
            logprobs: None,
            namespace: 0,
            prompt,
            sampling: SamplingParams::greedy(),
            stop: StopConditions {
                max_tokens,
                ignore_eos: true,
                ..Default::default()
            },
            constraint: None,
        };
        let done = engine.generate(req, |_| {})?;
        let line = serde_json::json!({
            "test": case["name"],
            "cache": format!("{mode:?}"),
            "prompt_tokens": done.usage.prompt_tokens,
            "cached_tokens": done.usage.cached_tokens,
            "response_tokens": done.usage.completion_tokens,
            "ttft_s": done.timing.time_to_first_token(),
            "duration_s": done.timing.total_time(),
            "decode_tok_s": done.decode_tokens_per_s(),
        });
        println!("{line}");
    }
    Ok(())
}
