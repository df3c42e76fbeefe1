//! Hostile and faulty requests against the default model: bounded work per call, faults that
//! fail only their own request, an engine failure that stops the server instead of leaving a
//! zombie, and slot accounting after each.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbor_engine::{EngineConfig, FaultInjector, FaultSite};
use arbor_model::RunnerOptions;
use arbor_server::{AppState, ServerConfig};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;
use common::{assert_slots_settled, metric};

fn server_with(f: impl FnOnce(&mut ServerConfig, &mut EngineConfig)) -> (Router, Arc<AppState>) {
    common::server_with("m", 4_096, f)
}

fn post_req(path: &str, body: &Value, key: Option<&str>) -> Request<Body> {
    let mut b = Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Body::from(body.to_string())).unwrap()
}

fn get_req(path: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().method("GET").uri(path);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Body::empty()).unwrap()
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

fn error_of(status: StatusCode, text: &str) -> Value {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(
        v["error"]["message"].is_string(),
        "not OpenAI's error shape: {text}"
    );
    assert!(status.is_client_error() || status.is_server_error());
    v["error"].clone()
}

/// The request that used to kill the server (issue: 128 prompts x n = 128 with a 4 MB stop
/// string) and its variants: each answers 400 naming the field and the limit, at once, and
/// the server keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_calls_are_refused_before_any_work() {
    let (app, _) = server_with(|_, _| {});
    let huge_stop = "x".repeat(4 << 20);
    let prompts: Vec<&str> = vec!["Once upon a time"; 128];
    let cases = [
        (
            json!({"prompt": prompts, "n": 128, "max_tokens": 1, "stop": [huge_stop]}),
            "stop[0]",
            "256",
        ),
        (
            json!({"prompt": prompts, "n": 128, "max_tokens": 1}),
            "prompt",
            "128",
        ),
        (
            json!({"prompt": "hi", "n": 129, "max_tokens": 1}),
            "n",
            "128",
        ),
        (
            json!({"prompt": "hi", "stop_token_ids": (0..10_000).collect::<Vec<u32>>()}),
            "stop_token_ids",
            "64",
        ),
        (
            json!({"prompt": "hi", "logit_bias": (0..1000).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>()}),
            "logit_bias",
            "300",
        ),
        (json!({"prompt": vec!["a"; 129]}), "prompt", "128"),
        // Three 2,000-token prompts: 6,000 tokens, more than the 4,096-slot pool.
        (
            json!({"prompt": vec![vec![42u32; 2000]; 3], "max_tokens": 1}),
            "prompt",
            "4096",
        ),
    ];
    for (body, param, limit) in cases {
        let started = std::time::Instant::now();
        let (status, text) = call(&app, post_req("/v1/completions", &body, None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        let e = error_of(status, &text);
        assert_eq!(e["param"], param, "{text}");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains(limit),
            "the limit {limit} is not named: {message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refused only after {:?}",
            started.elapsed()
        );
    }
    // The limit is configurable and the same call passes under it.
    let (app2, _) = server_with(|c, _| c.max_sequences_per_request = 4);
    let (status, text) = call(
        &app2,
        post_req(
            "/v1/completions",
            &json!({"prompt": ["a", "b"], "n": 3, "max_tokens": 1}),
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("--max-seqs-per-request"), "{text}");
    let (status, _) = call(
        &app2,
        post_req(
            "/v1/completions",
            &json!({"prompt": ["a", "b"], "n": 2, "max_tokens": 1}),
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Still serving, nothing held.
    let (status, text) = call(
        &app,
        post_req(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 4}),
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_slots_settled(&app).await;
}

const POISON_SAMPLE: u32 = 4242;
const POISON_DETOKENIZE: u32 = 4243;

fn faulty_requests() -> FaultInjector {
    FaultInjector(Arc::new(|site| match site {
        FaultSite::Sample { prompt } if prompt.contains(&POISON_SAMPLE) => {
            panic!("injected sampling fault")
        }
        FaultSite::Detokenize { prompt } if prompt.contains(&POISON_DETOKENIZE) => {
            panic!("injected detokenizer fault")
        }
        _ => {}
    }))
}

/// A panic while sampling or detokenizing one request ends that request with an error (500
/// without streaming, an error event with streaming); a healthy request running beside it
/// gets exactly the output it gets alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_fault_in_one_request_fails_only_that_request() {
    let (app, _) = server_with(|_, e| e.fault_injector = Some(faulty_requests()));
    let healthy = json!({"prompt": [1, 504, 3273, 253, 655], "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let (status, alone) = call(&app, post_req("/v1/completions", &healthy, None)).await;
    assert_eq!(status, StatusCode::OK, "{alone}");
    let alone: Value = serde_json::from_str(&alone).unwrap();

    let poisoned = |token: u32, stream: bool| json!({"prompt": [1, token, 3273, 253], "max_tokens": 24, "temperature": 0, "stream": stream});
    let (h, a, b, c) = tokio::join!(
        call(&app, post_req("/v1/completions", &healthy, None)),
        call(
            &app,
            post_req("/v1/completions", &poisoned(POISON_SAMPLE, false), None)
        ),
        call(
            &app,
            post_req("/v1/completions", &poisoned(POISON_DETOKENIZE, false), None)
        ),
        call(
            &app,
            post_req("/v1/completions", &poisoned(POISON_SAMPLE, true), None)
        ),
    );
    assert_eq!(h.0, StatusCode::OK, "{}", h.1);
    let h: Value = serde_json::from_str(&h.1).unwrap();
    assert_eq!(h["choices"][0]["text"], alone["choices"][0]["text"]);
    for (status, text, what) in [(a.0, &a.1, "sampling"), (b.0, &b.1, "detokenizer")] {
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
        let e = error_of(status, text);
        assert!(e["message"].as_str().unwrap().contains(what), "{text}");
    }
    // Streaming: the failed choice becomes an error event, then the stream ends properly.
    assert_eq!(c.0, StatusCode::OK);
    let events: Vec<&str> =
        c.1.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
    assert!(
        events
            .iter()
            .any(|e| e.contains("\"error\"") && e.contains("sampling")),
        "{}",
        c.1
    );
    assert_eq!(events.last(), Some(&"[DONE]"));
    assert_eq!(
        metric(&app, "arbor_requests_total{outcome=\"error\"}").await,
        3.0
    );
    let (status, _) = call(&app, get_req("/health", None)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a request's fault is not the engine's"
    );
    assert_slots_settled(&app).await;
}

/// A panic in the forward pass is an engine failure: the stream in flight ends with an error
/// event, /health answers 503, new requests get 503, and `serve` returns an error (so the
/// process exits non-zero for its supervisor).
#[tokio::test(flavor = "multi_thread")]
async fn an_engine_failure_stops_the_server_instead_of_leaving_a_zombie() {
    let options = RunnerOptions {
        kv_slots: Some(4_096),
        ..Default::default()
    };
    engine_failure_stops_the_server(
        &options,
        |site| matches!(site, FaultSite::Forward { .. }),
        "injected forward-pass fault",
    )
    .await;
}

/// The same when one tensor-parallel rank fails: the others, waiting for it in the
/// all-reduce, are released, and the server stops rather than hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_tensor_parallel_rank_stops_the_server_instead_of_hanging_it() {
    let options = RunnerOptions {
        kv_slots: Some(4_096),
        tensor_parallel_size: 3,
        ..Default::default()
    };
    engine_failure_stops_the_server(
        &options,
        |site| matches!(site, FaultSite::Rank { rank: 1, .. }),
        "injected forward-pass fault",
    )
    .await;
}

async fn engine_failure_stops_the_server(
    options: &RunnerOptions,
    site_fails: fn(FaultSite<'_>) -> bool,
    message: &'static str,
) {
    let armed = Arc::new(AtomicBool::new(false));
    let trigger = armed.clone();
    let (app, state) = common::server_with_options("m", options, move |_, e| {
        e.fault_injector = Some(FaultInjector(Arc::new(move |site| {
            if site_fails(site) && trigger.load(Ordering::SeqCst) {
                panic!("{message}");
            }
        })))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(arbor_server::serve(
        listener,
        state.clone(),
        std::future::pending(),
    ));

    use tokio::io::AsyncReadExt;
    let mut sock = common::open_long_stream(addr).await;
    armed.store(true, Ordering::SeqCst);

    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), sock.read_to_end(&mut rest))
        .await
        .expect("the stream ended")
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("\"error\"") && text.contains(message),
        "{text}"
    );
    assert!(text.contains("data: [DONE]"), "{text}");

    let (status, health) = call(&app, get_req("/health", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    assert!(health.contains("failed"));
    let (status, text) = call(
        &app,
        post_req(
            "/v1/completions",
            &json!({"prompt": "hi", "max_tokens": 1}),
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    error_of(status, &text);

    let result = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("serve returned after the engine failed")
        .unwrap();
    let err = result.expect_err("serve reports the engine failure");
    assert!(err.to_string().contains("engine"), "{err}");
}

/// A client of a non-streaming request that hangs up (its response future dropped) cancels
/// the request: its slots return to the pool.
#[tokio::test(flavor = "multi_thread")]
async fn a_non_streaming_client_that_disconnects_frees_its_slots() {
    let (app, _) = server_with(|_, _| {});
    let body = json!({"prompt": "Count from one to one thousand: one, two,", "max_tokens": 2000, "ignore_eos": true});
    let pending = tokio::spawn({
        let app = app.clone();
        async move { call(&app, post_req("/v1/completions", &body, None)).await }
    });
    let mut running = false;
    for _ in 0..200 {
        if metric(&app, "arbor_kv_slots_used").await > 0.0 {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(running, "the request never started");
    pending.abort();
    assert!(pending.await.unwrap_err().is_cancelled());
    assert_slots_settled(&app).await;
    assert_eq!(
        metric(&app, "arbor_requests_total{outcome=\"cancelled\"}").await,
        1.0
    );
}

/// With API keys, every API route answers 401 in OpenAI's error shape before its body is
/// read (even a body over the size limit), and /health stays open for probes.
#[tokio::test(flavor = "multi_thread")]
async fn every_api_route_needs_a_key_when_keys_are_set() {
    let (app, _) = server_with(|c, _| {
        c.api_keys = vec!["k".into()];
        c.max_body_bytes = 1024;
    });
    let big = json!({"prompt": "x".repeat(4096)});
    for req in [
        post_req("/v1/chat/completions", &json!({"messages": []}), None),
        post_req("/v1/completions", &big, None),
        post_req("/tokenize", &json!({"prompt": "hi"}), None),
        post_req("/detokenize", &json!({"tokens": [1]}), Some("wrong")),
        get_req("/v1/models", None),
        get_req("/v1/models/smollm2", None),
    ] {
        let path = req.uri().path().to_string();
        let (status, body) = call(&app, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"]["message"].is_string(), "{path}: {body}");
    }
    assert_eq!(call(&app, get_req("/health", None)).await.0, StatusCode::OK);
    let (status, body) = call(
        &app,
        post_req("/tokenize", &json!({"prompt": "hi"}), Some("k")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// With API keys, /metrics needs a key unless it is made public.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_a_key_when_keys_are_set() {
    let (app, _) = server_with(|c, _| c.api_keys = vec!["k".into()]);
    assert_eq!(
        call(&app, get_req("/metrics", None)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, get_req("/metrics", Some("k"))).await.0,
        StatusCode::OK
    );
    let (app, _) = server_with(|c, _| {
        c.api_keys = vec!["k".into()];
        c.metrics_public = true;
    });
    assert_eq!(
        call(&app, get_req("/metrics", None)).await.0,
        StatusCode::OK
    );
    assert!(arbor_server::exposure_warning("0.0.0.0:8000".parse().unwrap(), false).is_some());
    assert!(arbor_server::exposure_warning("0.0.0.0:8000".parse().unwrap(), true).is_none());
    assert!(arbor_server::exposure_warning("127.0.0.1:8000".parse().unwrap(), false).is_none());
}
