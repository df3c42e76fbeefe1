//! Prefix-cache workloads run in-process on one engine, one JSON line of results each.
//!
//!     cargo run --release -p arbor-engine --example cache_workloads -- MODEL multi-turn [radix|blocks|off]
//!     cargo run --release -p arbor-engine --example cache_workloads -- MODEL shared-prefix [radix|blocks|off] G P S Q O C
//!
//! multi-turn: a 5-turn conversation on the reference workload's ~6,800-token context; each
//! turn re-renders the whole conversation with the chat template (the reply as text, the way a
//! client resends it) and reports how much of the previous turn's tokens the cache reused.
//!
//! shared-prefix: G groups x P prompts, each group sharing a system prompt of ~S tokens, with
//! ~Q-token questions and O-token answers, C requests in flight at a time, groups interleaved;
//! reports throughput and time to first token (p50/p90).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arbor_engine::{
    Engine, EngineConfig, Event, PrefixCacheMode, Request, SamplingParams, StopConditions,
};
use arbor_model::{ChatMessage, ChatTemplate, Device, Tokenizer};
use serde_json::{json, Value};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: cache_workloads MODEL multi-turn|shared-prefix [radix|blocks|off] [G P S Q O C]";
    let model_path = PathBuf::from(args.first().ok_or(usage)?);
    let workload = args.get(1).ok_or(usage)?.clone();
    let mode = match args.get(2).map(String::as_str) {
        None | Some("radix") => PrefixCacheMode::Radix,
        Some("blocks") => PrefixCacheMode::Blocks,
        Some("off") => PrefixCacheMode::Off,
        Some(other) => return Err(format!("unknown cache mode {other}").into()),
    };
    let loaded = arbor_model::load_model(&model_path, &Device::Cpu)?;
    let template = loaded.chat_template;
    let tokenizer = loaded.tokenizer.clone();
    let mut cfg = EngineConfig {
        prefix_cache: mode,
        ..Default::default()
    };
    let num: Vec<usize> = args[3..]
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    if workload == "shared-prefix" {
        cfg.max_running = num.get(5).copied().unwrap_or(4);
    }
    let engine = Engine::new(
        arbor_model::runner::cpu_runner(Arc::new(loaded.model), Some(65_536)),
        loaded.tokenizer,
        cfg,
    )?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let w: Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("workloads/reference-multiturn.json"),
    )?)?;
    let out = match workload.as_str() {
        "multi-turn" => multi_turn(engine, &template, &tokenizer, &w)?,
        "shared-prefix" => {
            let p = |i: usize, d: usize| num.get(i).copied().unwrap_or(d);
            shared_prefix(
                engine,
                &template,
                &tokenizer,
                &w,
                [p(0, 4), p(1, 4), p(2, 1000), p(3, 64), p(4, 32)],
            )?
        }
        _ => return Err(usage.into()),
    };
    println!(
        "{}",
        json!({"workload": workload, "cache": format!("{mode:?}"), "result": out})
    );
    Ok(())
}

fn context_block(w: &Value) -> String {
    let details: Vec<String> = w["technical_details"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| format!("- {}", d.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{}\n\nTechnical details:\n{}",
        w["base_content"].as_str().unwrap_or_default(),
        details.join("\n")
    )
}

/// `text` repeated until it is at least `tokens` long on this tokenizer.
fn grow(text: &str, tokens: usize, tok: &Tokenizer) -> Res<String> {
    let mut out = text.to_string();
    while tok.encode(&out, false)?.len() < tokens {
        out = format!("{out}\n\n{text}");
    }
    Ok(out)
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
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
    }
}

fn multi_turn(
    mut engine: Engine,
    template: &ChatTemplate,
    tok: &Tokenizer,
    w: &Value,
) -> Res<Value> {
    let context = grow(
        &context_block(w),
        w["target_prompt_tokens"].as_u64().unwrap_or(6800) as usize,
        tok,
    )?;
    let questions = [
        "What would you recommend for training a large language model on a budget?",
        "How would you optimize inference costs for a production deployment?",
        "What are the key considerations for distributed training?",
        "Which of these matter most for a small team?",
        "Summarize your advice in three bullet points.",
    ];
    let mut messages = vec![ChatMessage::new("system", context)];
    let mut previous_total = 0;
    let mut turns = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        messages.push(ChatMessage::new("user", *q));
        let prompt = tok.encode(&template.render(&messages, true)?, true)?;
        let n = prompt.len();
        let done = engine.generate(request(prompt, 150), |_| {})?;
        let ttft = done.timing.time_to_first_token();
        turns.push(json!({
            "turn": i + 1, "prompt_tokens": n, "cached_tokens": done.usage.cached_tokens,
            "previous_turn_tokens": previous_total,
            "reused_of_previous": if previous_total > 0 { done.usage.cached_tokens as f64 / previous_total as f64 } else { 0.0 },
            "ttft_s": ttft,
        }));
        eprintln!("{}", turns.last().unwrap_or(&Value::Null));
        previous_total = n + done.usage.completion_tokens;
        messages.push(ChatMessage::new("assistant", done.text));
    }
    Ok(json!(turns))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn shared_prefix(
    mut engine: Engine,
    template: &ChatTemplate,
    tok: &Tokenizer,
    w: &Value,
    [groups, per_group, sys_tokens, q_tokens, out_tokens]: [usize; 5],
) -> Res<Value> {
    let block = context_block(w);
    let details: Vec<&str> = w["technical_details"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // Requests in interleaved group order: g0p0, g1p0, ..., g0p1, ...
    let mut prompts = Vec::new();
    for p in 0..per_group {
        for g in 0..groups {
            let system = grow(&format!("Deployment {g}. {block}"), sys_tokens, tok)?;
            let question = grow(
                &format!(
                    "Question {p}: {}",
                    details[(g * per_group + p) % details.len().max(1)]
                ),
                q_tokens,
                tok,
            )?;
            let msgs = [
                ChatMessage::new("system", system),
                ChatMessage::new("user", question),
            ];
            prompts.push(tok.encode(&template.render(&msgs, true)?, true)?);
        }
    }
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let started = Instant::now();
    let mut ttfts = Vec::new();
    let (mut cached, mut generated) = (0, 0);
    // The engine admits up to max_running at a time; the rest wait in its queue.
    for p in prompts {
        engine.add_request(request(p, out_tokens))?;
    }
    while engine.has_work() {
        for ev in engine.step()?.0 {
            if let Event::Finished { usage, timing, .. } = ev {
                cached += usage.cached_tokens;
                generated += usage.completion_tokens;
                ttfts.push(timing.time_to_first_token());
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    ttfts.sort_by(f64::total_cmp);
    Ok(json!({
        "groups": groups, "per_group": per_group, "requests": ttfts.len(),
        "prompt_tokens": prompt_tokens, "cached_tokens": cached, "generated_tokens": generated,
        "elapsed_s": elapsed, "requests_per_s": ttfts.len() as f64 / elapsed,
        "output_tok_per_s": generated as f64 / elapsed,
        "total_tok_per_s": (prompt_tokens + generated) as f64 / elapsed,
        "ttft_p50_s": percentile(&ttfts, 0.5), "ttft_p90_s": percentile(&ttfts, 0.9),
    }))
}
