//! One response per call: collects every choice's events into a JSON body, or streams them as
//! server-sent events (a chunk per token per choice, a final chunk per choice, the usage chunk,
//! `[DONE]`); a failed choice becomes an error (500) or an error event in its stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arbor_engine::{Event, FinishReason, Usage};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;
use crate::history::{Reply, Turn};
use crate::reasoning::{ReasoningParser, ReasoningSplitter, Split};
use crate::tools::{ToolCallParser, ToolCallSplitter, ToolSplit};
use crate::wire::{
    chat_logprob, finish_reason, ChatChoice, ChatDeltaChoice, ChatLogprob, ChatLogprobs,
    ChatMessageOut, CompletionLogprobs, Delta, Envelope, TextChoice, ToolCallOut, UsageOut,
};
use crate::worker::Tagged;
use crate::AppState;

type Shared = Arc<AppState>;

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Chat,
    Completion,
}

/// What a response needs to know about its request.
pub(crate) struct Responder {
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
    pub(crate) echo: Vec<String>,
    /// How chat replies are split into reasoning, content and tool calls.
    pub(crate) parsing: ChatParsing,
    /// A chat call's conversation: where its prompt left the cache, and its next turn to warm
    /// when the reply ends.
    pub(crate) turn: Option<Arc<Turn>>,
}

/// How a chat reply is taken apart: reasoning first, then tool calls out of what remains.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ChatParsing {
    /// A reasoning model's parser, and whether the prompt opened the think block.
    pub reasoning: Option<(ReasoningParser, bool)>,
    /// The tool-call format, and whether more than one call is kept.
    pub tools: Option<(ToolCallParser, bool)>,
}

/// One choice's parsers.
struct ChoiceParsers {
    reasoning: Option<ReasoningSplitter>,
    tools: Option<ToolCallSplitter>,
}

/// A piece of a choice's reply, taken apart.
struct Piece {
    reasoning: Option<String>,
    content: String,
    calls: Vec<crate::tools::ToolCall>,
}

impl ChoiceParsers {
    /// `last` flushes what the parsers held back.
    fn take(&mut self, text: String, last: bool) -> Piece {
        let (reasoning, content) = split(self.reasoning.as_mut(), text, last);
        let ToolSplit { content, calls } = match &mut self.tools {
            Some(t) if last => t.finish(&content),
            Some(t) => t.push(&content),
            None => ToolSplit {
                content,
                calls: Vec::new(),
            },
        };
        Piece {
            reasoning,
            content,
            calls,
        }
    }

    fn made_calls(&self) -> bool {
        self.tools.as_ref().is_some_and(|t| t.calls() > 0)
    }
}

/// A finish reason, `tool_calls` when a reply that stopped by itself made calls.
fn choice_finish(reason: FinishReason, parsers: Option<&ChoiceParsers>) -> &'static str {
    if reason == FinishReason::Stop && parsers.is_some_and(ChoiceParsers::made_calls) {
        "tool_calls"
    } else {
        finish_reason(reason)
    }
}

impl Responder {
    pub(crate) fn new(
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
            parsing: ChatParsing::default(),
            turn: None,
        }
    }

    /// Parsers per choice when chat replies are taken apart (empty otherwise).
    fn parsers(&self) -> Vec<ChoiceParsers> {
        let p = self.parsing;
        if self.api != Api::Chat || (p.reasoning.is_none() && p.tools.is_none()) {
            return Vec::new();
        }
        (0..self.choices)
            .map(|_| ChoiceParsers {
                reasoning: p
                    .reasoning
                    .map(|(parser, opens)| ReasoningSplitter::new(parser, opens)),
                tools: p
                    .tools
                    .map(|(format, parallel)| ToolCallSplitter::new(format, parallel)),
            })
            .collect()
    }

    /// The usage object, with the reasoning tokens when replies are split.
    fn usage_out(&self, per_choice: &[Usage], parsers: &[ChoiceParsers]) -> UsageOut {
        let reasoning = self.parsing.reasoning.is_some().then(|| {
            parsers
                .iter()
                .filter_map(|p| p.reasoning.as_ref())
                .map(ReasoningSplitter::reasoning_tokens)
                .sum()
        });
        let mut usage = UsageOut::from(&self.total_usage(per_choice)).with_reasoning(reasoning);
        usage.prompt_cache_miss = match (&self.turn, per_choice.first()) {
            (Some(turn), Some(u)) => turn.cache_miss(&self.st.tokenizer, u.cached_tokens),
            _ => None,
        };
        usage
    }

    /// The reply of a one-choice chat call ended by itself: its conversation's next request,
    /// as the template will render it, goes to the engine as a warm-up (off the async
    /// threads: rendering and tokenizing a long conversation takes milliseconds).
    fn warm_next_turn(&self, reason: FinishReason, reply: Reply) {
        let Some(turn) = self.turn.clone().filter(|t| t.warm) else {
            return;
        };
        if reason != FinishReason::Stop {
            return;
        }
        let st = self.st.clone();
        // Counted from now, before the client sees the reply end, until the engine has it.
        st.metrics.warmup_preparing(true);
        tokio::task::spawn_blocking(move || {
            // Whatever happens in the template, the preparation ends (`warm` counts it off).
            let prefixes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                turn.next_turn_prefixes(&st.template, &st.tokenizer, &reply)
            }))
            .unwrap_or_default();
            st.engine.warm(&st.metrics, turn.namespace, prefixes);
        });
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

    fn envelope<C>(
        &self,
        streaming: bool,
        choices: Vec<C>,
        usage: Option<Option<UsageOut>>,
    ) -> Envelope<'_, C> {
        Envelope {
            id: &self.id,
            object: self.object(streaming),
            created: self.created,
            model: &self.st.model_name,
            system_fingerprint: None,
            choices,
            usage,
        }
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
    pub(crate) async fn collect(
        self,
        mut rx: UnboundedReceiver<Tagged>,
    ) -> Result<Response, ApiError> {
        let mut texts: Vec<String> = (0..self.choices)
            .map(|i| self.echo.get(i / self.n).cloned().unwrap_or_default())
            .collect();
        let mut chat_lps: Vec<Vec<ChatLogprob>> = (0..self.choices).map(|_| Vec::new()).collect();
        let mut cmpl_lps: Vec<CompletionLogprobs> = (0..self.choices)
            .map(|_| CompletionLogprobs::default())
            .collect();
        let mut finish: Vec<Option<FinishReason>> = vec![None; self.choices];
        let mut usage = vec![Usage::default(); self.choices];
        let mut parsers = self.parsers();
        let mut reasoning: Vec<String> = vec![String::new(); parsers.len()];
        let mut calls: Vec<Vec<ToolCallOut>> = (0..parsers.len()).map(|_| Vec::new()).collect();
        // Choice 0's text as generated, for its next turn's warm-up.
        let mut raw = String::new();
        // Text into a choice's content, or taken apart into reasoning, content and calls.
        let mut add_text = |index: usize, text: String, last: bool, texts: &mut Vec<String>| {
            if index == 0 {
                raw.push_str(&text);
            }
            let Some(p) = parsers.get_mut(index) else {
                texts[index].push_str(&text);
                return;
            };
            let piece = p.take(text, last);
            if let Some(r) = piece.reasoning {
                reasoning[index].push_str(&r);
            }
            texts[index].push_str(&piece.content);
            calls[index].extend(piece.calls.into_iter().map(|c| ToolCallOut::new(c, None)));
        };
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
                    add_text(index, text, false, &mut texts);
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
                    add_text(index, text, true, &mut texts);
                    finish[index] = Some(reason);
                    usage[index] = u;
                    done += 1;
                }
            }
        }
        let usage = Some(Some(self.usage_out(&usage, &parsers)));
        if let (Api::Chat, Some(reason)) = (self.api, finish[0]) {
            let reply = Reply {
                raw,
                reasoning: reasoning.first().cloned().unwrap_or_default(),
                content: texts[0].clone(),
                calls: calls
                    .first()
                    .map_or_else(Vec::new, |c| c.iter().map(ToolCallOut::to_call).collect()),
            };
            self.warm_next_turn(reason, reply);
        }
        let reason = |i: usize| finish[i].map(|r| choice_finish(r, parsers.get(i)));
        Ok(match self.api {
            Api::Chat => {
                let choices = chat_lps
                    .into_iter()
                    .zip(texts)
                    .enumerate()
                    .map(|(i, (lps, content))| ChatChoice {
                        index: i,
                        message: match parsers.get(i) {
                            // As vLLM: no answer besides the reasoning or the calls is a null
                            // content.
                            Some(p) => ChatMessageOut {
                                role: "assistant",
                                content: (!content.is_empty()).then_some(content),
                                reasoning_content: p
                                    .reasoning
                                    .as_ref()
                                    .is_some_and(ReasoningSplitter::saw_reasoning)
                                    .then(|| std::mem::take(&mut reasoning[i])),
                                tool_calls: (!calls[i].is_empty())
                                    .then(|| std::mem::take(&mut calls[i])),
                            },
                            None => ChatMessageOut {
                                role: "assistant",
                                content: Some(content),
                                reasoning_content: None,
                                tool_calls: None,
                            },
                        },
                        logprobs: self.logprobs.then_some(ChatLogprobs { content: lps }),
                        finish_reason: reason(i),
                    })
                    .collect();
                Json(self.envelope(false, choices, usage)).into_response()
            }
            Api::Completion => {
                let choices = cmpl_lps
                    .into_iter()
                    .zip(texts)
                    .enumerate()
                    .map(|(i, (lps, text))| TextChoice {
                        index: i,
                        text,
                        logprobs: self.logprobs.then_some(lps),
                        finish_reason: reason(i),
                    })
                    .collect();
                Json(self.envelope(false, choices, usage)).into_response()
            }
        })
    }

    /// Streams server-sent events: a chunk per token (per choice), a final chunk per choice with
    /// its finish_reason, the usage chunk when asked for, then `data: [DONE]`.
    pub(crate) fn stream(self, rx: UnboundedReceiver<Tagged>, include_usage: bool) -> Response {
        let mut pending: VecDeque<String> = VecDeque::new();
        if self.api == Api::Chat {
            for i in 0..self.choices {
                let chunk = self.chunk(
                    include_usage,
                    ChatDeltaChoice {
                        index: i,
                        delta: Delta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                            ..Default::default()
                        },
                        logprobs: None,
                        finish_reason: None,
                    },
                );
                pending.push_back(chunk);
            }
        } else {
            for (i, echo) in self.echo.iter().enumerate() {
                for c in 0..self.n {
                    let chunk = self.chunk(
                        include_usage,
                        TextChoice {
                            index: i * self.n + c,
                            text: echo.clone(),
                            logprobs: None,
                            finish_reason: None,
                        },
                    );
                    pending.push_back(chunk);
                }
            }
        }
        let state = StreamState {
            reply: self
                .turn
                .as_ref()
                .filter(|t| t.warm)
                .map(|_| Reply::default()),
            parsers: self.parsers(),
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

    /// One stream chunk of one choice; its `usage` is null when the stream ends with a usage
    /// chunk, absent otherwise.
    fn chunk<C: Serialize>(&self, include_usage: bool, choice: C) -> String {
        let usage = include_usage.then_some(None);
        to_json(&self.envelope(true, vec![choice], usage))
    }
}

/// A piece of a choice's text as (reasoning, content): split by the choice's splitter when
/// replies are split (`last` flushes what it held back), all content otherwise.
fn split(
    splitter: Option<&mut ReasoningSplitter>,
    text: String,
    last: bool,
) -> (Option<String>, String) {
    match splitter {
        Some(s) => {
            let Split { reasoning, content } = if last { s.finish(&text) } else { s.push(&text) };
            ((!reasoning.is_empty()).then_some(reasoning), content)
        }
        None => (None, text),
    }
}

/// A piece of a choice's reply taken apart by its parsers, or all content without any.
fn take(parsers: Option<&mut ChoiceParsers>, text: String, last: bool) -> Piece {
    match parsers {
        Some(p) => p.take(text, last),
        None => Piece {
            reasoning: None,
            content: text,
            calls: Vec::new(),
        },
    }
}

/// Adds a streamed piece of choice 0 to the reply kept for its next turn.
fn record(
    reply: Option<&mut Reply>,
    reasoning: Option<&str>,
    content: &str,
    calls: &[crate::tools::ToolCall],
) {
    if let Some(r) = reply {
        r.reasoning.push_str(reasoning.unwrap_or_default());
        r.content.push_str(content);
        r.calls.extend_from_slice(calls);
    }
}

/// Calls released by a piece, numbered within their choice, for a stream delta.
fn stream_calls(
    parsers: Option<&ChoiceParsers>,
    calls: Vec<crate::tools::ToolCall>,
) -> Option<Vec<ToolCallOut>> {
    if calls.is_empty() {
        return None;
    }
    let made = parsers
        .and_then(|p| p.tools.as_ref())
        .map_or(0, ToolCallSplitter::calls);
    let first = made - calls.len();
    Some(
        calls
            .into_iter()
            .enumerate()
            .map(|(k, c)| ToolCallOut::new(c, Some(first + k)))
            .collect(),
    )
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("the wire structs serialize to JSON")
}

pub(crate) struct StreamState {
    responder: Responder,
    rx: UnboundedReceiver<Tagged>,
    pending: VecDeque<String>,
    /// Per choice, bytes of text sent so far (completions' text_offset).
    offsets: Vec<usize>,
    /// Per choice when chat replies are taken apart.
    parsers: Vec<ChoiceParsers>,
    /// Choice 0's reply so far, when its next turn is to be warmed.
    reply: Option<Reply>,
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
                if let (0, Some(reply)) = (index, self.reply.as_mut()) {
                    reply.raw.push_str(&text);
                }
                let Piece {
                    reasoning,
                    content: text,
                    calls,
                } = take(self.parsers.get_mut(index), text, false);
                if index == 0 {
                    record(self.reply.as_mut(), reasoning.as_deref(), &text, &calls);
                }
                if text.is_empty() && reasoning.is_none() && calls.is_empty() && lp.is_none() {
                    return;
                }
                let tool_calls = stream_calls(self.parsers.get(index), calls);
                let offset = self.offsets[index];
                self.offsets[index] += text.len();
                let chunk = match r.api {
                    Api::Chat => r.chunk(
                        self.include_usage,
                        ChatDeltaChoice {
                            index,
                            delta: Delta {
                                role: None,
                                content: (!text.is_empty()
                                    || (reasoning.is_none() && tool_calls.is_none()))
                                .then_some(text),
                                reasoning_content: reasoning,
                                tool_calls,
                            },
                            logprobs: lp.map(|lp| ChatLogprobs {
                                content: vec![chat_logprob(&r.st, token, &lp)],
                            }),
                            finish_reason: None,
                        },
                    ),
                    Api::Completion => r.chunk(
                        self.include_usage,
                        TextChoice {
                            index,
                            text,
                            logprobs: lp.map(|lp| {
                                let mut l = CompletionLogprobs::default();
                                l.push(&r.st, token, &lp, offset);
                                l
                            }),
                            finish_reason: None,
                        },
                    ),
                };
                self.pending.push_back(chunk);
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
                if let (0, Some(reply)) = (index, self.reply.as_mut()) {
                    reply.raw.push_str(&text);
                }
                let Piece {
                    reasoning,
                    content: text,
                    calls,
                } = take(self.parsers.get_mut(index), text, true);
                if index == 0 {
                    record(self.reply.as_mut(), reasoning.as_deref(), &text, &calls);
                    if let Some(reply) = self.reply.take() {
                        r.warm_next_turn(reason, reply);
                    }
                }
                let tool_calls = stream_calls(self.parsers.get(index), calls);
                let reason = Some(choice_finish(reason, self.parsers.get(index)));
                let chunk = match r.api {
                    Api::Chat => r.chunk(
                        self.include_usage,
                        ChatDeltaChoice {
                            index,
                            delta: Delta {
                                role: None,
                                content: (!text.is_empty()).then_some(text),
                                reasoning_content: reasoning,
                                tool_calls,
                            },
                            logprobs: None,
                            finish_reason: reason,
                        },
                    ),
                    Api::Completion => r.chunk(
                        self.include_usage,
                        TextChoice {
                            index,
                            text,
                            logprobs: None,
                            finish_reason: reason,
                        },
                    ),
                };
                self.pending.push_back(chunk);
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
                let totals = r.usage_out(&self.usage, &self.parsers);
                let v = r.envelope::<TextChoice>(true, Vec::new(), Some(Some(totals)));
                self.pending.push_back(to_json(&v));
            }
            self.pending.push_back("[DONE]".into());
            self.finished = true;
        }
    }
}
