//! OpenAI's wire format for what the engine produces, as typed structs shared by the
//! non-streaming and the streaming paths: the response envelope, the choices of both
//! endpoints (whole messages and stream deltas), finish reasons, usage, and log-probabilities
//! with each token's bytes (`Tokenizer::token_bytes`).

use std::collections::BTreeMap;

use arbor_engine::{FinishReason, TokenLogprob, Usage};
use serde::Serialize;

use crate::AppState;

/// A response body or a stream chunk: `choices` is a list of [`ChatChoice`],
/// [`ChatDeltaChoice`] or [`TextChoice`].
#[derive(Debug, Serialize)]
pub(crate) struct Envelope<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    /// Always null: Arbor has no fingerprint to report.
    pub system_fingerprint: Option<&'static str>,
    pub choices: Vec<C>,
    /// Absent (`None`), null (`Some(None)`: stream chunks when usage was asked for) or the
    /// totals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatMessageOut {
    pub role: &'static str,
    /// Null only when a reasoning model's reply had no answer after its reasoning.
    pub content: Option<String>,
    /// With a reasoning parser: what the model wrote inside its think block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The calls parsed from the reply (absent when there are none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// A tool call in OpenAI's shape; in a stream delta, `index` numbers it within its choice.
#[derive(Debug, Serialize)]
pub(crate) struct ToolCallOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

#[derive(Debug, Serialize)]
pub(crate) struct FunctionCallOut {
    pub name: String,
    pub arguments: String,
}

impl ToolCallOut {
    /// The call itself, as parsed.
    pub(crate) fn to_call(&self) -> crate::tools::ToolCall {
        crate::tools::ToolCall {
            id: self.id.clone(),
            name: self.function.name.clone(),
            arguments: self.function.arguments.clone(),
        }
    }

    pub(crate) fn new(call: crate::tools::ToolCall, index: Option<usize>) -> Self {
        Self {
            index,
            id: call.id,
            kind: "function",
            function: FunctionCallOut {
                name: call.name,
                arguments: call.arguments,
            },
        }
    }
}

/// A whole chat choice (`chat.completion`).
#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// What a chat stream chunk adds to its choice.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// A chat stream chunk's choice (`chat.completion.chunk`).
#[derive(Debug, Serialize)]
pub(crate) struct ChatDeltaChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A completions choice, whole or a stream chunk's piece (`text_completion` both).
#[derive(Debug, Serialize)]
pub(crate) struct TextChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub(crate) struct CachedTokens {
    pub cached_tokens: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct ReasoningTokens {
    pub reasoning_tokens: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: CachedTokens,
    /// With a reasoning parser: the completion tokens spent reasoning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<ReasoningTokens>,
    /// Arbor's extension on chat calls: where the prompt left the prefix cache, when it did
    /// before its last token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_cache_miss: Option<crate::history::CacheMiss>,
}

impl UsageOut {
    pub(crate) fn with_reasoning(mut self, reasoning_tokens: Option<usize>) -> Self {
        self.completion_tokens_details =
            reasoning_tokens.map(|reasoning_tokens| ReasoningTokens { reasoning_tokens });
        self
    }
}

impl From<&Usage> for UsageOut {
    fn from(u: &Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: CachedTokens {
                cached_tokens: u.cached_tokens,
            },
            completion_tokens_details: None,
            prompt_cache_miss: None,
        }
    }
}

pub(crate) fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // Only seen by clients still connected: the server ended the request (shutdown).
        FinishReason::Cancelled => "abort",
        // Reported as an error before it gets here; never sent as a finish reason.
        FinishReason::Error => "error",
    }
}

fn token_bytes(st: &AppState, id: u32) -> Vec<u8> {
    st.tokenizer.token_bytes(id)
}

pub(crate) fn token_string(st: &AppState, id: u32) -> String {
    String::from_utf8_lossy(&token_bytes(st, id)).into_owned()
}

/// One token in chat logprobs (the chosen one or an alternative). Log-probabilities go out
/// as f64, the value the engine computed, widened.
#[derive(Debug, Serialize)]
pub(crate) struct TokenEntry {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

impl TokenEntry {
    fn new(st: &AppState, id: u32, logprob: f32) -> Self {
        let bytes = token_bytes(st, id);
        Self {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            logprob: f64::from(logprob),
            bytes,
        }
    }
}

/// Chat logprobs entry: the token, its logprob and bytes, and the top alternatives.
#[derive(Debug, Serialize)]
pub(crate) struct ChatLogprob {
    #[serde(flatten)]
    pub entry: TokenEntry,
    pub top_logprobs: Vec<TokenEntry>,
}

/// A chat choice's `logprobs`: `{"content": [...]}`.
#[derive(Debug, Default, Serialize)]
pub(crate) struct ChatLogprobs {
    pub content: Vec<ChatLogprob>,
}

pub(crate) fn chat_logprob(st: &AppState, token: u32, lp: &TokenLogprob) -> ChatLogprob {
    ChatLogprob {
        entry: TokenEntry::new(st, token, lp.logprob),
        top_logprobs: lp
            .top
            .iter()
            .map(|&(t, l)| TokenEntry::new(st, t, l))
            .collect(),
    }
}

/// Legacy completions logprobs: parallel lists.
#[derive(Debug, Default, Serialize)]
pub(crate) struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f64>,
    top_logprobs: Vec<BTreeMap<String, f64>>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub(crate) fn push(&mut self, st: &AppState, token: u32, lp: &TokenLogprob, offset: usize) {
        self.tokens.push(token_string(st, token));
        self.token_logprobs.push(f64::from(lp.logprob));
        self.top_logprobs.push(
            lp.top
                .iter()
                .map(|&(t, l)| (token_string(st, t), f64::from(l)))
                .collect(),
        );
        self.text_offset.push(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chunk(usage: Option<Option<UsageOut>>) -> serde_json::Value {
        let e = Envelope {
            id: "chatcmpl-1",
            object: "chat.completion.chunk",
            created: 7,
            model: "m",
            system_fingerprint: None,
            choices: vec![ChatDeltaChoice {
                index: 0,
                delta: Delta::default(),
                logprobs: None,
                finish_reason: Some("stop"),
            }],
            usage,
        };
        serde_json::to_value(&e).unwrap()
    }

    #[test]
    fn chunks_keep_openai_shapes() {
        let v = chunk(None);
        assert_eq!(
            v["choices"][0]["delta"],
            json!({}),
            "an empty delta is {{}}"
        );
        assert!(v["choices"][0]["logprobs"].is_null());
        assert!(v["system_fingerprint"].is_null());
        assert!(v.get("usage").is_none(), "no usage field unless asked for");
        assert!(
            chunk(Some(None))["usage"].is_null(),
            "null until the usage chunk"
        );
        let u = Usage {
            prompt_tokens: 10,
            completion_tokens: 3,
            cached_tokens: 4,
        };
        assert_eq!(
            chunk(Some(Some(UsageOut::from(&u))))["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                   "prompt_tokens_details": {"cached_tokens": 4}})
        );
        assert_eq!(
            chunk(Some(Some(UsageOut::from(&u).with_reasoning(Some(2)))))["usage"]
                ["completion_tokens_details"],
            json!({"reasoning_tokens": 2})
        );
        let first = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(first).unwrap(),
            json!({"role": "assistant", "content": ""})
        );
    }
}
