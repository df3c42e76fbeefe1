//! The HTTP handlers: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus
//! /health, /metrics, /tokenize and /detokenize.
//!
//! A generation request goes: body -> validated fields -> chat template and tokenizer (on the
//! blocking pool, off the async workers) -> context check -> one engine request per choice
//! (`n` choices of one prompt share its KV: the later ones wait for the first one's prefill and
//! reuse it from the prefix cache) -> events from the engine thread -> one JSON response or a
//! stream of server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arbor_engine::{Event, FinishReason, Request, TokenLogprob, Usage};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{
    self, ChatFields, CommonFields, CompletionFields, Generation, MessageIn, PromptIn,
};
use crate::error::ApiError;
use crate::metrics::Outcome;
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

/// Checks that a prompt fits the context with its max_tokens; returns the max_tokens to use
/// (all the context leaves when the request sets none).
fn fit_context(st: &AppState, prompt_len: usize, gen: &Generation) -> Result<usize, ApiError> {
    let context = st.context;
    if prompt_len == 0 {
        return Err(ApiError::invalid_param("prompt", "The prompt is empty."));
    }
    if prompt_len >= context {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "This model's maximum context length is {context} tokens. However, the prompt has {prompt_len} tokens, which leaves no room for a completion. Shorten the prompt."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    match gen.max_tokens {
        None => Ok(context - prompt_len),
        Some(m) if prompt_len + m > context => Err(ApiError::invalid_param(
            "max_tokens",
            format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {m} for the completion). Reduce the prompt or max_tokens.",
                prompt_len + m
            ),
        )
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m),
    }
}

/// The per-call bound on sequences (prompts x n), checked before any prompt is tokenized or
/// any engine request built.
fn check_sequences(st: &AppState, prompts: usize, n: usize) -> Result<(), ApiError> {
    let limit = st.limits.max_sequences_per_request;
    if prompts.saturating_mul(n) > limit {
        let (param, what) = if prompts > 1 {
            ("prompt", format!("{prompts} prompts x n = {n}"))
        } else {
            ("n", format!("n = {n}"))
        };
        return Err(ApiError::invalid_param(
            param,
            format!(
                "This request asks for {} sequences ({what}); the limit per request is {limit} (--max-seqs-per-request).",
                prompts.saturating_mul(n)
            ),
        ));
    }
    Ok(())
}

/// Text too long to fit the per-call token bound whatever it tokenizes to: refused before the
/// tokenizer spends seconds on it.
fn check_text_bytes(st: &AppState, bytes: usize, param: &str) -> Result<(), ApiError> {
    let limit = st.limits.max_prompt_text_bytes;
    if bytes > limit {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "The prompt text is {bytes} bytes long, more than {limit} bytes: it cannot fit the {} prompt tokens allowed per request.",
                st.limits.max_prompt_tokens_per_request
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// The per-call bound on prompt tokens (all prompts of the call together; `n` choices share
/// their prompt's KV): never more than the KV pool holds.
fn check_prompt_tokens(st: &AppState, prompts: &[Vec<u32>], param: &str) -> Result<(), ApiError> {
    let total: usize = prompts.iter().map(Vec::len).sum();
    let limit = st.limits.max_prompt_tokens_per_request;
    if total > limit {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "The prompts of this request have {total} tokens in all; the limit per request is {limit} (the KV pool's size, or --max-prompt-tokens-per-request)."
            ),
        ));
    }
    Ok(())
}

/// One engine request per (prompt, choice); choice `i` of a seeded request uses seed + i so
/// the choices differ but replay identically. The sampling and stop parameters' lists are
/// shared between the choices (reference-counted), not copied.
fn engine_requests(
    st: &AppState,
    prompts: &[Vec<u32>],
    gen: &Generation,
    logprobs: Option<usize>,
    namespace: u64,
) -> Result<Vec<Request>, ApiError> {
    let mut out = Vec::with_capacity(prompts.len() * gen.n);
    for prompt in prompts {
        let max_tokens = fit_context(st, prompt.len(), gen)?;
        for i in 0..gen.n {
            let mut sampling = gen.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            let mut stop = gen.stop.clone();
            stop.max_tokens = max_tokens;
            out.push(Request {
                prompt: prompt.clone(),
                namespace,
                sampling,
                stop,
                logprobs,
            });
        }
    }
    Ok(out)
}

async fn submit(
    st: &AppState,
    requests: Vec<Request>,
) -> Result<UnboundedReceiver<Tagged>, ApiError> {
    match st.engine.submit(requests).await {
        Ok((_, rx)) => Ok(rx),
        Err(SubmitError::Invalid(e)) => Err(ApiError::invalid(e.to_string())),
        Err(SubmitError::QueueFull { waiting, limit }) => Err(ApiError::unavailable(format!(
            "The server is at capacity: {waiting} requests are waiting (limit {limit}). Retry later."
        ))),
        Err(SubmitError::Draining) => Err(ApiError::unavailable("The server is shutting down.")),
        Err(SubmitError::EngineFailed(why)) => Err(ApiError::unavailable(format!(
            "The engine has failed and the server is restarting: {why}"
        ))),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // Only seen by clients still connected: the server ended the request (shutdown).
        FinishReason::Cancelled => "abort",
        // Reported as an error before it gets here; never sent as a finish reason.
        FinishReason::Error => "error",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// The bytes a token stands for. Byte-level BPE pieces of a multi-byte character do not
/// decode alone, so they are mapped back through GPT-2's byte-to-character table.
fn token_bytes(st: &AppState, id: u32) -> Vec<u8> {
    let text = st.tokenizer.decode(&[id], false).unwrap_or_default();
    if !text.contains('\u{FFFD}') {
        return text.into_bytes();
    }
    let Some(piece) = st.tokenizer.id_to_token(id) else {
        return text.into_bytes();
    };
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
        // SentencePiece byte fallback.
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    piece
        .chars()
        .map(gpt2_char_to_byte)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| text.into_bytes())
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others (0-32,
/// 127-160, 173) were shifted to U+0100 onwards in order.
fn gpt2_char_to_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 && printable(code) {
        return Some(code as u8);
    }
    let n = code.checked_sub(256)? as usize;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n)
        .map(|b| b as u8)
}

fn token_string(st: &AppState, id: u32) -> String {
    String::from_utf8_lossy(&token_bytes(st, id)).into_owned()
}

/// Chat logprobs entry: {"token", "logprob", "bytes", "top_logprobs": [...]}.
fn chat_logprob(st: &AppState, token: u32, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let bytes = token_bytes(st, id);
        json!({
            "token": String::from_utf8_lossy(&bytes),
            "logprob": logprob,
            "bytes": bytes,
        })
    };
    let mut v = entry(token, lp.logprob);
    v["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
    v
}

/// Legacy completions logprobs: parallel lists.
#[derive(Default)]
struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    fn push(&mut self, st: &AppState, token: u32, lp: &TokenLogprob, offset: usize) {
        self.tokens.push(token_string(st, token));
        self.token_logprobs.push(lp.logprob);
        let top: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|&(t, l)| (token_string(st, t), json!(l)))
            .collect();
        self.top_logprobs.push(Value::Object(top));
        self.text_offset.push(offset);
    }

    fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

/// What a response needs to know about its request.
struct Responder {
    st: Shared,
    api: Api,
    id: String,
    created: u64,
    /// Choices in all (prompts x n).
    choices: usize,
    /// Choices per prompt.
    n: usize,
    logprobs: bool,
    ignore_eos: bool,
    /// Per prompt, text put before the completion (`echo`).
    echo: Vec<String>,
}

impl Responder {
    fn new(
        st: Shared,
        api: Api,
        prompts: usize,
        n: usize,
        logprobs: bool,
        ignore_eos: bool,
    ) -> Self {
        let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
        Self {
            st,
            api,
            id: format!(
                "{prefix}-{:016x}{:08x}",
                rand::random::<u64>(),
                rand::random::<u32>()
            ),
            created: now_unix(),
            choices: prompts * n,
            n,
            logprobs,
            ignore_eos,
            echo: Vec::new(),
        }
    }

    /// Whether a token's logprob belongs in the output: the stop token that ended a request
    /// is not part of the text, so it is not listed either.
    fn lists_token(&self, token: u32) -> bool {
        self.logprobs && (self.ignore_eos || !self.st.tokenizer.is_stop(token))
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.api, streaming) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, streaming: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(streaming),
            "created": self.created,
            "model": self.st.model_name,
            "system_fingerprint": Value::Null,
            "choices": choices,
        })
    }

    /// Totals over the choices: each prompt counts once, completions all count.
    fn total_usage(&self, per_choice: &[Usage]) -> Usage {
        let mut u = Usage::default();
        for (i, c) in per_choice.iter().enumerate() {
            if i % self.n == 0 {
                u.prompt_tokens += c.prompt_tokens;
                u.cached_tokens += c.cached_tokens;
            }
            u.completion_tokens += c.completion_tokens;
        }
        u
    }

    /// Waits for every choice and returns one JSON response.
    async fn collect(self, mut rx: UnboundedReceiver<Tagged>) -> Result<Response, ApiError> {
        let mut texts: Vec<String> = (0..self.choices)
            .map(|i| self.echo.get(i / self.n).cloned().unwrap_or_default())
            .collect();
        let mut chat_lps: Vec<Vec<Value>> = vec![Vec::new(); self.choices];
        let mut cmpl_lps: Vec<CompletionLogprobs> = (0..self.choices)
            .map(|_| CompletionLogprobs::default())
            .collect();
        let mut finish: Vec<Option<FinishReason>> = vec![None; self.choices];
        let mut usage = vec![Usage::default(); self.choices];
        let mut done = 0;
        while done < self.choices {
            let Some(Tagged { index, event }) = rx.recv().await else {
                return Err(ApiError::internal(
                    "the engine stopped before the request finished",
                ));
            };
            match event {
                Event::Token {
                    token,
                    text,
                    logprob,
                    ..
                } => {
                    if let Some(lp) = logprob.filter(|_| self.lists_token(token)) {
                        match self.api {
                            Api::Chat => chat_lps[index].push(chat_logprob(&self.st, token, &lp)),
                            Api::Completion => {
                                cmpl_lps[index].push(&self.st, token, &lp, texts[index].len())
                            }
                        }
                    }
                    texts[index].push_str(&text);
                }
                Event::Finished {
                    reason: FinishReason::Error,
                    error,
                    ..
                } => {
                    // One failed choice fails the call; dropping `rx` cancels the others.
                    return Err(ApiError::internal(format!(
                        "generation failed: {}",
                        error.unwrap_or_default()
                    )));
                }
                Event::Finished {
                    reason,
                    text,
                    usage: u,
                    ..
                } => {
                    texts[index].push_str(&text);
                    finish[index] = Some(reason);
                    usage[index] = u;
                    done += 1;
                }
            }
        }
        let choices: Vec<Value> = (0..self.choices)
            .map(|i| {
                let reason = finish[i].map(finish_reason);
                match self.api {
                    Api::Chat => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": if self.logprobs { json!({"content": chat_lps[i]}) } else { Value::Null },
                        "finish_reason": reason,
                    }),
                    Api::Completion => json!({
                        "index": i,
                        "text": texts[i],
                        "logprobs": if self.logprobs { cmpl_lps[i].to_json() } else { Value::Null },
                        "finish_reason": reason,
                    }),
                }
            })
            .collect();
        let mut body = self.envelope(false, Value::Array(choices));
        body["usage"] = usage_json(&self.total_usage(&usage));
        Ok(Json(body).into_response())
    }

    /// Streams server-sent events: a chunk per token (per choice), a final chunk per choice with
    /// its finish_reason, the usage chunk when asked for, then `data: [DONE]`.
    fn stream(self, rx: UnboundedReceiver<Tagged>, include_usage: bool) -> Response {
        let mut pending: VecDeque<String> = VecDeque::new();
        if self.api == Api::Chat {
            for i in 0..self.choices {
                let chunk = self.chunk(
                    include_usage,
                    json!([{
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": Value::Null,
                        "finish_reason": Value::Null,
                    }]),
                );
                pending.push_back(chunk);
            }
        } else {
            for (i, echo) in self.echo.iter().enumerate() {
                for c in 0..self.n {
                    let chunk = self.chunk(include_usage, json!([{
                        "index": i * self.n + c, "text": echo, "logprobs": Value::Null, "finish_reason": Value::Null,
                    }]));
                    pending.push_back(chunk);
                }
            }
        }
        let state = StreamState {
            offsets: vec![0; self.choices],
            usage: vec![Usage::default(); self.choices],
            done: 0,
            finished: false,
            responder: self,
            rx,
            pending,
            include_usage,
        };
        let events = futures_util::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(data) = s.pending.pop_front() {
                    return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s));
                }
                if s.finished {
                    return None;
                }
                s.advance().await;
            }
        });
        Sse::new(events)
            // Comments keep proxies from timing out a long prefill, and let a write to a
            // client that has gone away fail soon, which cancels its request.
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
            .into_response()
    }

    fn chunk(&self, include_usage: bool, choices: Value) -> String {
        let mut v = self.envelope(true, choices);
        if include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }
}

struct StreamState {
    responder: Responder,
    rx: UnboundedReceiver<Tagged>,
    pending: VecDeque<String>,
    /// Per choice, bytes of text sent so far (completions' text_offset).
    offsets: Vec<usize>,
    usage: Vec<Usage>,
    done: usize,
    finished: bool,
    include_usage: bool,
}

impl StreamState {
    /// Waits for the next engine event and queues the chunks it makes.
    async fn advance(&mut self) {
        let r = &self.responder;
        let Some(Tagged { index, event }) = self.rx.recv().await else {
            // The engine went away mid-stream: say so in the stream, then end it.
            let err = ApiError::internal("the engine stopped before the request finished");
            self.pending.push_back(err.body().to_string());
            self.pending.push_back("[DONE]".into());
            self.finished = true;
            return;
        };
        match event {
            Event::Token {
                token,
                text,
                logprob,
                ..
            } => {
                let lp = logprob.filter(|_| r.lists_token(token));
                if text.is_empty() && lp.is_none() {
                    return;
                }
                let choice = match r.api {
                    Api::Chat => json!({
                        "index": index,
                        "delta": {"content": text},
                        "logprobs": lp.map(|lp| json!({"content": [chat_logprob(&r.st, token, &lp)]})),
                        "finish_reason": Value::Null,
                    }),
                    Api::Completion => json!({
                        "index": index,
                        "text": text,
                        "logprobs": lp.map(|lp| {
                            let mut l = CompletionLogprobs::default();
                            l.push(&r.st, token, &lp, self.offsets[index]);
                            l.to_json()
                        }),
                        "finish_reason": Value::Null,
                    }),
                };
                self.offsets[index] += text.len();
                self.pending
                    .push_back(r.chunk(self.include_usage, json!([choice])));
            }
            Event::Finished {
                reason: FinishReason::Error,
                error,
                usage,
                ..
            } => {
                // This choice failed: an error event in OpenAI's shape in its place; the
                // call's other choices go on.
                let err = ApiError::internal(format!(
                    "generation failed for choice {index}: {}",
                    error.unwrap_or_default()
                ));
                self.pending.push_back(err.body().to_string());
                self.finish_choice(index, usage);
            }
            Event::Finished {
                reason,
                text,
                usage,
                ..
            } => {
                let reason = finish_reason(reason);
                let choice = match r.api {
                    Api::Chat => {
                        let delta = if text.is_empty() {
                            json!({})
                        } else {
                            json!({"content": text})
                        };
                        json!({"index": index, "delta": delta, "logprobs": Value::Null, "finish_reason": reason})
                    }
                    Api::Completion => {
                        json!({"index": index, "text": text, "logprobs": Value::Null, "finish_reason": reason})
                    }
                };
                self.pending
                    .push_back(r.chunk(self.include_usage, json!([choice])));
                self.finish_choice(index, usage);
            }
        }
    }

    /// Counts a finished choice; after the last one, the usage chunk and `[DONE]`.
    fn finish_choice(&mut self, index: usize, usage: Usage) {
        let r = &self.responder;
        self.usage[index] = usage;
        self.done += 1;
        if self.done == r.choices {
            if self.include_usage {
                let mut v = r.envelope(true, json!([]));
                v["usage"] = usage_json(&r.total_usage(&self.usage));
                self.pending.push_back(v.to_string());
            }
            self.pending.push_back("[DONE]".into());
            self.finished = true;
        }
    }
}

pub async fn chat_completions(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = chat_inner(st.clone(), headers, body).await;
    respond(&st, result)
}

async fn chat_inner(
    st: Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (fields, gen, namespace) = parse_generation::<ChatFields>(&st, &headers, body)?;
    let logprobs = fields.logprobs()?;
    let messages = fields.messages()?;
    check_sequences(&st, 1, gen.n)?;
    let add_generation_prompt = fields.add_generation_prompt.unwrap_or(true);
    let worker = st.clone();
    let prompt = blocking(move || {
        let text = worker
            .template
            .render(&messages, add_generation_prompt)
            .map_err(|e| {
                ApiError::invalid_param(
                    "messages",
                    format!("The model's chat template cannot render these messages: {e}"),
                )
            })?;
        check_text_bytes(&worker, text.len(), "messages")?;
        worker.tokenizer.encode(&text, true).map_err(|e| {
            ApiError::invalid_param("messages", format!("Cannot tokenize the conversation: {e}"))
        })
    })
    .await?;
    check_prompt_tokens(&st, std::slice::from_ref(&prompt), "messages")?;
    run(
        st,
        Api::Chat,
        &[prompt],
        Vec::new(),
        &gen,
        logprobs,
        namespace,
    )
    .await
}

/// What both generation endpoints parse first: the caller's key and cache namespace, the
/// endpoint's own fields and the validated sampling fields.
fn parse_generation<F: serde::de::DeserializeOwned>(
    st: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(F, Generation, u64), ApiError> {
    let key = st.tenancy.authenticate(headers)?;
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
/// stream; `echo` holds per prompt the text put before its completions.
async fn run(
    st: Shared,
    api: Api,
    prompts: &[Vec<u32>],
    echo: Vec<String>,
    gen: &Generation,
    logprobs: Option<usize>,
    namespace: u64,
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
    if gen.stream {
        Ok(responder.stream(rx, gen.include_usage))
    } else {
        responder.collect(rx).await
    }
}

pub async fn completions(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = completions_inner(st.clone(), headers, body).await;
    respond(&st, result)
}

async fn completions_inner(
    st: Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (fields, gen, namespace) = parse_generation::<CompletionFields>(&st, &headers, body)?;
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

pub async fn list_models(State(st): State<Shared>, headers: HeaderMap) -> Response {
    let result = st
        .tenancy
        .authenticate(&headers)
        .map(|_| Json(json!({"object": "list", "data": [model_card(&st)]})).into_response());
    respond(&st, result)
}

pub async fn get_model(
    State(st): State<Shared>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let result = st.tenancy.authenticate(&headers).and_then(|_| {
        check_model(&st, Some(&id))?;
        Ok(Json(model_card(&st)).into_response())
    });
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
/// and how much is cached), unless `--metrics-public`.
pub async fn metrics(State(st): State<Shared>, headers: HeaderMap) -> Response {
    if !st.metrics_public {
        if let Err(e) = st.tenancy.authenticate(&headers) {
            return respond(&st, Err(e));
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
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

pub async fn tokenize(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        st.tenancy.authenticate(&headers)?;
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
                        logprobs: None,
                        top_logprobs: None,
                        tools: None,
                        tool_choice: None,
                        response_format: None,
                        add_generation_prompt: None,
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

pub async fn detokenize(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        st.tenancy.authenticate(&headers)?;
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

#[cfg(test)]
mod tests {
    use super::gpt2_char_to_byte;

    #[test]
    fn gpt2_byte_alphabet_inverts() {
        assert_eq!(gpt2_char_to_byte('a'), Some(b'a'));
        // Space is byte 32, the 33rd non-printable: U+0120 'Ġ'.
        assert_eq!(gpt2_char_to_byte('\u{0120}'), Some(b' '));
        assert_eq!(gpt2_char_to_byte('\u{0100}'), Some(0));
        assert_eq!(gpt2_char_to_byte('\u{0143}'), Some(173));
        assert_eq!(gpt2_char_to_byte('\u{2000}'), None);
    }
}
