//! Structured output through the HTTP API on the default model: replies constrained by
//! `response_format` and by `tool_choice` `required` / a named function, whole and streamed,
//! with `n` > 1; and the 400s. (The property test over 100 generated schemas, validated by an
//! independent JSON Schema validator, is in tests/e2e/test_structured.py.)

mod common;

use serde_json::{json, Value};

use common::{post_chat as post, post_chat_json as post_json};

fn ask(question: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 200,
        "temperature": 0.9,
        "seed": 7,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": false,
    })
}

/// Checks a reply against [`person_schema`] by hand.
fn assert_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let obj = v.as_object().unwrap();
    for k in obj.keys() {
        assert!(
            ["name", "age", "role", "tags"].contains(&k.as_str()),
            "{text}"
        );
    }
    let name = obj["name"].as_str().unwrap();
    assert!((1..=24).contains(&name.chars().count()), "{text}");
    let age = obj["age"].as_i64().unwrap();
    assert!((0..=120).contains(&age), "{text}");
    assert!(["admin", "user", "guest"].contains(&obj["role"].as_str().unwrap()));
    if let Some(tags) = obj.get("tags") {
        let tags = tags.as_array().unwrap();
        assert!(tags.len() <= 3);
        assert!(tags
            .iter()
            .all(|t| t.as_str().unwrap().chars().count() <= 10));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_follow_the_schema_whole_streamed_and_per_choice() {
    let (app, _) = common::server_with("m", 8192, |_, _| {});
    let format = json!({"type": "json_schema",
                        "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});
    let (status, v) = post_json(
        &app,
        ask(
            "Describe a user of a web site.",
            json!({"response_format": format, "n": 3}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let mut replies = Vec::new();
    for c in v["choices"].as_array().unwrap() {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        let text = c["message"]["content"].as_str().unwrap();
        assert_person(text);
        replies.push(text.to_string());
    }
    // Each choice follows its own constraint (seeds differ), not one shared state.
    assert!(replies.iter().any(|r| r != &replies[0]), "{replies:?}");

    let (status, text) = post(
        &app,
        ask(
            "Describe a user of a web site.",
            json!({"response_format": format, "stream": true}),
        ),
    )
    .await;
    assert_eq!(status, 200);
    let mut content = String::new();
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data != "[DONE]" {
            let chunk: Value = serde_json::from_str(data).unwrap();
            content.push_str(
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or(""),
            );
        }
    }
    assert_person(&content);

    // Any JSON object: a reply that ends by itself is one.
    let (_, v) = post_json(
        &app,
        ask(
            "Give a JSON object with a key ok.",
            json!({"response_format": {"type": "json_object"}, "max_tokens": 300}),
        ),
    )
    .await;
    let c = &v["choices"][0];
    if c["finish_reason"] == "stop" {
        let obj: Value = serde_json::from_str(c["message"]["content"].as_str().unwrap()).unwrap();
        assert!(obj.is_object());
    } else {
        assert!(c["message"]["content"].as_str().unwrap().starts_with('{'));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_choice_required_and_named_force_calls() {
    let (app, _) = common::server_with("m", 8192, |c, _| {
        c.tool_call_parser = arbor_server::tools::ToolCallParser::Hermes;
    });
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
            "required": ["tz"], "additionalProperties": false}}},
    ]);
    for (choice, want) in [
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            Some("get_time"),
        ),
        (json!("required"), None),
    ] {
        let (status, v) = post_json(
            &app,
            ask(
                "What is the weather in Paris?",
                json!({"tools": tools, "tool_choice": choice, "parallel_tool_calls": false}),
            ),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{c}");
        assert!(c["message"]["content"].is_null(), "{c}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        let name = calls[0]["function"]["name"].as_str().unwrap();
        if let Some(want) = want {
            assert_eq!(name, want);
        }
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        match name {
            "get_time" => assert!(["UTC", "CET"].contains(&args["tz"].as_str().unwrap())),
            "get_weather" => assert!(args["city"].as_str().unwrap().chars().count() <= 20),
            other => panic!("{other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn formats_that_cannot_be_served_are_400s() {
    let (app, _) = common::server_with("m", 4096, |_, _| {});
    for (format, param, says) in [
        (
            json!({"type": "xml"}),
            "response_format.type",
            "json_schema",
        ),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
            "schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
            "response_format.json_schema.schema",
            "JSON Schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema":
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}),
            "response_format",
            "missing",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema":
            {"type": "integer", "minimum": 5, "maximum": 1}}}),
            "response_format",
            "cannot be used",
        ),
    ] {
        let (status, v) = post_json(&app, ask("x", json!({"response_format": format}))).await;
        assert_eq!(status, 400, "{format}: {v}");
        assert_eq!(v["error"]["param"], param, "{format}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    // Text is text.
    let (status, _) = post_json(
        &app,
        ask(
            "x",
            json!({"response_format": {"type": "text"}, "max_tokens": 3}),
        ),
    )
    .await;
    assert_eq!(status, 200);
    common::assert_slots_settled(&app).await;
}
