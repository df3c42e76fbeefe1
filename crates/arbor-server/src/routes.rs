//! The HTTP handlers: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus
//! /health, /metrics, /tokenize and /detokenize.
//!
//! A generation request goes: API key (the `require_key` middleware) -> body parsed into typed, bounded fields (`api`) ->
//! per-call limits (`limits`) -> chat template and tokenizer (on the blocking pool, off the
//! async workers) -> context and prompt-token checks -> one engine request per choice (`n`
//! choices of one prompt share its KV: the later ones wait for the first one's prefill and
//! reuse it from the prefix cache) -> events from the engine thread -> one JSON response or a
//! stream of server-sent events (`responder`, in the wire format of `wire`).

use std::sync::Arc;

use arbor_engine::Request;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{
    self, ChatFields, CommonFields, CompletionFields, Generation, MessageIn, OutputFormat,
    PromptIn, ToolChoice,
};
use crate::error::ApiError;
use crate::history::{content_spans, Turn};
use crate::limits::{check_prompt_tokens, check_sequences, check_text_bytes, engine_requests};
use crate::metrics::Outcome;
use crate::responder::{Api, ChatParsing, Responder};
use crate::tenancy::Caller;
use crate::worker::{SubmitError, Tagged};
use crate::AppState;

type Shared = Arc<AppState>;

/// Turns a handler's result into a response, counting refusals in the metrics.
fn respond(st: &AppState, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(r) => r,
        Err(e) => {
            let outcome = if e.status == StatusCode::SERVICE_UNAVAILABLE {
                Outcome::Rejected
            } else if e.status.is_client_error() {
                Outcome::Invalid
            } else {
                Outcome::Aborted
            };
            st.metrics.refused(outcome);
            if e.status.is_server_error() {
                tracing::warn!("request failed: {e}");
            }
            e.into_response()
        }
    }
}

/// The body's bytes: 413 over the size limit.
fn read_body(st: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    match body {
        Ok(bytes) => Ok(bytes),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::too_large(st.max_body_bytes))
        }
        Err(rejection) => Err(ApiError::invalid(format!(
            "Could not read the request body: {rejection}"
        ))),
    }
}

fn check_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != st.model_name => Err(ApiError::model_not_found(m)),
        _ => Ok(()),
    }
}

/// Runs tokenizer / template work on the blocking pool so the async workers keep serving.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
}

async fn submit(
    st: &AppState,
    requests: Vec<Request>,
) -> Result<UnboundedReceiver<Tagged>, ApiError> {
    match st.engine.submit(requests).await {
        Ok((_, rx)) => Ok(rx),
        // The engine names the field it refused; OpenAI's error carries it as `param`.
        Err(SubmitError::Invalid(e)) => Err(match e.param() {
            Some(param) => ApiError::invalid_param(param, e.to_string()),
            None => ApiError::invalid(e.to_string()),
        }),
        Err(SubmitError::QueueFull { waiting, limit }) => Err(ApiError::unavailable(format!(
            "The server is at capacity: {waiting} requests are waiting (limit {limit}). Retry later."
        ))),
        Err(SubmitError::Draining) => Err(ApiError::unavailable("The server is shutting down.")),
        Err(SubmitError::EngineFailed(why)) => Err(ApiError::unavailable(format!(
            "The engine has failed and the server is restarting: {why}"
        ))),
    }
}

pub async fn chat_completions(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = chat_inner(st.clone(), caller, body).await;
    respond(&st, result)
}

async fn chat_inner(
    st: Shared,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (fields, mut gen, namespace) = parse_generation::<ChatFields>(&st, &caller, body)?;
    let logprobs = fields.logprobs()?;
    let messages = fields.messages()?;
    let format = fields.output_format()?;
    let (tools, choice) = fields.tools()?;
    let tool_format = || {
        st.tools.ok_or_else(|| {
            ApiError::invalid_param(
                "tools",
                "This model's chat template shows no tool-call format, so calls cannot be read \
                 from its replies: start the server with --tool-call-parser hermes, llama3_json \
                 or mistral, or send tool_choice \"none\".",
            )
        })
    };
    let parallel = fields.parallel_tool_calls.unwrap_or(true);
    // `required` and a named function are enforced: the reply must be calls (of that one).
    let (tool_parser, forced_calls) = match &choice {
        ToolChoice::None => (None, None),
        ToolChoice::Auto => (Some(tool_format()?), None),
        ToolChoice::Required | ToolChoice::Named(_) => {
            let format = tool_format()?;
            let listed: Vec<(String, Option<Value>)> = fields
                .tools
                .iter()
                .flat_map(|t| &t.0)
                .filter(|t| match &choice {
                    ToolChoice::Named(name) => &t.function.name == name,
                    _ => true,
                })
                .map(|t| (t.function.name.clone(), t.function.parameters.clone()))
                .collect();
            let several = parallel && choice == ToolChoice::Required;
            let grammar = crate::tools::forced_calls_grammar(format, &listed, several);
            (Some(format), Some(grammar))
        }
    };
    if forced_calls.is_some() && format != OutputFormat::Text {
        return Err(ApiError::invalid_param(
            "response_format",
            "response_format cannot be combined with tool_choice `required` or a named \
             function: the reply is the calls.",
        ));
    }
    let parsing = ChatParsing {
        reasoning: None,
        tools: tool_parser.map(|p| (p, parallel)),
    };
    check_sequences(&st, 1, gen.n)?;
    let add_generation_prompt = fields.add_generation_prompt.unwrap_or(true);
    if format != OutputFormat::Text || forced_calls.is_some() {
        // Compiling a schema can take a while: off the async threads.
        let worker = st.clone();
        gen.constraint = Some(
            blocking(move || match (&format, forced_calls) {
                (_, Some(grammar)) => worker.structured.lark(&grammar).map_err(|e| {
                    ApiError::invalid_param(
                        "tools",
                        format!("The tools' parameter schemas cannot be enforced: {e}"),
                    )
                }),
                (format, None) => {
                    let compiled = match format {
                        OutputFormat::JsonSchema(s) => worker.structured.json(Some(s)),
                        OutputFormat::Regex(r) => worker.structured.regex(r),
                        OutputFormat::Grammar(g) => worker.structured.lark(g),
                        OutputFormat::Choice(c) => worker.structured.choice(c),
                        OutputFormat::JsonObject | OutputFormat::Text => {
                            worker.structured.json(None)
                        }
                    };
                    compiled.map_err(|e| {
                        ApiError::invalid_param(
                            format.field(),
                            format!("The output constraint cannot be used: {e}"),
                        )
                    })
                }
            })
            .await?,
        );
    }
    let worker = st.clone();
    let (prompt, opens_think, turn) = blocking(move || {
        let text = worker
            .template
            .render_with_tools(&messages, tools.as_ref(), add_generation_prompt)
            .map_err(|e| {
                ApiError::invalid_param(
                    "messages",
                    format!("The model's chat template cannot render these messages: {e}"),
                )
            })?;
        check_text_bytes(&worker, text.len(), "messages")?;
        let tokens = worker.tokenizer.encode(&text, true).map_err(|e| {
            ApiError::invalid_param("messages", format!("Cannot tokenize the conversation: {e}"))
        })?;
        let opens_think = crate::reasoning::prompt_opens_think(&text);
        let sends_reasoning = worker.reasoning_echoes.observe(namespace, &messages);
        // Kept for the reply's end: the next turn's warm-up and the cache-miss report.
        let turn = Turn {
            namespace,
            spans: content_spans(&messages, &text),
            prompt: tokens.clone(),
            prompt_text: text,
            messages,
            tools,
            warm: false,
            sends_reasoning,
        };
        Ok((tokens, opens_think, turn))
    })
    .await?;
    let turn = Turn {
        // A continued assistant message (no generation prompt) is not a turn that ends.
        warm: st.history_warmup && gen.n == 1 && add_generation_prompt,
        ..turn
    };
    let parsing = ChatParsing {
        reasoning: st.reasoning.map(|parser| (parser, opens_think)),
        ..parsing
    };
    check_prompt_tokens(&st, std::slice::from_ref(&prompt), "messages")?;
    run(
        st,
        Api::Chat,
        &[prompt],
        Vec::new(),
        &gen,
        logprobs,
        namespace,
        parsing,
        Some(turn),
    )
    .await
}

/// What both generation endpoints parse first: the endpoint's own fields, the validated
/// sampling fields and the caller's cache namespace.
fn parse_generation<F: serde::de::DeserializeOwned>(
    st: &AppState,
    caller: &Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(F, Generation, u64), ApiError> {
    let key = caller.key.as_deref();
    let bytes = read_body(st, body)?;
    // Two typed passes over the bytes (the shared fields, then the endpoint's own): no
    // JSON tree of the whole body is built.
    let common: CommonFields = api::parse_body(&bytes)?;
    let fields: F = api::parse_body(&bytes)?;
    check_model(st, common.model.as_deref())?;
    let namespace = st.tenancy.namespace(key, common.cache_salt.as_deref());
    Ok((fields, common.generation(st.vocab)?, namespace))
}

/// Queues one engine request per (prompt, choice) and answers with one JSON response or a
/// stream; `echo` holds per prompt the text put before its completions; `reasoning` splits
/// chat replies (the parser, and whether the prompt opened the think block).
#[allow(clippy::too_many_arguments)]
async fn run(
    st: Shared,
    api: Api,
    prompts: &[Vec<u32>],
    echo: Vec<String>,
    gen: &Generation,
    logprobs: Option<usize>,
    namespace: u64,
    parsing: ChatParsing,
    turn: Option<Turn>,
) -> Result<Response, ApiError> {
    let requests = engine_requests(&st, prompts, gen, logprobs, namespace)?;
    let rx = submit(&st, requests).await?;
    let mut responder = Responder::new(
        st,
        api,
        prompts.len(),
        gen.n,
        logprobs.is_some(),
        gen.stop.ignore_eos,
    );
    responder.echo = echo;
    responder.parsing = parsing;
    responder.turn = turn.map(std::sync::Arc::new);
    if gen.stream {
        Ok(responder.stream(rx, gen.include_usage))
    } else {
        responder.collect(rx).await
    }
}

pub async fn completions(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = completions_inner(st.clone(), caller, body).await;
    respond(&st, result)
}

async fn completions_inner(
    st: Shared,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (fields, gen, namespace) = parse_generation::<CompletionFields>(&st, &caller, body)?;
    let logprobs = fields.logprobs()?;
    let prompts = fields.prompts()?;
    check_sequences(&st, prompts.len(), gen.n)?;
    let echo = fields.echo.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::invalid_param(
            "echo",
            "`echo` together with `logprobs` (prompt log-probabilities) is not supported.",
        ));
    }
    let text_bytes: usize = prompts
        .iter()
        .map(|p| match p {
            PromptIn::Text(t) => t.len(),
            PromptIn::Tokens(_) => 0,
        })
        .sum();
    check_text_bytes(&st, text_bytes, "prompt")?;
    let worker = st.clone();
    let (token_prompts, echoes) = blocking(move || {
        let mut tokens = Vec::new();
        let mut texts = Vec::new();
        for p in prompts {
            match p {
                PromptIn::Text(t) => {
                    tokens.push(worker.tokenizer.encode(&t, true).map_err(|e| {
                        ApiError::invalid_param(
                            "prompt",
                            format!("Cannot tokenize the prompt: {e}"),
                        )
                    })?);
                    texts.push(t);
                }
                PromptIn::Tokens(ids) => {
                    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= worker.vocab) {
                        return Err(ApiError::invalid_param(
                            "prompt",
                            format!(
                                "Token id {bad} is not below the vocabulary size {}.",
                                worker.vocab
                            ),
                        ));
                    }
                    let text = if echo {
                        worker.tokenizer.decode(&ids, false).unwrap_or_default()
                    } else {
                        String::new()
                    };
                    tokens.push(ids);
                    texts.push(text);
                }
            }
        }
        Ok((tokens, texts))
    })
    .await?;
    check_prompt_tokens(&st, &token_prompts, "prompt")?;
    let echo = if echo { echoes } else { Vec::new() };
    run(
        st,
        Api::Completion,
        &token_prompts,
        echo,
        &gen,
        logprobs,
        namespace,
        ChatParsing::default(),
        None,
    )
    .await
}

fn model_card(st: &AppState) -> Value {
    json!({
        "id": st.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "arbor",
        "max_model_len": st.context,
    })
}

pub async fn list_models(State(st): State<Shared>) -> Response {
    Json(json!({"object": "list", "data": [model_card(&st)]})).into_response()
}

pub async fn get_model(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let result = check_model(&st, Some(&id)).map(|_| Json(model_card(&st)).into_response());
    respond(&st, result)
}

pub async fn health(State(st): State<Shared>) -> Response {
    if let Some(why) = st.engine.failed() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "error": why})),
        )
            .into_response()
    } else if st.engine.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

/// Prometheus text. With API keys it needs one too (its counters say how busy the server is
/// and how much is cached), unless `--metrics-public` (see [`crate::router`]).
pub async fn metrics(State(st): State<Shared>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(&st.model_name),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct TokenizeFields {
    model: Option<String>,
    /// vLLM's name; `content` is llama.cpp's.
    prompt: Option<String>,
    content: Option<String>,
    messages: Option<Vec<MessageIn>>,
    add_generation_prompt: Option<bool>,
    add_special_tokens: Option<bool>,
}

pub async fn tokenize(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let f: TokenizeFields = api::parse_body(&read_body(&st, body)?)?;
        check_model(&st, f.model.as_deref())?;
        let worker = st.clone();
        let tokens = blocking(move || {
            let add_special = f.add_special_tokens.unwrap_or(true);
            let text = match (f.prompt.or(f.content), f.messages) {
                (Some(text), None) => text,
                (None, Some(messages)) => {
                    let chat = ChatFields {
                        messages,
                        ..Default::default()
                    };
                    worker
                        .template
                        .render(&chat.messages()?, f.add_generation_prompt.unwrap_or(true))
                        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?
                }
                _ => {
                    return Err(ApiError::invalid(
                        "Give either `prompt` (text) or `messages` (a conversation).",
                    ))
                }
            };
            worker
                .tokenizer
                .encode(&text, add_special)
                .map_err(|e| ApiError::invalid(format!("Cannot tokenize: {e}")))
        })
        .await?;
        Ok(Json(json!({
            "count": tokens.len(),
            "max_model_len": st.context,
            "tokens": tokens,
        }))
        .into_response())
    }
    .await;
    respond(&st, result)
}

#[derive(Debug, Deserialize)]
struct DetokenizeFields {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn detokenize(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let f: DetokenizeFields = api::parse_body(&read_body(&st, body)?)?;
        check_model(&st, f.model.as_deref())?;
        if let Some(&bad) = f.tokens.iter().find(|&&t| t as usize >= st.vocab) {
            return Err(ApiError::invalid_param(
                "tokens",
                format!(
                    "Token id {bad} is not below the vocabulary size {}.",
                    st.vocab
                ),
            ));
        }
        let worker = st.clone();
        let text = blocking(move || {
            worker
                .tokenizer
                .decode(&f.tokens, false)
                .map_err(|e| ApiError::invalid(format!("Cannot decode: {e}")))
        })
        .await?;
        Ok(Json(json!({"prompt": text})).into_response())
    }
    .await;
    respond(&st, result)
}

/// Authentication as middleware: every route behind it gets the [`Caller`] (the API key it
/// presented, whose tenant namespace its requests use), or the caller gets 401 before any
/// handler or body extractor runs.
pub async fn require_key(
    State(st): State<Shared>,
    mut req: axum::extract::Request,
    next: Next,
) -> Response {
    match st.tenancy.authenticate(req.headers()) {
        Ok(key) => {
            let caller = Caller {
                key: key.map(Arc::from),
            };
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => respond(&st, Err(e)),
    }
}

pub async fn unknown_path(State(st): State<Shared>, method: Method, uri: Uri) -> Response {
    respond(
        &st,
        Err(ApiError::unknown_path(method.as_str(), uri.path())),
    )
}

pub async fn wrong_method(State(st): State<Shared>, method: Method, uri: Uri) -> Response {
    respond(
        &st,
        Err(ApiError::method_not_allowed(method.as_str(), uri.path())),
    )
}
