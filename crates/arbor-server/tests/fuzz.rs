//! Property-based fuzzing of the HTTP layer on the default model: request bodies generated from
//! the OpenAI request grammar (every field, with plausible and wrong-typed values), plus raw
//! bytes and truncated bodies. For every case: no panic, a success or an error in OpenAI's
//! shape (`{"error": {"message", "type", ...}}`), a stream that ends with `[DONE]`; after all
//! cases, no KV slot is held and every slot is free or cached, and the server still answers.
//!
//! Cases: `ARBOR_FUZZ_CASES` (default 300, what CI runs, about 3 s; generation is capped at a
//! few tokens so a case costs milliseconds). The generator is seeded, so a run is repeatable.
//! `ARBOR_FUZZ_VERBOSE=1` prints why each refused case was refused.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{json, Map, Value};
use tower::ServiceExt;

mod common;

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        Just(json!(1e300)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mostly plausible values for a field, sometimes anything at all.
fn field(plausible: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    prop_oneof![8 => plausible, 1 => any_json()].boxed()
}

fn text() -> BoxedStrategy<Value> {
    prop_oneof![
        "[a-zA-Z ,.!?]{0,40}".prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        Just(json!("")),
    ]
    .boxed()
}

fn token_ids() -> BoxedStrategy<Value> {
    prop::collection::vec(
        prop_oneof![0u64..49_152, Just(49_152u64), Just(u64::MAX)],
        0..12,
    )
    .prop_map(Value::from)
    .boxed()
}

fn message() -> BoxedStrategy<Value> {
    let role = prop_oneof![
        Just("user"),
        Just("assistant"),
        Just("system"),
        Just("developer"),
        Just("tool"),
        Just("wizard")
    ];
    let content = prop_oneof![
        text(),
        prop::collection::vec(
            prop_oneof![
                text().prop_map(|t| json!({"type": "text", "text": t})),
                Just(json!({"type": "image_url", "image_url": {"url": "x"}})),
                Just(json!({"type": "text"})),
                Just(json!({"text": "no type"})),
            ],
            0..3
        )
        .prop_map(Value::from),
        Just(Value::Null),
    ];
    (role, field(content.boxed()))
        .prop_map(|(role, content)| json!({"role": role, "content": content}))
        .boxed()
}

/// The generation fields both endpoints take, each present or not.
fn common_fields() -> BoxedStrategy<Map<String, Value>> {
    let fields: Vec<(&str, BoxedStrategy<Value>)> = vec![
        (
            "model",
            prop_oneof![Just(json!("m")), Just(json!("other"))].boxed(),
        ),
        (
            "max_tokens",
            prop_oneof![
                (1i64..4).prop_map(Value::from),
                Just(json!(0)),
                Just(json!(-3)),
                Just(json!(1u64 << 40))
            ]
            .boxed(),
        ),
        ("temperature", (-0.5f64..2.5).prop_map(Value::from).boxed()),
        ("top_p", (-0.1f64..1.2).prop_map(Value::from).boxed()),
        ("top_k", (-3i64..60).prop_map(Value::from).boxed()),
        ("min_p", (-0.1f64..1.2).prop_map(Value::from).boxed()),
        (
            "n",
            prop_oneof![1i64..4, Just(0), Just(-1), Just(129), Just(100_000)]
                .prop_map(Value::from)
                .boxed(),
        ),
        ("seed", any::<i64>().prop_map(Value::from).boxed()),
        ("stream", any::<bool>().prop_map(Value::from).boxed()),
        (
            "stream_options",
            Just(json!({"include_usage": true})).boxed(),
        ),
        (
            "stop",
            prop_oneof![
                text(),
                prop::collection::vec(text(), 0..20).prop_map(Value::from),
                Just(json!("x".repeat(300)))
            ]
            .boxed(),
        ),
        ("stop_token_ids", token_ids()),
        (
            "logit_bias",
            prop::collection::btree_map("[0-9]{1,6}|[a-z]{1,3}", -150f64..150.0, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k, json!(v))).collect()))
                .boxed(),
        ),
        (
            "presence_penalty",
            (-3f64..3.0).prop_map(Value::from).boxed(),
        ),
        (
            "frequency_penalty",
            (-3f64..3.0).prop_map(Value::from).boxed(),
        ),
        (
            "repetition_penalty",
            (-1f64..3.0).prop_map(Value::from).boxed(),
        ),
        ("min_tokens", (-1i64..6).prop_map(Value::from).boxed()),
        ("ignore_eos", any::<bool>().prop_map(Value::from).boxed()),
        ("cache_salt", text()),
        ("best_of", (0i64..3).prop_map(Value::from).boxed()),
        ("user", text()),
    ];
    let per_field: Vec<BoxedStrategy<Option<(String, Value)>>> = fields
        .into_iter()
        .map(|(name, s)| {
            prop::option::weighted(0.12, field(s))
                .prop_map(move |v| v.map(|v| (name.to_string(), v)))
                .boxed()
        })
        .collect();
    per_field
        .prop_map(|kv| kv.into_iter().flatten().collect::<Map<String, Value>>())
        .boxed()
}

#[derive(Debug, Clone)]
enum Case {
    Json(&'static str, Value),
    Raw(&'static str, Vec<u8>),
}

fn case() -> impl Strategy<Value = Case> {
    let chat = (
        common_fields(),
        field(
            prop::collection::vec(message(), 1..4)
                .prop_map(Value::from)
                .boxed(),
        ),
        prop::option::of(any::<bool>()),
        prop::option::of(-2i64..25),
    )
        .prop_map(|(mut m, messages, logprobs, top)| {
            m.insert("messages".into(), messages);
            if let Some(l) = logprobs {
                m.insert("logprobs".into(), l.into());
            }
            if let Some(t) = top {
                m.insert("top_logprobs".into(), t.into());
            }
            Case::Json("/v1/chat/completions", Value::Object(m))
        });
    let prompt = prop_oneof![
        text(),
        prop::collection::vec(text(), 0..4).prop_map(Value::from),
        token_ids(),
        prop::collection::vec(token_ids(), 0..3).prop_map(Value::from),
    ];
    let completion = (
        common_fields(),
        field(prompt.boxed()),
        prop::option::of(-1i64..22),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(mut m, prompt, logprobs, echo)| {
            m.insert("prompt".into(), prompt);
            if let Some(l) = logprobs {
                m.insert("logprobs".into(), l.into());
            }
            if let Some(e) = echo {
                m.insert("echo".into(), e.into());
            }
            Case::Json("/v1/completions", Value::Object(m))
        });
    let tokenize = field(text()).prop_map(|t| Case::Json("/tokenize", json!({"prompt": t})));
    let detokenize = token_ids().prop_map(|t| Case::Json("/detokenize", json!({"tokens": t})));
    let raw = (
        prop::sample::select(vec!["/v1/chat/completions", "/v1/completions", "/tokenize"]),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(path, bytes)| Case::Raw(path, bytes));
    let truncated = (any::<prop::sample::Index>())
        .prop_map(|i| {
            let full = br#"{"model":"m","messages":[{"role":"user","content":"Hi there"}],"max_tokens":2,"stream":true}"#;
            Case::Raw("/v1/chat/completions", full[..i.index(full.len())].to_vec())
        });
    prop_oneof![4 => chat, 4 => completion, 1 => tokenize, 1 => detokenize, 2 => raw, 1 => truncated]
}

/// Caps generation so a valid case costs milliseconds: `max_tokens` at most 3 (a value the
/// case sets out of range is kept, to be refused), `n` at most 3 when valid.
fn capped(mut body: Value) -> Value {
    if let Some(m) = body.as_object_mut() {
        match m.get("max_tokens") {
            Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v >= 1) => {
                m.insert("max_tokens".into(), json!(n.as_i64().unwrap().min(3)));
            }
            None => {
                m.insert("max_tokens".into(), json!(2));
            }
            _ => {}
        }
        if m.get("n")
            .and_then(Value::as_i64)
            .is_some_and(|n| n > 3 && n <= 128)
        {
            m.insert("n".into(), json!(3));
        }
    }
    body
}

async fn send(app: &Router, path: &str, body: Vec<u8>) -> (StatusCode, String) {
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = tokio::time::timeout(Duration::from_secs(60), resp.into_body().collect())
        .await
        .expect("a response finishes")
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn check_response(status: StatusCode, text: &str) -> Result<(), TestCaseError> {
    if status.is_success() {
        if text.starts_with("data: ") || text.contains("\ndata: ") {
            let events: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            prop_assert_eq!(
                events.last().copied(),
                Some("[DONE]"),
                "stream without [DONE]: {}",
                text
            );
            for e in &events[..events.len() - 1] {
                let v: Value = serde_json::from_str(e)
                    .map_err(|err| TestCaseError::fail(format!("{err}: {e}")))?;
                prop_assert!(v.get("error").is_none(), "error event in a stream: {}", e);
            }
        } else {
            let _: Value = serde_json::from_str(text)
                .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        }
        return Ok(());
    }
    prop_assert!(
        status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "status {} for: {}",
        status,
        text
    );
    let v: Value =
        serde_json::from_str(text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
    prop_assert!(
        v["error"]["message"].is_string(),
        "not OpenAI's error shape: {}",
        text
    );
    prop_assert!(
        v["error"]["type"].is_string(),
        "not OpenAI's error shape: {}",
        text
    );
    Ok(())
}

#[test]
fn generated_requests_never_break_the_server() {
    let cases: u32 = std::env::var("ARBOR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let (app, _state) = common::server_with("m", 2_048, |_, _| {});
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // A fixed seed: the same cases on every run (proptest's default seeds from the OS).
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let counts = std::cell::RefCell::new((0u32, 0u32));
    runner
        .run(&case(), |c| {
            let (path, body) = match c {
                Case::Json(path, v) => (path, capped(v).to_string().into_bytes()),
                Case::Raw(path, bytes) => (path, bytes),
            };
            let (status, text) = rt.block_on(send(&app, path, body));
            check_response(status, &text)?;
            if std::env::var_os("ARBOR_FUZZ_VERBOSE").is_some() && !status.is_success() {
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                eprintln!(
                    "refused {path} param={} {}",
                    v["error"]["param"],
                    v["error"]["message"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .take(60)
                        .collect::<String>()
                );
            }
            let mut n = counts.borrow_mut();
            if status.is_success() {
                n.0 += 1
            } else {
                n.1 += 1
            }
            Ok(())
        })
        .unwrap();
    let (ok, refused) = *counts.borrow();
    eprintln!("{cases} cases: {ok} served, {refused} refused");
    assert_eq!(ok + refused, cases, "every case was checked");
    // About 1 case in 10 is served (most carry at least one bad field): both outcomes count.
    assert!(
        ok >= cases / 20 && refused >= cases / 2,
        "the grammar reaches both outcomes: {ok} served, {refused} refused"
    );

    rt.block_on(async {
        common::assert_slots_settled(&app).await;
        let (status, text) = send(
            &app,
            "/v1/completions",
            br#"{"prompt":"Once upon a time","max_tokens":3}"#.to_vec(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
    });
}
