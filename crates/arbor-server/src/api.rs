//! The OpenAI request bodies and their validation into engine parameters.
//!
//! A body is parsed once into a `serde_json::Value` (malformed JSON is a 400 of its own), then
//! into the typed fields shared by both endpoints ([`CommonFields`]) and the endpoint's own
//! ([`ChatFields`], [`CompletionFields`]). serde_path_to_error names the field of a type error
//! (`messages[1].role`), which becomes the error's `param`. Unknown fields are ignored, as
//! OpenAI's clients send fields a server may not know.

use std::collections::HashMap;

use arbor_engine::{SamplingParams, StopConditions};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Parses a request body into `T`, naming the offending field on a type error.
pub fn parse<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // "missing field `messages`" is reported at the parent: name the field itself.
        let param = match inner.strip_prefix("missing field `") {
            Some(rest) => {
                let field = rest.split('`').next().unwrap_or_default();
                if path == "." {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                }
            }
            None => path.clone(),
        };
        ApiError::invalid_param(
            param.clone(),
            format!("Invalid value for `{param}`: {inner}"),
        )
    })
}

/// The body as JSON, or a 400 that says where it broke.
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("The request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("The request body must be a JSON object."));
    }
    Ok(v)
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Fields both /v1/chat/completions and /v1/completions take.
#[derive(Debug, Default, Deserialize)]
pub struct CommonFields {
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stop: Option<Value>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub user: Option<String>,
    pub best_of: Option<i64>,
    // Serving extensions (vLLM's names).
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<Vec<u32>>,
    /// Narrows the request's prefix-cache namespace (vLLM's field).
    pub cache_salt: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Option<Value>,
    pub name: Option<String>,
    pub tool_calls: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatFields {
    pub messages: Vec<MessageIn>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub response_format: Option<Value>,
    /// Default true; false renders the conversation without opening an assistant turn.
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionFields {
    pub prompt: Value,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
}

/// Roles a chat message may have; the model's template decides which it renders.
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
/// Most alternatives per token for logprobs (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most choices per request.
pub const MAX_N: usize = 128;
/// Most stop strings per request.
const MAX_STOP_STRINGS: usize = 16;

impl ChatFields {
    /// The conversation as (role, text) pairs for the chat template.
    pub fn messages(&self) -> Result<Vec<arbor_model::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` must contain at least one message.",
            ));
        }
        if let Some(tools) = &self.tools {
            if !tools.is_empty() {
                return Err(ApiError::invalid_param(
                    "tools",
                    "Tool calling is not supported by this server.",
                ));
            }
        }
        if let Some(rf) = &self.response_format {
            let kind = rf.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "text" {
                return Err(ApiError::invalid_param(
                    "response_format",
                    format!("response_format type `{kind}` is not supported; only `text` is."),
                ));
            }
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(ApiError::invalid_param(
                        format!("messages[{i}].role"),
                        format!(
                            "Invalid role `{}` in messages[{i}]; expected one of {}.",
                            m.role,
                            ROLES.join(", ")
                        ),
                    ));
                }
                let content = message_text(m.content.as_ref(), i)?;
                if content.is_none() && !(m.role == "assistant" && m.tool_calls.is_some()) {
                    return Err(ApiError::invalid_param(
                        format!("messages[{i}].content"),
                        format!("messages[{i}] has no content."),
                    ));
                }
                // Templates written before the "developer" role know it as "system".
                let role = if m.role == "developer" {
                    "system"
                } else {
                    &m.role
                };
                Ok(arbor_model::ChatMessage::new(
                    role,
                    content.unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// `top_logprobs` when `logprobs` is on.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = match self.top_logprobs {
            None => 0,
            Some(t) if (0..=MAX_TOP_LOGPROBS as i64).contains(&t) => t as usize,
            Some(t) => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {t}."),
                ))
            }
        };
        match self.logprobs {
            Some(true) => Ok(Some(top)),
            _ if self.top_logprobs.is_some_and(|t| t > 0) => Err(ApiError::invalid_param(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true.",
            )),
            _ => Ok(None),
        }
    }
}

/// A message's text: a string, or the concatenated text of its text parts.
fn message_text(content: Option<&Value>, i: usize) -> Result<Option<String>, ApiError> {
    let param = || format!("messages[{i}].content");
    match content {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some("text"), None) => {
                        return Err(ApiError::invalid_param(
                            format!("messages[{i}].content[{j}].text"),
                            format!("messages[{i}].content[{j}] is a text part without `text`."),
                        ))
                    }
                    (Some(other), _) => {
                        return Err(ApiError::invalid_param(
                            format!("messages[{i}].content[{j}].type"),
                            format!("Content parts of type `{other}` are not supported: this model reads text only."),
                        ))
                    }
                    (None, _) => {
                        return Err(ApiError::invalid_param(
                            format!("messages[{i}].content[{j}]"),
                            "A content part needs a `type`.",
                        ))
                    }
                }
            }
            Ok(Some(text))
        }
        Some(other) => Err(ApiError::invalid_param(
            param(),
            format!(
                "messages[{i}].content must be a string or a list of text parts, got {}.",
                json_kind(other)
            ),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A /v1/completions prompt: text, or token ids already.
#[derive(Debug, Clone)]
pub enum PromptIn {
    Text(String),
    Tokens(Vec<u32>),
}

impl CompletionFields {
    /// The prompts of the request (OpenAI takes a string, a list of strings, a list of token
    /// ids, or a list of such lists).
    pub fn prompts(&self) -> Result<Vec<PromptIn>, ApiError> {
        let bad = |m: String| ApiError::invalid_param("prompt", m);
        let as_tokens = |items: &[Value]| -> Option<Vec<u32>> {
            items
                .iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect()
        };
        let prompts = match &self.prompt {
            Value::String(s) => vec![PromptIn::Text(s.clone())],
            Value::Array(items) if items.is_empty() => {
                return Err(bad("`prompt` is an empty list.".into()))
            }
            Value::Array(items) if items.iter().all(Value::is_string) => items
                .iter()
                .map(|s| PromptIn::Text(s.as_str().unwrap_or_default().to_string()))
                .collect(),
            Value::Array(items) if items.iter().all(Value::is_number) => {
                vec![PromptIn::Tokens(as_tokens(items).ok_or_else(|| {
                    bad("Token ids in `prompt` must be non-negative integers.".into())
                })?)]
            }
            Value::Array(items) if items.iter().all(Value::is_array) => items
                .iter()
                .map(|p| {
                    as_tokens(p.as_array().map(Vec::as_slice).unwrap_or_default())
                        .map(PromptIn::Tokens)
                        .ok_or_else(|| {
                            bad("Token ids in `prompt` must be non-negative integers.".into())
                        })
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(bad(format!(
                    "`prompt` must be a string, a list of strings, a list of token ids or a list of token-id lists; got {}.",
                    json_kind(other)
                )))
            }
        };
        if prompts.len() > MAX_N {
            return Err(bad(format!("At most {MAX_N} prompts per request.")));
        }
        if let Some(s) = &self.suffix {
            if !s.is_empty() {
                return Err(ApiError::invalid_param(
                    "suffix",
                    "`suffix` (fill-in-the-middle) is not supported.",
                ));
            }
        }
        Ok(prompts)
    }

    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            None => Ok(None),
            Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Ok(Some(n as usize)),
            Some(n) => Err(ApiError::invalid_param(
                "logprobs",
                format!("`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {n}."),
            )),
        }
    }
}

/// What the sampling fields ask for, validated.
#[derive(Debug, Clone)]
pub struct Generation {
    pub sampling: SamplingParams,
    /// `max_tokens` unset: as many as the context leaves (filled in once the prompt is known).
    pub stop: StopConditions,
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

fn range_f32(name: &str, v: Option<f64>, lo: f64, hi: f64, default: f32) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x as f32),
        Some(x) => Err(ApiError::invalid_param(
            name,
            format!("`{name}` must be between {lo} and {hi}, got {x}."),
        )),
    }
}

impl CommonFields {
    /// Validates the sampling fields against the model's vocabulary size.
    pub fn generation(&self, vocab: usize) -> Result<Generation, ApiError> {
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        let max_tokens = match max_tokens {
            None => None,
            Some((_, m)) if m >= 1 => Some(m as usize),
            Some((name, m)) => {
                return Err(ApiError::invalid_param(
                    name,
                    format!("`{name}` must be at least 1, got {m}."),
                ))
            }
        };
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::invalid_param(
                    "n",
                    format!("`n` must be between 1 and {MAX_N}, got {n}."),
                ))
            }
        };
        if let Some(b) = self.best_of {
            if b != n as i64 {
                return Err(ApiError::invalid_param(
                    "best_of",
                    "`best_of` other than `n` is not supported.",
                ));
            }
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("`top_k` must be -1 (off) or positive, got {k}."),
                ))
            }
        };
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(m) if m >= 0 && max_tokens.is_none_or(|max| m as usize <= max) => m as usize,
            Some(m) => {
                return Err(ApiError::invalid_param(
                    "min_tokens",
                    format!("`min_tokens` must be between 0 and max_tokens, got {m}."),
                ))
            }
        };
        let mut logit_bias = Vec::new();
        for (k, &v) in self.logit_bias.iter().flatten() {
            let id = k.parse::<u32>().ok().filter(|&t| (t as usize) < vocab);
            let Some(id) = id else {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("`logit_bias` key `{k}` is not a token id below {vocab}."),
                ));
            };
            if !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("`logit_bias` values must be between -100 and 100, got {v}."),
                ));
            }
            logit_bias.push((id, v as f32));
        }
        logit_bias.sort_by_key(|b| b.0);
        if let Some(&bad) = self
            .stop_token_ids
            .iter()
            .flatten()
            .find(|&&t| t as usize >= vocab)
        {
            return Err(ApiError::invalid_param(
                "stop_token_ids",
                format!("Stop token {bad} is not below the vocabulary size {vocab}."),
            ));
        }
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid_param(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true.",
            ));
        }
        let sampling = SamplingParams {
            temperature: range_f32("temperature", self.temperature, 0.0, 2.0, 1.0)?,
            top_k,
            top_p: match self.top_p {
                Some(p) if !(p > 0.0 && p <= 1.0) => {
                    return Err(ApiError::invalid_param(
                        "top_p",
                        format!("`top_p` must be in (0, 1], got {p}."),
                    ))
                }
                p => p.unwrap_or(1.0) as f32,
            },
            min_p: range_f32("min_p", self.min_p, 0.0, 1.0, 0.0)?,
            repetition_penalty: match self.repetition_penalty {
                Some(r) if !(r.is_finite() && r > 0.0) => {
                    return Err(ApiError::invalid_param(
                        "repetition_penalty",
                        format!("`repetition_penalty` must be > 0, got {r}."),
                    ))
                }
                r => r.unwrap_or(1.0) as f32,
            },
            presence_penalty: range_f32("presence_penalty", self.presence_penalty, -2.0, 2.0, 0.0)?,
            frequency_penalty: range_f32(
                "frequency_penalty",
                self.frequency_penalty,
                -2.0,
                2.0,
                0.0,
            )?,
            seed: self.seed.map(|s| s as u64),
            logit_bias,
        };
        Ok(Generation {
            sampling,
            stop: StopConditions {
                max_tokens: max_tokens.unwrap_or(0),
                min_tokens,
                stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
                stop_strings: self.stop_strings()?,
                ignore_eos: self.ignore_eos.unwrap_or(false),
            },
            max_tokens,
            n,
            stream,
            include_usage: self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }

    fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let bad = |m: &str| ApiError::invalid_param("stop", m.to_string());
        let stops = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("`stop` must be a string or a list of strings."))?,
            Some(_) => return Err(bad("`stop` must be a string or a list of strings.")),
        };
        if stops.len() > MAX_STOP_STRINGS {
            return Err(bad(&format!(
                "At most {MAX_STOP_STRINGS} stop strings per request."
            )));
        }
        if stops.iter().any(String::is_empty) {
            return Err(bad("Stop strings must not be empty."));
        }
        Ok(stops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn common(v: Value) -> Result<Generation, ApiError> {
        parse::<CommonFields>(&v)?.generation(1000)
    }

    #[test]
    fn type_errors_name_the_field() {
        let e =
            parse::<ChatFields>(&json!({"messages": [{"role": 3, "content": "x"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"), "{e}");
        let e = parse::<ChatFields>(&json!({"model": "m"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{e}");
        let e = common(json!({"temperature": "hot"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for (body, param) in [
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"n": 0}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"max_completion_tokens": -3}),
                "max_completion_tokens",
            ),
            (json!({"presence_penalty": 2.1}), "presence_penalty"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"stop": ["a", 1]}), "stop"),
            (json!({"stop": ""}), "stop"),
            (json!({"logit_bias": {"5000": 1}}), "logit_bias"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (json!({"max_tokens": 4, "min_tokens": 5}), "min_tokens"),
        ] {
            let e = common(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
            assert_eq!(e.status.as_u16(), 400);
        }
    }

    #[test]
    fn defaults_and_extensions_map_onto_the_engine() {
        let g = common(json!({
            "max_completion_tokens": 7, "max_tokens": 99, "top_k": -1, "stop": "END",
            "seed": -1, "ignore_eos": true, "min_tokens": 2, "logit_bias": {"3": -100},
            "stream": true, "stream_options": {"include_usage": true}
        }))
        .unwrap();
        assert_eq!(g.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(g.sampling.top_k, 0);
        assert_eq!(g.sampling.temperature, 1.0, "OpenAI's default temperature");
        assert_eq!(g.sampling.logit_bias, vec![(3, -100.0)]);
        assert_eq!(g.stop.stop_strings, vec!["END".to_string()]);
        assert!(g.stop.ignore_eos && g.stream && g.include_usage);
        assert_eq!(g.stop.min_tokens, 2);
    }

    #[test]
    fn chat_content_parts_and_roles() {
        let f: ChatFields = parse(&json!({"messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "Hi"}
        ]}))
        .unwrap();
        let m = f.messages().unwrap();
        assert_eq!(m[0].role, "system");
        assert_eq!(m[0].content, "Be brief.");
        for (bad, param) in [
            (json!([]), "messages"),
            (
                json!([{"role": "wizard", "content": "x"}]),
                "messages[0].role",
            ),
            (json!([{"role": "user"}]), "messages[0].content"),
            (
                json!([{"role": "user", "content": 5}]),
                "messages[0].content",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                "messages[0].content[0].type",
            ),
        ] {
            let f: ChatFields = parse(&json!({ "messages": bad })).unwrap();
            let e = f.messages().unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{e}");
        }
    }

    #[test]
    fn completion_prompts_in_every_shape() {
        let p = |v: Value| {
            parse::<CompletionFields>(&json!({ "prompt": v }))
                .unwrap()
                .prompts()
        };
        assert!(matches!(&p(json!("hi")).unwrap()[..], [PromptIn::Text(_)]));
        assert_eq!(p(json!(["a", "b"])).unwrap().len(), 2);
        assert!(matches!(&p(json!([1, 2, 3])).unwrap()[..], [PromptIn::Tokens(t)] if t.len() == 3));
        assert_eq!(p(json!([[1], [2, 3]])).unwrap().len(), 2);
        assert!(p(json!([])).is_err());
        assert!(p(json!([1, -2])).is_err());
        assert!(p(json!({"a": 1})).is_err());
        assert!(p(json!(["a", 1])).is_err());
    }
}
