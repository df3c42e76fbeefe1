//! A conversation's next turn through the HTTP API on the default model: a reasoning reply's
//! think block is cached but not sent back, so the next prompt leaves the cache where the
//! reply began; the history warm-up computes the history as the next request renders it, and
//! `usage.prompt_cache_miss` says where each prompt left the cache. Also vLLM's
//! `structured_outputs` (regex, choice, grammar), which shapes the replies here.

mod common;

use std::time::Duration;

use arbor_server::reasoning::ReasoningParser;
use axum::http::StatusCode;
use serde_json::{json, Value};

use common::{metric, post_chat_json as post_json};

/// A think block then an answer, as a reasoning model replies (the default model does not
/// reason by itself).
const REASONING_REPLY: &str =
    "<think>\n[a-z]{1,8}( [a-z]{1,8}){20,30}\\.\n</think>\n\n[A-Z][a-z]{1,8}( [a-z]{1,8}){5,10}\\.";

fn chat(messages: &Value, extra: Value) -> Value {
    let mut body = json!({"model": "m", "messages": messages, "max_tokens": 400, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn tokens(app: &axum::Router, text: &str) -> usize {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = axum::http::Request::post("/tokenize")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            json!({"prompt": text, "add_special_tokens": false}).to_string(),
        ))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    v["count"].as_u64().unwrap() as usize
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_turn_computes_only_its_new_message_after_a_warm_up() {
    for warm in [true, false] {
        let (app, _) = common::server_with("m", 8192, |c, _| {
            c.reasoning_parser = ReasoningParser::Qwen3;
            c.history_warmup = warm;
        });
        let mut messages = json!([
            {"role": "system", "content": "You are a helpful assistant. Think before you answer."},
            {"role": "user", "content": "What is a prefix cache?"},
        ]);
        let shape = json!({"structured_outputs": {"regex": REASONING_REPLY}});
        let (status, v) = post_json(&app, chat(&messages, shape.clone())).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let reply = &v["choices"][0]["message"];
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        assert!(
            !reply["reasoning_content"].as_str().unwrap().is_empty(),
            "{v}"
        );
        let answer = reply["content"].as_str().unwrap().to_string();
        // The first prompt was not cached at all: the miss is at its start.
        assert_eq!(v["usage"]["prompt_cache_miss"]["at_token"], 0, "{v}");
        assert_eq!(v["usage"]["prompt_cache_miss"]["at_message"], 0, "{v}");

        // The client sends the answer back without its reasoning, and asks on.
        let question = "Why does it matter for agents?";
        let list = messages.as_array_mut().unwrap();
        list.push(json!({"role": "assistant", "content": answer}));
        list.push(json!({"role": "user", "content": question}));
        if warm {
            // The warm-up runs once the engine is idle; wait for it to finish.
            let mut done = false;
            for _ in 0..500 {
                if metric(&app, "arbor_history_warmup_tokens_total").await > 0.0
                    && metric(&app, "arbor_history_warmups").await == 0.0
                {
                    done = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(done, "the warm-up never ran");
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(metric(&app, "arbor_history_warmup_tokens_total").await, 0.0);
        }
        let (status, v) = post_json(&app, chat(&messages, json!({"max_tokens": 4}))).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let usage = &v["usage"];
        let prompt = usage["prompt_tokens"].as_u64().unwrap() as usize;
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap() as usize;
        let miss = &usage["prompt_cache_miss"];
        let new_message = tokens(&app, question).await;
        let answer_tokens = tokens(&app, &answer).await;
        if warm {
            // The question, the template's text around it (`<|im_start|>user\n` ...
            // `<|im_end|>\n<|im_start|>assistant\n`: under 12 tokens), nothing of the answer.
            assert!(
                prompt - cached <= new_message + 12,
                "recomputed {} for a {new_message}-token question: {usage}",
                prompt - cached
            );
            assert_eq!(miss["at_message"], 3, "{usage}");
        } else {
            // The answer as rendered is recomputed too: the cache held the think block there.
            assert!(
                prompt - cached >= new_message + answer_tokens,
                "recomputed {}: {usage}",
                prompt - cached
            );
            assert_eq!(miss["at_message"], 2, "{usage}");
            // Right where the answer starts (after the newlines that followed `</think>`).
            let after = miss["text_after"].as_str().unwrap().trim_start();
            assert!(after.starts_with(&answer.trim_start()[..4]), "{usage}");
        }
        common::assert_slots_settled(&app).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn structured_outputs_regex_choice_and_grammar_shape_replies() {
    let (app, _) = common::server_with("m", 8192, |_, _| {});
    let messages = json!([{"role": "user", "content": "Pick a colour and a number."}]);
    let ask = |extra: Value| {
        let mut body = chat(&messages, extra);
        body["temperature"] = json!(1.0);
        body["seed"] = json!(3);
        body
    };
    let content = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };

    let (status, v) = post_json(
        &app,
        ask(json!({"structured_outputs": {"regex": "(red|green|blue) [1-9][0-9]?"}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let text = content(&v);
    let (colour, number) = text.split_once(' ').unwrap();
    assert!(["red", "green", "blue"].contains(&colour), "{text}");
    assert!((1..100).contains(&number.parse::<u32>().unwrap()), "{text}");

    // vLLM's older flat names too.
    let choices = ["alpha", "beta gamma", "\"quoted\""];
    for body in [
        json!({"structured_outputs": {"choice": choices}}),
        json!({"guided_choice": choices}),
    ] {
        let (status, v) = post_json(&app, ask(body)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(choices.contains(&content(&v).as_str()), "{v}");
    }
    let grammar = "start: \"Answer: \" WORD (\", \" WORD)*\nWORD: /[a-z]{2,8}/";
    let (status, v) = post_json(&app, ask(json!({"guided_grammar": grammar}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let text = content(&v);
    let words = text
        .strip_prefix("Answer: ")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        words
            .split(", ")
            .all(|w| (2..=8).contains(&w.len()) && w.chars().all(|c| c.is_ascii_lowercase())),
        "{text}"
    );

    // Two constraints, an empty choice list, a regex that does not compile: 400s naming them.
    for (body, param) in [
        (
            json!({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"guided_regex": "a", "structured_outputs": {"choice": ["b"]}}),
            "structured_outputs.choice",
        ),
        (json!({"guided_choice": []}), "guided_choice"),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs.regex",
        ),
        (
            json!({"structured_outputs": {"grammar": "start: undefined_rule"}}),
            "structured_outputs.grammar",
        ),
    ] {
        let (status, v) = post_json(&app, ask(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    common::assert_slots_settled(&app).await;
}
