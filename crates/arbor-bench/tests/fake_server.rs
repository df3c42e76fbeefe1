//! The bench's client, runner and report against a small in-process fake server whose
//! behaviour each request picks (the last user message names a mode): well-formed streams,
//! streams without usage, HTTP errors, malformed events, streams cut short, errors inside a
//! stream, a server too slow for the timeout, and a target that is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbor_bench::client::{Client, CountSource, Message, Sampling, Target};
use arbor_bench::report::{self, Results, RunInfo, TargetInfo};
use arbor_bench::runner::{self, RunSettings};
use arbor_bench::workload::{self, WorkloadKind, WorkloadParams};
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// An SSE response whose events come `delay` apart.
fn sse(events: Vec<String>, delay: Duration) -> Response {
    let stream = futures_util::stream::unfold(events.into_iter(), move |mut it| async move {
        let e = it.next()?;
        tokio::time::sleep(delay).await;
        Some((Ok::<_, std::io::Error>(e), it))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn chunk(content: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
    )
}

fn finish() -> String {
    format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    )
}

const USAGE: &str = "data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 40, \"completion_tokens\": 3, \"total_tokens\": 43, \"prompt_tokens_details\": {\"cached_tokens\": 32}}}\n\n";

async fn chat(Json(body): Json<Value>) -> Response {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let last = messages
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let mode = last.split_whitespace().next().unwrap_or("ok").to_string();
    let fast = Duration::from_millis(5);
    let done = "data: [DONE]\n\n".to_string();
    match mode.as_str() {
        "error500" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"message": "engine exploded", "type": "server_error"}})),
        )
            .into_response(),
        "no-usage" => sse(
            vec![
                chunk("a"),
                chunk("b"),
                chunk("c"),
                chunk("d"),
                finish(),
                done,
            ],
            fast,
        ),
        "malformed" => sse(vec![chunk("a"), "data: {not json\n\n".into(), done], fast),
        "cut-short" => sse(vec![chunk("a"), chunk("b")], fast),
        "dropped" => sse(
            vec![
                format!(
                    "data: {}\n\n",
                    json!({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]})
                ),
                done,
            ],
            fast,
        ),
        "stream-error" => sse(
            vec![
                chunk("a"),
                format!(
                    "data: {}\n\n",
                    json!({"error": {"message": "out of memory"}})
                ),
            ],
            fast,
        ),
        "slow" => sse(
            vec![chunk("a"), chunk("b"), finish(), done],
            Duration::from_secs(5),
        ),
        // "ok" and conversation turns: the reply says how many messages came, so tests can
        // check that history was resent.
        _ => sse(
            vec![
                chunk(&format!("saw {} ", messages.len())),
                chunk("messages"),
                chunk("."),
                finish(),
                USAGE.into(),
                done,
            ],
            fast,
        ),
    }
}

async fn fake() -> String {
    let app = Router::new()
        .route(
            "/v1/models",
            get(|| async { Json(json!({"data": [{"id": "fake-model"}]})) }),
        )
        .route(
            "/tokenize",
            post(|Json(b): Json<Value>| async move {
                let n = b["prompt"]
                    .as_str()
                    .unwrap_or("")
                    .split_whitespace()
                    .count();
                Json(json!({"count": n}))
            }),
        )
        .route("/v1/chat/completions", post(chat));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn client(url: &str, timeout: Duration) -> Client {
    Client::connect(Target::parse(&format!("fake={url}/v1")).unwrap(), timeout)
        .await
        .unwrap()
}

fn ask(mode: &str) -> Vec<Message> {
    vec![Message::new("user", format!("{mode} please"))]
}

const SAMPLING: Sampling = Sampling {
    max_tokens: 3,
    temperature: 0.0,
    ignore_eos: true,
};

#[tokio::test]
async fn a_good_stream_is_measured_with_the_servers_usage() {
    let url = fake().await;
    let c = client(&url, Duration::from_secs(10)).await;
    assert_eq!(c.model, "fake-model");
    assert!(c.can_tokenize());
    let m = c.chat(&ask("ok"), SAMPLING).await;
    assert_eq!(m.error, None);
    assert_eq!(m.text, "saw 1 messages.");
    assert_eq!(
        (m.prompt_tokens, m.completion_tokens, m.cached_tokens),
        (Some(40), Some(3), Some(32))
    );
    assert_eq!(m.completion_source, Some(CountSource::Usage));
    let ttft = m.ttft.unwrap();
    assert!(ttft > 0.0 && ttft <= m.e2e);
    assert_eq!(m.itl.len(), 2, "three content chunks, two gaps");
    assert_eq!(m.content_chunks, 3);
}

#[tokio::test]
async fn missing_usage_is_counted_and_marked() {
    let url = fake().await;
    let c = client(&url, Duration::from_secs(10)).await;
    let m = c.chat(&ask("no-usage"), SAMPLING).await;
    assert_eq!(m.error, None);
    assert_eq!(m.completion_tokens, Some(4));
    assert_eq!(m.completion_source, Some(CountSource::Estimated));
    // "no-usage please": two words on the fake tokenizer.
    assert_eq!(m.prompt_tokens, Some(2));
    assert_eq!(m.prompt_source, Some(CountSource::Tokenize));
    assert_eq!(m.cached_tokens, None);
}

#[tokio::test]
async fn broken_responses_become_clear_errors() {
    let url = fake().await;
    let c = client(&url, Duration::from_secs(10)).await;
    for (mode, expected) in [
        ("error500", "HTTP 500: engine exploded"),
        ("malformed", "malformed stream event"),
        ("cut-short", "without `data: [DONE]`"),
        ("stream-error", "error in stream: out of memory"),
        ("dropped", "without a finish_reason after 0 content chunks"),
    ] {
        let m = c.chat(&ask(mode), SAMPLING).await;
        let e = m.error.unwrap_or_default();
        assert!(e.contains(expected), "{mode}: {e}");
    }
}

#[tokio::test]
async fn a_slow_server_times_out_instead_of_hanging() {
    let url = fake().await;
    let c = client(&url, Duration::from_millis(800)).await;
    let started = Instant::now();
    let m = c.chat(&ask("slow"), SAMPLING).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(m.error.unwrap().contains("timed out"));
}

#[tokio::test]
async fn a_target_that_is_down_is_a_clear_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let t = Target::parse(&format!("gone=http://127.0.0.1:{port}")).unwrap();
    let e = match Client::connect(t, Duration::from_secs(5)).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(e.starts_with("gone: cannot reach"), "{e}");
}

fn params(kind: WorkloadKind) -> WorkloadParams {
    WorkloadParams {
        kind,
        context_tokens: 50,
        max_tokens: 3,
        conversations: 2,
        turns: 3,
        branches: 2,
        groups: 2,
        prompts_per_group: 3,
        system_tokens: 20,
        question_tokens: 5,
        concurrency: 2,
        rate: 0.0,
        seed: 1,
        custom_file: None,
    }
}

#[tokio::test]
async fn workloads_resend_history_and_report_per_test() {
    let url = fake().await;
    let c = Arc::new(client(&url, Duration::from_secs(10)).await);
    let settings = RunSettings {
        temperature: 0.0,
        ignore_eos: true,
        repeat: 1,
        concurrency: 2,
    };

    let w = workload::build(&params(WorkloadKind::Branching), &c, "n1")
        .await
        .unwrap();
    let out = runner::run(c.clone(), &w, settings, "test").await;
    // 2 conversations x (3 trunk turns + 2 branches).
    assert_eq!(out.records.len(), 10);
    for r in &out.records {
        assert_eq!(r.m.error, None);
        // system + (user, assistant) per earlier turn + user.
        let turns_before = match r.branch {
            None => r.turn - 1,
            Some(_) => 3,
        };
        assert_eq!(
            r.m.text,
            format!("saw {} messages.", 2 + 2 * turns_before),
            "{r:?}"
        );
    }
    let turn3 = out.records.iter().filter(|r| r.test == "turn 3").count();
    assert_eq!(turn3, 2);

    // The reference workload grows its context on the target's tokenizer.
    let w = workload::build(&params(WorkloadKind::Reference), &c, "n2")
        .await
        .unwrap();
    assert_eq!(
        w.tests,
        [
            "LARGE_CONTEXT_FRESH",
            "LARGE_CONTEXT_CACHED_1",
            "LARGE_CONTEXT_CACHED_2",
            "SMALL_CONTEXT"
        ]
    );
    let system = w.sessions[0].system.as_ref().unwrap();
    assert!(system.starts_with("[session n2]"));
    assert!(system.split_whitespace().count() >= 50);
    assert!(
        w.notes[0].contains("on the target's tokenizer"),
        "{:?}",
        w.notes
    );

    // A report with a failing test, a target that was down, and one repeat.
    let mixed = Results {
        version: 1,
        created_unix: 0,
        workload: "branching".into(),
        params: None,
        repeats: 1,
        targets: vec![
            TargetInfo {
                name: "fake".into(),
                base_url: url.clone(),
                model: "fake-model".into(),
                notes: vec![],
                error: None,
            },
            TargetInfo {
                name: "down".into(),
                base_url: "http://x".into(),
                model: String::new(),
                notes: vec![],
                error: Some("cannot reach".into()),
            },
        ],
        runs: vec![RunInfo {
            target: "fake".into(),
            repeat: 1,
            concurrency: 2,
            wall_s: out.wall_s,
        }],
        tests: w
            .tests
            .clone()
            .into_iter()
            .chain(["turn 1".to_string()])
            .collect(),
        records: out.records.clone(),
    };
    let text = report::terminal(&mixed);
    assert!(text.contains("down: not measured: cannot reach"), "{text}");
    assert!(
        text.contains("cache hit ratio 80.0%"),
        "32 of 40 tokens: {text}"
    );
    let html = report::html(&mixed);
    assert!(
        html.contains("<svg") && html.contains("Time to first token per turn"),
        "per-turn chart"
    );

    // Saved results round-trip, and comparing a run with itself renames the second copy.
    let json = serde_json::to_string(&mixed).unwrap();
    let back: Results = serde_json::from_str(&json).unwrap();
    assert_eq!(back.records.len(), mixed.records.len());
    let merged = Results::merge(vec![("a".into(), mixed.clone()), ("b".into(), back)]).unwrap();
    let names = merged.target_names();
    assert_eq!(names, vec!["fake".to_string(), "fake (b)".to_string()]);
    let verdicts = report::verdicts(&merged);
    assert!(
        verdicts.iter().any(|v| v.contains("one run each")),
        "{verdicts:?}"
    );
}

#[tokio::test]
async fn failed_turns_end_their_conversation_but_not_the_run() {
    let url = fake().await;
    let c = Arc::new(client(&url, Duration::from_secs(10)).await);
    let file =
        std::env::temp_dir().join(format!("arbor-bench-custom-{}.jsonl", std::process::id()));
    std::fs::write(
        &file,
        "{\"turns\": [\"error500 first\", \"never sent\"]}\n{\"turns\": [\"ok\", \"ok again\"]}\n",
    )
    .unwrap();
    let mut p = params(WorkloadKind::Custom);
    p.custom_file = Some(file.clone());
    let w = workload::build(&p, &c, "n3").await.unwrap();
    let settings = RunSettings {
        temperature: 0.0,
        ignore_eos: true,
        repeat: 1,
        concurrency: 1,
    };
    let out = runner::run(c, &w, settings, "test").await;
    std::fs::remove_file(file).ok();
    assert_eq!(
        out.records.len(),
        3,
        "the failed conversation stops after its first turn"
    );
    assert_eq!(
        out.records.iter().filter(|r| r.m.error.is_some()).count(),
        1
    );
}
