//! Tool calling through the HTTP API: tools and earlier calls rendered through the template,
//! calls parsed from replies into OpenAI's shape (whole and streamed), and the errors.
//!
//! The default model does not call tools, so a scripted runner makes it: the real model runs
//! every step (prefill, KV, decode), and its sampled tokens are replaced by a script's, so the
//! reply is exactly the script's text, detokenized and parsed as any reply is.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use arbor_engine::{Engine, EngineConfig};
use arbor_model::runner::{ModelRunner, StepOutput, StepRow};
use arbor_model::{ChatTemplate, DeviceSpec, RunnerOptions};
use arbor_server::tools::ToolCallParser;
use arbor_server::{router, AppState, ServerConfig};
use axum::Router;
use serde_json::{json, Value};

/// The real model, its sampled tokens replaced by `script` (then its last token forever).
struct ScriptedRunner {
    inner: Box<dyn ModelRunner>,
    script: Vec<u32>,
    emitted: HashMap<u64, usize>,
}

impl ModelRunner for ScriptedRunner {
    fn config(&self) -> &arbor_model::ModelConfig {
        self.inner.config()
    }
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn kv_slots(&self) -> usize {
        self.inner.kv_slots()
    }
    fn add_sequence(&mut self, seq: u64, sampling: arbor_model::SequenceSampling) {
        self.inner.add_sequence(seq, sampling)
    }
    fn remove_sequence(&mut self, seq: u64) {
        self.emitted.remove(&seq);
        self.inner.remove_sequence(seq)
    }
    fn step(&mut self, rows: &[StepRow]) -> arbor_model::Result<StepOutput> {
        let mut out = self.inner.step(rows)?;
        for (row, outcome) in rows.iter().filter(|r| r.sample).zip(&mut out.sampled) {
            if let Ok(s) = outcome {
                let k = self.emitted.entry(row.seq).or_default();
                s.token = self.script[(*k).min(self.script.len() - 1)];
                *k += 1;
            }
        }
        Ok(out)
    }
    fn logits_from_scratch(
        &self,
        tokens: &[u32],
        which: arbor_model::LogitsWanted,
    ) -> arbor_model::Result<Vec<Vec<f32>>> {
        self.inner.logits_from_scratch(tokens, which)
    }
}

/// A ChatML template with Hermes-style tools, written for these tests.
const HERMES_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{% for t in tools %}{{ t.function | tojson }}
{% endfor %}</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{{ m.content }}{% for c in m.tool_calls %}<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

/// A server whose replies are `reply` then end-of-sequence; `hermes` picks the template above
/// (else the model's own, which has no tool format).
fn server(reply: &str, hermes: bool, parser: ToolCallParser) -> (Router, Arc<AppState>) {
    let options = RunnerOptions {
        kv_slots: Some(8192),
        ..Default::default()
    };
    let opened = arbor_model::open(&common::model_path(), DeviceSpec::Cpu, &options).unwrap();
    let mut script = opened.tokenizer.encode(reply, false).unwrap();
    let eos = (0..opened.tokenizer.vocab_size() as u32)
        .find(|&t| opened.tokenizer.is_stop(t))
        .unwrap();
    script.push(eos);
    let runner = ScriptedRunner {
        inner: opened.runner,
        script,
        emitted: HashMap::new(),
    };
    let engine = Engine::new(Box::new(runner), opened.tokenizer, EngineConfig::default()).unwrap();
    let template = if hermes {
        ChatTemplate::new(HERMES_TEMPLATE, "", "<|im_end|>").unwrap()
    } else {
        opened.chat_template
    };
    let mut config = ServerConfig::new("m");
    config.tool_call_parser = parser;
    let state = AppState::new(engine, template, &config);
    (router(state.clone()), state)
}

use common::{post_chat as post, post_chat_json as post_json};

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    ])
}

fn ask(extra: Value) -> Value {
    let mut body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": weather_tools(),
        "max_tokens": 100,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

const REPLY: &str = "Let me look.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";

#[tokio::test(flavor = "multi_thread")]
async fn calls_come_back_in_openai_shape_whole_and_streamed() {
    let (app, _) = server(REPLY, true, ToolCallParser::Auto);
    let (status, v) = post_json(&app, ask(json!({}))).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let msg = &choice["message"];
    assert_eq!(msg["content"], "Let me look.");
    let calls = msg["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    assert!(calls[0].get("index").is_none());

    // Streamed: the same content and calls, each call in one delta with its index.
    let (status, text) = post(&app, ask(json!({"stream": true}))).await;
    assert_eq!(status, 200);
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut content = String::new();
    let mut streamed = Vec::new();
    let mut finish = None;
    for c in &chunks {
        let ch = &c["choices"][0];
        content.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        if let Some(calls) = ch["delta"]["tool_calls"].as_array() {
            streamed.extend(calls.iter().cloned());
        }
        if !ch["finish_reason"].is_null() {
            finish = Some(ch["finish_reason"].clone());
        }
    }
    assert_eq!(content, "Let me look.");
    assert_eq!(finish, Some(json!("tool_calls")));
    assert_eq!(streamed.len(), 2);
    for (i, call) in streamed.iter().enumerate() {
        assert_eq!(call["index"], i);
        assert_eq!(call["function"]["name"], calls[i]["function"]["name"]);
        assert_eq!(
            call["function"]["arguments"],
            calls[i]["function"]["arguments"]
        );
    }

    // One call only when parallel calls are off.
    let (_, v) = post_json(&app, ask(json!({"parallel_tool_calls": false}))).await;
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // tool_choice none: the reply is text, tags and all.
    let (_, v) = post_json(&app, ask(json!({"tool_choice": "none"}))).await;
    assert_eq!(v["choices"][0]["message"]["content"], REPLY);
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn tools_and_earlier_calls_reach_the_template() {
    let (app, _) = server("It is sunny.", true, ToolCallParser::Auto);
    let prompt_tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    let (_, with) = post_json(&app, ask(json!({}))).await;
    let mut body = ask(json!({}));
    body.as_object_mut().unwrap().remove("tools");
    let (_, without) = post_json(&app, body).await;
    // The tool list (names, descriptions, schemas) is in the prompt.
    assert!(prompt_tokens(&with) > prompt_tokens(&without) + 40);
    assert_eq!(with["choices"][0]["message"]["content"], "It is sunny.");
    assert_eq!(with["choices"][0]["finish_reason"], "stop");

    // A tool loop's second turn: the assistant's call and the tool's answer are rendered; the
    // arguments are what the template writes, so longer arguments mean a longer prompt.
    let turn = |city: &str| {
        ask(json!({"messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": format!("{{\"city\": \"{city}\"}}")}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        ]}))
    };
    let (status, short) = post_json(&app, turn("Paris")).await;
    assert_eq!(status, 200, "{short}");
    let (_, long) = post_json(&app, turn("Paris, Ile-de-France, France, Europe")).await;
    assert!(prompt_tokens(&long) > prompt_tokens(&short) + 5);
    assert!(prompt_tokens(&short) > prompt_tokens(&with));
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_requests_that_cannot_be_served_are_400s() {
    let (app, _) = server(REPLY, true, ToolCallParser::Auto);
    for (extra, param) in [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice.function.name",
        ),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (
            json!({"tools": [{"type": "retrieval", "function": {"name": "a"}}]}),
            "tools[0].type",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": [1]}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]}),
            "tools[1].function.name",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
            "messages[0].tool_calls",
        ),
    ] {
        let (status, v) = post_json(&app, ask(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    // `required` is enforced by a grammar; this runner overrides the sampler, so its script
    // breaks the grammar: that request fails alone, with a one-line reason, and the server
    // goes on.
    let (status, v) = post_json(&app, ask(json!({"tool_choice": "required"}))).await;
    assert_eq!(status, 500, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("output constraint refused token") && !msg.contains('\n'),
        "{msg}"
    );
    let (status, _) = post_json(&app, ask(json!({}))).await;
    assert_eq!(status, 200);
    // The model's own template writes no tool calls: auto cannot parse them, none can serve.
    let (plain, _) = server(REPLY, false, ToolCallParser::Auto);
    let (status, v) = post_json(&plain, ask(json!({}))).await;
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--tool-call-parser"),
        "{v}"
    );
    let (status, _) = post_json(&plain, ask(json!({"tool_choice": "none"}))).await;
    assert_eq!(status, 200);
    // Or name the format: the model's template with the Hermes parser.
    let (named, _) = server(REPLY, false, ToolCallParser::Hermes);
    let (_, v) = post_json(&named, ask(json!({}))).await;
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
}
