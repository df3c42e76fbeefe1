//! The HTTP layer against the default model, without a socket (the router is called as a tower
//! service), plus one test of the real listener's graceful shutdown.
//!
//! Each test starts its own engine thread; responses are checked against the engine run
//! directly, so the server is shown to add nothing and lose nothing.

use std::sync::Arc;
use std::time::Duration;

use arbor_engine::{Engine, EngineConfig, Request as EngineRequest};
use arbor_model::ChatMessage;
use arbor_server::{AppState, ServerConfig};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const MODEL_NAME: &str = "smollm2";

mod common;
use common::model_path;

fn engine() -> (Engine, arbor_model::ChatTemplate) {
    let options = arbor_model::RunnerOptions {
        kv_slots: Some(16_384),
        ..Default::default()
    };
    let opened = arbor_model::open(&model_path(), arbor_model::DeviceSpec::Cpu, &options).unwrap();
    (
        Engine::new(opened.runner, opened.tokenizer, EngineConfig::default()).unwrap(),
        opened.chat_template,
    )
}

fn server_with(f: impl FnOnce(&mut ServerConfig, &mut EngineConfig)) -> (Router, Arc<AppState>) {
    common::server_with(MODEL_NAME, 16_384, f)
}

fn server() -> (Router, Arc<AppState>) {
    server_with(|_, _| {})
}

fn request(method: &str, path: &str, body: Option<&Value>, key: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b = b.header("content-type", "application/json");
    b.body(body.map_or(Body::empty(), |v| Body::from(v.to_string())))
        .unwrap()
}

async fn call_raw(app: &Router, req: Request<Body>) -> (StatusCode, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    post_as(app, path, body, None).await
}

async fn post_as(app: &Router, path: &str, body: Value, key: Option<&str>) -> (StatusCode, Value) {
    let (status, text) = call_raw(app, request("POST", path, Some(&body), key)).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}

/// The `data:` payloads of an SSE body.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

async fn metric(app: &Router, name: &str) -> f64 {
    let (_, text) = call_raw(app, request("GET", "/metrics", None, None)).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 24,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_matches_the_engine_and_reports_cached_tokens() {
    let question = "Name three primary colors.";
    // The engine alone, on the same rendered prompt.
    let (mut direct, template) = engine();
    let text = template
        .render(&[ChatMessage::new("user", question)], true)
        .unwrap();
    let prompt = direct.tokenizer().encode(&text, true).unwrap();
    let expected = direct
        .generate(EngineRequest::new(prompt.clone(), 24), |_| {})
        .unwrap();

    let (app, _) = server();
    let (status, first) = post(&app, "/v1/chat/completions", chat(question, json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["model"], MODEL_NAME);
    assert_eq!(first["choices"][0]["message"]["role"], "assistant");
    assert_eq!(first["choices"][0]["message"]["content"], expected.text);
    assert_eq!(
        first["choices"][0]["finish_reason"],
        expected.reason.as_str()
    );
    let usage = &first["usage"];
    assert_eq!(usage["prompt_tokens"], prompt.len());
    assert_eq!(usage["completion_tokens"], expected.tokens.len());
    assert_eq!(usage["total_tokens"], prompt.len() + expected.tokens.len());
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);

    // The same conversation again: everything but the last prompt token comes from the cache,
    // and the answer does not change.
    let (_, again) = post(&app, "/v1/chat/completions", chat(question, json!({}))).await;
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt.len() - 1
    );
    assert_eq!(again["choices"][0]["message"]["content"], expected.text);
    assert_eq!(
        metric(&app, "arbor_prefix_cache_hit_tokens_total").await,
        (prompt.len() - 1) as f64
    );
    assert_eq!(
        metric(&app, "arbor_prefix_cache_queried_tokens_total").await,
        (2 * prompt.len()) as f64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_yields_the_same_text_then_usage_and_done() {
    let (app, _) = server();
    let question = "Write one sentence about the sea.";
    let (_, whole) = post(&app, "/v1/chat/completions", chat(question, json!({}))).await;
    let body = chat(
        question,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (status, text) = call_raw(
        &app,
        request("POST", "/v1/chat/completions", Some(&body), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, whole["choices"][0]["message"]["content"]);
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&whole["choices"][0]["finish_reason"]]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_stop_strings_logprobs_and_n() {
    let (app, _) = server();
    let prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox";
    let base = json!({"model": MODEL_NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0});
    let (status, full) = post(&app, "/v1/completions", base.clone()).await;
    assert_eq!(status, StatusCode::OK, "{full}");
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.len() > 6, "{text:?}");

    // A stop string from the middle of the greedy text cuts it there.
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(3).collect();
    let mut req = base.clone();
    req["stop"] = json!([stop]);
    let (_, stopped) = post(&app, "/v1/completions", req).await;
    let expected = &text[..text.find(&stop).unwrap()];
    assert_eq!(stopped["choices"][0]["text"], expected);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // Greedy logprobs: the chosen token is the most likely one, alternatives in order.
    let mut req = base.clone();
    req["logprobs"] = json!(3);
    let (_, lp) = post(&app, "/v1/completions", req).await;
    let l = &lp["choices"][0]["logprobs"];
    assert_eq!(lp["choices"][0]["text"], text);
    let tokens = l["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 16);
    assert_eq!(
        tokens
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        text
    );
    for i in 0..tokens.len() {
        let top = l["top_logprobs"][i].as_object().unwrap();
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = l["token_logprobs"][i].as_f64().unwrap();
        assert!(chosen <= 0.0);
        assert!((chosen - best).abs() < 1e-6, "greedy picks the top token");
    }
    assert_eq!(l["text_offset"][0], 0);

    // n = 3 sampled choices share the prompt: usage counts it once and the later choices
    // reuse its KV.
    let hits_before = metric(&app, "arbor_prefix_cache_hit_tokens_total").await;
    let mut req = base.clone();
    req["n"] = json!(3);
    req["temperature"] = json!(1.0);
    req["seed"] = json!(7);
    req["prompt"] = json!("A completely different prompt about mountains, rivers and the long winding roads between the old towns of the north, where");
    let (_, many) = post(&app, "/v1/completions", req.clone()).await;
    let choices = many["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let prompt_tokens = many["usage"]["prompt_tokens"].as_u64().unwrap();
    let completion: u64 = 3 * 16;
    assert_eq!(many["usage"]["completion_tokens"], completion);
    let hits = metric(&app, "arbor_prefix_cache_hit_tokens_total").await - hits_before;
    assert!(
        hits >= 2.0 * (prompt_tokens - 1) as f64,
        "choices 2 and 3 reuse the prompt: {hits} hit tokens for a {prompt_tokens}-token prompt"
    );
    // Seeded: the same request gives the same choices.
    let (_, again) = post(&app, "/v1/completions", req).await;
    assert_eq!(again["choices"], many["choices"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_has_openai_shape_and_status() {
    let (app, _) = server_with(|c, _| c.max_body_bytes = 4096);
    let long_prompt = "word ".repeat(9000);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, None),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"temperature": -1})).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"max_tokens": "ten"})).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"n": 1000})).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"top_logprobs": 50, "logprobs": true})).to_string(),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"max_tokens": 9000})).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            chat("hi", json!({"model": "gpt-4o"})).to_string(),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 99999999]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": ""}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": long_prompt}).to_string(),
            413,
            None,
        ),
        ("/v1/nothing", "{}".into(), 404, None),
        (
            "/detokenize",
            json!({"tokens": [4_000_000]}).to_string(),
            400,
            Some("tokens"),
        ),
    ];
    for (path, body, status, param) in cases {
        let req = Request::builder()
            .method("POST")
            .uri(path)
            .body(Body::from(body.clone()))
            .unwrap();
        let (got, text) = call_raw(&app, req).await;
        let short: String = body.chars().take(80).collect();
        assert_eq!(got.as_u16(), status, "{path} {short}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{text}"
        );
        assert!(err["type"].is_string(), "{text}");
        assert_eq!(err["param"].as_str(), param, "{path} {short}: {text}");
    }
    // The context error gives the numbers.
    let (_, v) = post(
        &app,
        "/v1/chat/completions",
        chat("hi", json!({"max_tokens": 9000})),
    )
    .await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("8192") && msg.contains("9000"), "{msg}");
    // Still serving, nothing held.
    let (status, _) = post(
        &app,
        "/v1/chat/completions",
        chat("hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(metric(&app, "arbor_kv_slots_used").await, 0.0);
    assert!(metric(&app, "arbor_requests_total{outcome=\"invalid\"}").await >= 14.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_isolate_the_prefix_cache() {
    let (app, _) = server_with(|c, _| c.api_keys = vec!["key-a".into(), "key-b".into()]);
    let body = chat(
        "Summarize the plot of a detective story in two sentences.",
        json!({"max_tokens": 4}),
    );
    let (status, _) = post_as(&app, "/v1/chat/completions", body.clone(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = post_as(&app, "/v1/chat/completions", body.clone(), Some("key-c")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let (_, a1) = post_as(&app, "/v1/chat/completions", body.clone(), Some("key-a")).await;
    let (_, a2) = post_as(&app, "/v1/chat/completions", body.clone(), Some("key-a")).await;
    let (_, b1) = post_as(&app, "/v1/chat/completions", body.clone(), Some("key-b")).await;
    assert_eq!(cached(&a1), 0);
    assert!(cached(&a2) > 0, "a tenant reuses its own prompt");
    assert_eq!(cached(&b1), 0, "another tenant does not");
    // A cache_salt narrows a tenant's namespace further.
    let mut salted = body.clone();
    salted["cache_salt"] = json!("user-42");
    let (_, s1) = post_as(&app, "/v1/chat/completions", salted, Some("key-a")).await;
    assert_eq!(cached(&s1), 0);
    assert_eq!(
        a1["choices"], b1["choices"],
        "isolation does not change outputs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_frees_its_slots() {
    let (app, _) = server();
    let body = json!({
        "model": MODEL_NAME, "prompt": "Count from one to one thousand: one, two,",
        "max_tokens": 2000, "ignore_eos": true, "stream": true,
    });
    let resp = app
        .clone()
        .oneshot(request("POST", "/v1/completions", Some(&body), None))
        .await
        .unwrap();
    let mut stream = resp.into_body();
    // Read until some tokens have come, then hang up.
    let mut seen = 0;
    while seen < 3 {
        let frame = stream.frame().await.unwrap().unwrap();
        if frame.data_ref().is_some() {
            seen += 1;
        }
    }
    assert!(metric(&app, "arbor_kv_slots_used").await > 0.0);
    drop(stream);
    let mut freed = false;
    for _ in 0..100 {
        if metric(&app, "arbor_kv_slots_used").await == 0.0
            && metric(&app, "arbor_requests_running").await == 0.0
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "the request was not cancelled");
    assert_eq!(
        metric(&app, "arbor_requests_total{outcome=\"cancelled\"}").await,
        1.0
    );
    let total = metric(&app, "arbor_kv_slots_total").await;
    let free = metric(&app, "arbor_kv_slots_free").await;
    let cached = metric(&app, "arbor_kv_slots_cached").await;
    assert_eq!(free + cached, total, "every slot accounted for");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_503() {
    let (app, _) = server_with(|c, e| {
        c.max_queue = 1;
        e.max_running = 1;
    });
    let body = json!({
        "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 400,
        "ignore_eos": true, "stream": true,
    });
    // Stream responses come back as soon as the engine has accepted the request.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        let resp = app
            .clone()
            .oneshot(request("POST", "/v1/completions", Some(&body), None))
            .await
            .unwrap();
        match resp.status() {
            StatusCode::OK => accepted.push(resp),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(resp.headers().contains_key("retry-after"));
                refused += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(
        accepted.len() <= 2 && refused >= 2,
        "{} accepted",
        accepted.len()
    );
    drop(accepted);
    assert!(metric(&app, "arbor_requests_total{outcome=\"rejected\"}").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokenize_detokenize_and_models() {
    let (app, state) = server();
    let (status, v) = post(&app, "/tokenize", json!({"prompt": "Hello world"})).await;
    assert_eq!(status, StatusCode::OK);
    let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(tokens, state.tokenizer.encode("Hello world", true).unwrap());
    assert_eq!(v["count"], tokens.len());
    let (_, d) = post(&app, "/detokenize", json!({"tokens": tokens})).await;
    assert_eq!(d["prompt"], "Hello world");
    let (_, chat_tokens) = post(
        &app,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    let (_, usage) = post(
        &app,
        "/v1/chat/completions",
        chat("Hi", json!({"max_tokens": 1})),
    )
    .await;
    assert_eq!(chat_tokens["count"], usage["usage"]["prompt_tokens"]);

    let (status, text) = call_raw(&app, request("GET", "/v1/models", None, None)).await;
    assert_eq!(status, StatusCode::OK);
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL_NAME);
    assert_eq!(models["data"][0]["max_model_len"], 8192);
    let (status, _) = call_raw(&app, request("GET", "/v1/models/other", None, None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, text) = call_raw(&app, request("GET", "/health", None, None)).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, "{\"status\":\"ok\"}")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_then_aborts_what_is_left() {
    let (_, state) = server_with(|c, _| c.shutdown_timeout = Duration::from_millis(500));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(arbor_server::serve(listener, state.clone(), async {
        let _ = stopped.await;
    }));
    // A raw HTTP/1.1 request on a socket: a long stream that cannot finish within the deadline.
    use tokio::io::AsyncReadExt;
    let mut sock = common::open_long_stream(addr).await;
    stop.send(()).unwrap();
    // New requests are refused while draining.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(state.engine.is_draining());
    // The stream ends with finish_reason "abort" after the deadline, and serve returns.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), sock.read_to_end(&mut rest))
        .await
        .expect("the stream ended")
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("\"finish_reason\":\"abort\""), "{text}");
    assert!(text.contains("data: [DONE]"));
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("serve returned")
        .unwrap()
        .unwrap();
}

/// Reasoning parsers split replies in whole responses and streams alike. The default model
/// never writes `</think>`, so under DeepSeek-R1's rules (replies start inside reasoning) its
/// whole reply is reasoning, and under Qwen3's (reasoning only when a think block opens) none
/// of it; the splitting itself is tested in `reasoning.rs`.
#[tokio::test(flavor = "multi_thread")]
async fn reasoning_parsers_split_replies_whole_and_streamed() {
    use arbor_server::reasoning::ReasoningParser;
    let question = "Write one sentence about the sea.";
    let (plain, _) = server();
    let (_, want) = post(&plain, "/v1/chat/completions", chat(question, json!({}))).await;
    let reply = want["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!reply.is_empty());
    assert!(want["choices"][0]["message"]
        .get("reasoning_content")
        .is_none());
    let tokens = &want["usage"]["completion_tokens"];

    let (r1, _) = server_with(|c, _| c.reasoning_parser = ReasoningParser::DeepSeekR1);
    let (_, got) = post(&r1, "/v1/chat/completions", chat(question, json!({}))).await;
    let message = &got["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], reply);
    assert!(message["content"].is_null(), "{message}");
    assert_eq!(
        &got["usage"]["completion_tokens_details"]["reasoning_tokens"],
        tokens
    );
    let body = chat(
        question,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (_, text) = call_raw(
        &r1,
        request("POST", "/v1/chat/completions", Some(&body), None),
    )
    .await;
    let data = sse_data(&text);
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let part = |key: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][key].as_str())
            .collect()
    };
    assert_eq!(part("reasoning_content"), reply);
    assert_eq!(part("content"), "", "only the opening empty delta");
    assert_eq!(
        &chunks.last().unwrap()["usage"]["completion_tokens_details"]["reasoning_tokens"],
        tokens
    );

    let (qwen, _) = server_with(|c, _| c.reasoning_parser = ReasoningParser::Qwen3);
    let (_, got) = post(&qwen, "/v1/chat/completions", chat(question, json!({}))).await;
    assert_eq!(got["choices"][0]["message"]["content"], reply);
    assert!(got["choices"][0]["message"]
        .get("reasoning_content")
        .is_none());
    assert_eq!(
        got["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
    // The default (auto) leaves a template without think tags alone.
    let (_, got) = post(&plain, "/v1/chat/completions", chat(question, json!({}))).await;
    assert!(got["usage"].get("completion_tokens_details").is_none());
}
