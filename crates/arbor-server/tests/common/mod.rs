//! What the server's integration tests share: the default model, a server on it, and reading
//! /metrics.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arbor_engine::{Engine, EngineConfig};
use arbor_model::{DeviceSpec, RunnerOptions};
use arbor_server::{router, AppState, ServerConfig};
use axum::body::Body;
use axum::http::Request;
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;

pub fn model_path() -> PathBuf {
    let dir = std::env::var_os("ARBOR_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} missing: the README's test command fetches it",
        path.display()
    );
    path
}

/// A server on the default model with a `kv_slots` pool, configured further by `f`.
pub fn server_with(
    model_name: &str,
    kv_slots: usize,
    f: impl FnOnce(&mut ServerConfig, &mut EngineConfig),
) -> (Router, Arc<AppState>) {
    let options = RunnerOptions {
        kv_slots: Some(kv_slots),
        ..Default::default()
    };
    server_with_options(model_name, &options, f)
}

/// A server on the default model with these runner options, configured further by `f`.
pub fn server_with_options(
    model_name: &str,
    options: &RunnerOptions,
    f: impl FnOnce(&mut ServerConfig, &mut EngineConfig),
) -> (Router, Arc<AppState>) {
    let opened = arbor_model::open(&model_path(), DeviceSpec::Cpu, options).unwrap();
    let mut engine_config = EngineConfig::default();
    let mut config = ServerConfig::new(model_name);
    f(&mut config, &mut engine_config);
    let engine = Engine::new(opened.runner, opened.tokenizer, engine_config).unwrap();
    let state = AppState::new(engine, opened.chat_template, &config);
    (router(state.clone()), state)
}

/// One sample of /metrics (unauthenticated).
pub async fn metric(app: &Router, name: &str) -> f64 {
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// Waits for the engine to go quiet, then checks that no slot is held by a request and every
/// slot is free or cached.
pub async fn assert_slots_settled(app: &Router) {
    for _ in 0..200 {
        if metric(app, "arbor_kv_slots_used").await == 0.0
            && metric(app, "arbor_requests_running").await == 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(app, "arbor_kv_slots_used").await,
        0.0,
        "slots still held"
    );
    let total = metric(app, "arbor_kv_slots_total").await;
    let free = metric(app, "arbor_kv_slots_free").await;
    let cached = metric(app, "arbor_kv_slots_cached").await;
    assert_eq!(free + cached, total, "slots leaked");
}

/// A long streaming completion on a real socket (raw HTTP/1.1), returned once the server has
/// answered 200; the caller reads the rest with `read_to_end`.
pub async fn open_long_stream(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = serde_json::json!({
        "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "stream": true,
    })
    .to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = sock.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    sock
}

/// POSTs a chat completion (unauthenticated): the status and the body's text.
pub async fn post_chat(app: &Router, body: serde_json::Value) -> (axum::http::StatusCode, String) {
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// [`post_chat`] with the body parsed as JSON.
pub async fn post_chat_json(
    app: &Router,
    body: serde_json::Value,
) -> (axum::http::StatusCode, serde_json::Value) {
    let (status, text) = post_chat(app, body).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}
