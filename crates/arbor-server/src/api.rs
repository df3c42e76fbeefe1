//! The OpenAI request bodies and their validation into engine parameters.
//!
//! A body is deserialized straight from its bytes into typed structs: the fields shared by
//! both endpoints ([`CommonFields`]) in one pass and the endpoint's own ([`ChatFields`],
//! [`CompletionFields`]) in a second; no `serde_json::Value` tree of the whole body is ever
//! built, and fields a struct does not name are skipped without allocating. Every list a client
//! controls has a bound that is enforced while it is read ([`BoundedVec`], [`StopField`],
//! [`PromptField`]), so an oversized field is refused before it is copied. serde_path_to_error
//! names the field of an error (`messages[1].role`), which becomes the error's `param`.
//! Unknown fields are ignored, as OpenAI's clients send fields a server may not know.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use arbor_engine::{SamplingParams, StopConditions};
use serde::de::{self, DeserializeOwned, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ApiError;

/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes: the stop check's work per token grows with it.
pub const MAX_STOP_STRING_BYTES: usize = 256;
/// Most extra stop token ids per request.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// Most `logit_bias` entries (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// Parses a request body into `T` in one pass over its bytes: 400 "not valid JSON" for a
/// syntax error, else a 400 that names the offending field.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let not_json = |e: serde_json::Error| {
        ApiError::invalid(format!("The request body is not valid JSON: {e}"))
    };
    // Anything but an object is refused as such up front (a struct would otherwise read a
    // list's items as its fields and name `[0]`).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<IgnoredAny>(body) {
            Ok(_) => ApiError::invalid("The request body must be a JSON object."),
            Err(e) => not_json(e),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return not_json(inner);
        }
        let inner = inner.to_string();
        if path == "." && (inner.starts_with("invalid type") || inner.starts_with("invalid length"))
        {
            return ApiError::invalid("The request body must be a JSON object.");
        }
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
        // serde_json appends " at line L column C": the field name says where.
        let inner = match inner.rfind(" at line ") {
            Some(i) => inner[..i].to_string(),
            None => inner,
        };
        ApiError::invalid_param(
            param.clone(),
            format!("Invalid value for `{param}`: {inner}"),
        )
    })?;
    // Anything after the object is malformed JSON too.
    de.end().map_err(not_json)?;
    Ok(value)
}

/// A JSON list of at most `N` items; one more is refused while reading, before it is stored.
#[derive(Debug, Clone)]
pub struct BoundedVec<T, const N: usize>(pub Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = BoundedVec<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N));
                while let Some(item) = seq.next_element()? {
                    if out.len() == N {
                        return Err(de::Error::custom(format!(
                            "at most {N} entries are allowed"
                        )));
                    }
                    out.push(item);
                }
                Ok(BoundedVec(out))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// A JSON object of at most `N` entries, as (key, value) pairs in body order.
#[derive(Debug, Clone)]
pub struct BoundedMap<V, const N: usize>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedMap<V, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V, const N: usize>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>, const N: usize> Visitor<'de> for Vis<V, N> {
            type Value = BoundedMap<V, N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an object of at most {N} entries")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry()? {
                    if out.len() == N {
                        return Err(de::Error::custom(format!(
                            "at most {N} entries are allowed"
                        )));
                    }
                    out.push((k, v));
                }
                Ok(BoundedMap(out))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

/// One stop string, refused while reading when it is empty or longer than
/// [`MAX_STOP_STRING_BYTES`].
struct StopString(String);

impl<'de> Deserialize<'de> for StopString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StopString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a non-empty string of at most {MAX_STOP_STRING_BYTES} bytes"
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StopString, E> {
                if v.is_empty() {
                    return Err(E::custom("stop strings must not be empty"));
                }
                if v.len() > MAX_STOP_STRING_BYTES {
                    return Err(E::custom(format!(
                        "a stop string is {} bytes long; the limit is {MAX_STOP_STRING_BYTES}",
                        v.len()
                    )));
                }
                Ok(StopString(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

/// `stop`: a string or a list of at most [`MAX_STOP_STRINGS`] strings.
#[derive(Debug, Clone, Default)]
pub struct StopField(pub Vec<String>);

impl<'de> Deserialize<'de> for StopField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StopField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StopField, E> {
                let StopString(s) = StopString::deserialize(de::value::StrDeserializer::new(v))?;
                Ok(StopField(vec![s]))
            }
            fn visit_unit<E: de::Error>(self) -> Result<StopField, E> {
                Ok(StopField(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<StopField, A::Error> {
                let items: BoundedVec<StopString, MAX_STOP_STRINGS> =
                    Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(StopField(items.0.into_iter().map(|s| s.0).collect()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A chat message's content: a string, or text parts.
#[derive(Debug, Clone)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub text: Option<String>,
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessageContent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of text parts")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<MessageContent, A::Error> {
                Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(MessageContent::Parts)
            }
        }
        d.deserialize_any(V)
    }
}

/// `response_format`: `text`, `json_object`, or `json_schema` with the schema.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

/// What a reply must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    JsonSchema(serde_json::Value),
    /// Text matching a regular expression (vLLM's `structured_outputs.regex`).
    Regex(String),
    /// Text of a Lark grammar, as llguidance reads it (`structured_outputs.grammar`).
    Grammar(String),
    /// Exactly one of these strings (`structured_outputs.choice`).
    Choice(Vec<String>),
}

impl OutputFormat {
    /// The request field that asked for it, for errors.
    pub fn field(&self) -> &'static str {
        match self {
            OutputFormat::Text | OutputFormat::JsonObject | OutputFormat::JsonSchema(_) => {
                "response_format"
            }
            OutputFormat::Regex(_) => "structured_outputs.regex",
            OutputFormat::Grammar(_) => "structured_outputs.grammar",
            OutputFormat::Choice(_) => "structured_outputs.choice",
        }
    }
}

/// Most strings in a `choice` constraint.
pub const MAX_CHOICES: usize = 1024;

/// vLLM's `structured_outputs`: one of a JSON schema, a regular expression, a grammar or a
/// list of choices. The older flat names (`guided_json`, `guided_regex`, `guided_grammar`,
/// `guided_choice`) are read too.
#[derive(Debug, Default, Deserialize)]
pub struct StructuredOutputsIn {
    pub json: Option<serde_json::Value>,
    pub regex: Option<String>,
    pub grammar: Option<String>,
    pub choice: Option<BoundedVec<String, MAX_CHOICES>>,
}

/// A /v1/completions prompt as read: text, token ids, or lists of either (at most
/// [`MAX_N`] prompts). The first element of a list decides which kind of list it is.
#[derive(Debug, Clone)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One element of a `prompt` list, before the list's kind is known.
enum PromptItem {
    Text(String),
    Token(u32),
    Tokens(Vec<u32>),
}

fn token_id<E: de::Error>(v: i128) -> Result<u32, E> {
    u32::try_from(v).map_err(|_| E::custom("token ids must be non-negative integers below 2^32"))
}

/// A token id: a non-negative integer (not a float, not a string).
struct TokenId(u32);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TokenId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a token id (a non-negative integer)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TokenId, E> {
                token_id(v as i128).map(TokenId)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<TokenId, E> {
                token_id(v as i128).map(TokenId)
            }
        }
        d.deserialize_u64(V)
    }
}

fn token_list<'de, A: SeqAccess<'de>>(
    mut seq: A,
    first: Option<u32>,
) -> Result<Vec<u32>, A::Error> {
    let mut out: Vec<u32> = first.into_iter().collect();
    while let Some(TokenId(t)) = seq.next_element()? {
        out.push(t);
    }
    Ok(out)
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a token id or a list of token ids")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
                token_id(v as i128).map(PromptItem::Token)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
                token_id(v as i128).map(PromptItem::Token)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PromptItem, A::Error> {
                token_list(seq, None).map(PromptItem::Tokens)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for PromptField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a string, a list of strings, a list of token ids or a list of token-id lists",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptField, E> {
                Ok(PromptField::Text(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PromptField, A::Error> {
                let too_many = || {
                    de::Error::custom(format!("at most {MAX_N} prompts are allowed per request"))
                };
                match seq.next_element::<PromptItem>()? {
                    None => Err(de::Error::custom("`prompt` is an empty list")),
                    Some(PromptItem::Token(t)) => token_list(seq, Some(t)).map(PromptField::Tokens),
                    Some(PromptItem::Text(first)) => {
                        let mut out = vec![first];
                        while let Some(s) = seq.next_element::<String>()? {
                            if out.len() == MAX_N {
                                return Err(too_many());
                            }
                            out.push(s);
                        }
                        Ok(PromptField::Texts(out))
                    }
                    Some(PromptItem::Tokens(first)) => {
                        struct List(Vec<u32>);
                        impl<'de> Deserialize<'de> for List {
                            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                                let v: Vec<TokenId> = Deserialize::deserialize(d)?;
                                Ok(List(v.into_iter().map(|t| t.0).collect()))
                            }
                        }
                        let mut out = vec![first];
                        while let Some(List(l)) = seq.next_element()? {
                            if out.len() == MAX_N {
                                return Err(too_many());
                            }
                            out.push(l);
                        }
                        Ok(PromptField::TokenLists(out))
                    }
                }
            }
        }
        d.deserialize_any(V)
    }
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
    pub stop: Option<StopField>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<BoundedMap<f64, MAX_LOGIT_BIAS>>,
    pub user: Option<String>,
    pub best_of: Option<i64>,
    // Serving extensions (vLLM's names).
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<BoundedVec<u32, MAX_STOP_TOKEN_IDS>>,
    /// Narrows the request's prefix-cache namespace (vLLM's field).
    pub cache_salt: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    /// An assistant turn's calls (OpenAI's shape; arguments as JSON text).
    pub tool_calls: Option<BoundedVec<ToolCallIn, MAX_TOOLS>>,
    /// A tool result: the call it answers.
    pub tool_call_id: Option<String>,
    /// An assistant turn's reasoning, sent back (`reasoning` is vLLM's newer name).
    #[serde(alias = "reasoning")]
    pub reasoning_content: Option<String>,
}

/// A tool call in an earlier assistant turn.
#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: ToolCallFunctionIn,
}

#[derive(Debug, Deserialize)]
pub struct ToolCallFunctionIn {
    pub name: String,
    pub arguments: String,
}

/// A tool the model may call: `{"type": "function", "function": {...}}`.
#[derive(Debug, Deserialize, Serialize)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionIn,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct FunctionIn {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or a named function.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Debug, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

/// What a request asks of tools, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No call is parsed (the tools are still shown to the model, so the prompt, and its
    /// cached prefix, is the same as with `auto`).
    None,
    Auto,
    Required,
    Named(String),
}

/// Most tools per request (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

#[derive(Debug, Default, Deserialize)]
pub struct ChatFields {
    pub messages: Vec<MessageIn>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<BoundedVec<ToolIn, MAX_TOOLS>>,
    pub tool_choice: Option<ToolChoiceIn>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormat>,
    pub structured_outputs: Option<StructuredOutputsIn>,
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_grammar: Option<String>,
    pub guided_choice: Option<BoundedVec<String, MAX_CHOICES>>,
    /// Default true; false renders the conversation without opening an assistant turn.
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionFields {
    pub prompt: PromptField,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
}

/// Roles a chat message may have; the model's template decides which it renders.
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
/// Most alternatives per token for logprobs (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most choices per request, and most prompts per /v1/completions request.
pub const MAX_N: usize = 128;

impl ChatFields {
    /// The conversation as (role, text) pairs for the chat template.
    pub fn messages(&self) -> Result<Vec<arbor_model::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` must contain at least one message.",
            ));
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
                if m.tool_calls.is_some() && m.role != "assistant" {
                    return Err(ApiError::invalid_param(
                        format!("messages[{i}].tool_calls"),
                        format!(
                            "messages[{i}] has tool_calls, which only assistant messages may have."
                        ),
                    ));
                }
                // Templates written before the "developer" role know it as "system".
                let role = if m.role == "developer" {
                    "system"
                } else {
                    &m.role
                };
                let mut msg = arbor_model::ChatMessage::new(role, content.unwrap_or_default());
                msg.tool_calls = m
                    .tool_calls
                    .as_ref()
                    .map(|calls| template_tool_calls(&calls.0));
                msg.tool_call_id = m.tool_call_id.clone();
                msg.name = m.name.clone();
                msg.reasoning_content = m
                    .reasoning_content
                    .clone()
                    .filter(|_| m.role == "assistant");
                Ok(msg)
            })
            .collect()
    }

    /// The tools for the template (OpenAI's list as sent, validated) and what the request
    /// asks of them.
    pub fn tools(&self) -> Result<(Option<serde_json::Value>, ToolChoice), ApiError> {
        let tools: &[ToolIn] = self.tools.as_ref().map_or(&[], |t| &t.0);
        let mut names = std::collections::HashSet::new();
        for (i, t) in tools.iter().enumerate() {
            if t.kind != "function" {
                return Err(ApiError::invalid_param(
                    format!("tools[{i}].type"),
                    format!(
                        "tools[{i}] has type `{}`; only `function` tools exist.",
                        t.kind
                    ),
                ));
            }
            let name = &t.function.name;
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
            if !valid {
                return Err(ApiError::invalid_param(
                    format!("tools[{i}].function.name"),
                    format!(
                        "tools[{i}].function.name {name:?} must be 1 to 64 letters, digits, `_`, `-` or `.`."
                    ),
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(ApiError::invalid_param(
                    format!("tools[{i}].function.name"),
                    format!("Two tools are named {name:?}."),
                ));
            }
            if let Some(p) = &t.function.parameters {
                if !p.is_object() {
                    return Err(ApiError::invalid_param(
                        format!("tools[{i}].function.parameters"),
                        format!("tools[{i}].function.parameters must be a JSON Schema object."),
                    ));
                }
            }
        }
        let choice = match &self.tool_choice {
            None => ToolChoice::Auto,
            Some(ToolChoiceIn::Mode(m)) => match m.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid_param(
                        "tool_choice",
                        format!("tool_choice is `none`, `auto`, `required` or a named function, not {other:?}."),
                    ))
                }
            },
            Some(ToolChoiceIn::Named { kind, function }) => {
                if kind != "function" {
                    return Err(ApiError::invalid_param(
                        "tool_choice.type",
                        format!("tool_choice.type must be `function`, not {kind:?}."),
                    ));
                }
                if !names.contains(function.name.as_str()) {
                    return Err(ApiError::invalid_param(
                        "tool_choice.function.name",
                        format!("tool_choice names {:?}, which is not in `tools`.", function.name),
                    ));
                }
                ToolChoice::Named(function.name.clone())
            }
        };
        if tools.is_empty() {
            if matches!(choice, ToolChoice::Required) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    "tool_choice `required` needs `tools`.",
                ));
            }
            return Ok((None, ToolChoice::None));
        }
        let list = serde_json::to_value(tools).expect("tools serialize");
        Ok((Some(list), choice))
    }

    /// The reply format asked for in `response_format` or `structured_outputs` (or the
    /// `guided_*` fields); asking in more than one place is refused.
    pub fn output_format(&self) -> Result<OutputFormat, ApiError> {
        let so = self.structured_outputs.as_ref();
        let schema_format = |s: &serde_json::Value, field: &str| {
            if s.is_object() || s.is_boolean() {
                Ok(OutputFormat::JsonSchema(s.clone()))
            } else {
                Err(ApiError::invalid_param(
                    field,
                    format!("{field} must be a JSON Schema (an object)."),
                ))
            }
        };
        let mut asked: Vec<(&str, OutputFormat)> = Vec::new();
        if let Some(s) = so.and_then(|s| s.json.as_ref()) {
            asked.push((
                "structured_outputs.json",
                schema_format(s, "structured_outputs.json")?,
            ));
        }
        if let Some(s) = &self.guided_json {
            asked.push(("guided_json", schema_format(s, "guided_json")?));
        }
        for (field, regex) in [
            (
                "structured_outputs.regex",
                so.and_then(|s| s.regex.as_ref()),
            ),
            ("guided_regex", self.guided_regex.as_ref()),
        ] {
            if let Some(r) = regex {
                asked.push((field, OutputFormat::Regex(r.clone())));
            }
        }
        for (field, grammar) in [
            (
                "structured_outputs.grammar",
                so.and_then(|s| s.grammar.as_ref()),
            ),
            ("guided_grammar", self.guided_grammar.as_ref()),
        ] {
            if let Some(g) = grammar {
                asked.push((field, OutputFormat::Grammar(g.clone())));
            }
        }
        for (field, choice) in [
            (
                "structured_outputs.choice",
                so.and_then(|s| s.choice.as_ref()),
            ),
            ("guided_choice", self.guided_choice.as_ref()),
        ] {
            if let Some(c) = choice {
                if c.0.is_empty() {
                    return Err(ApiError::invalid_param(
                        field,
                        format!("{field} must list at least one string."),
                    ));
                }
                asked.push((field, OutputFormat::Choice(c.0.clone())));
            }
        }
        let response_format = self.response_format_only()?;
        if response_format != OutputFormat::Text {
            asked.push(("response_format", response_format));
        }
        match asked.len() {
            0 => Ok(OutputFormat::Text),
            1 => Ok(asked.pop().expect("one").1),
            _ => Err(ApiError::invalid_param(
                asked[1].0,
                format!(
                    "Only one output constraint may be given; this request has {}.",
                    asked.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    fn response_format_only(&self) -> Result<OutputFormat, ApiError> {
        let Some(rf) = &self.response_format else {
            return Ok(OutputFormat::Text);
        };
        match rf.kind.as_deref() {
            Some("text") => Ok(OutputFormat::Text),
            Some("json_object") => Ok(OutputFormat::JsonObject),
            Some("json_schema") => {
                let schema = rf.json_schema.as_ref().and_then(|j| j.schema.clone());
                match schema {
                    Some(s) if s.is_object() || s.is_boolean() => Ok(OutputFormat::JsonSchema(s)),
                    Some(_) => Err(ApiError::invalid_param(
                        "response_format.json_schema.schema",
                        "response_format.json_schema.schema must be a JSON Schema (an object).",
                    )),
                    None => Err(ApiError::invalid_param(
                        "response_format.json_schema",
                        "response_format type `json_schema` needs `json_schema.schema`.",
                    )),
                }
            }
            other => Err(ApiError::invalid_param(
                "response_format.type",
                format!(
                    "response_format.type is `text`, `json_object` or `json_schema`, not {:?}.",
                    other.unwrap_or("")
                ),
            )),
        }
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

/// Earlier calls as templates read them: arguments as a JSON object where they parse as one
/// (templates write `arguments | tojson`), as sent otherwise.
fn template_tool_calls(calls: &[ToolCallIn]) -> serde_json::Value {
    calls
        .iter()
        .map(|c| {
            template_tool_call(
                c.id.as_deref(),
                c.kind.as_deref().unwrap_or("function"),
                &c.function.name,
                &c.function.arguments,
            )
        })
        .collect()
}

/// One call as templates read it: arguments as an object when they are one (templates write
/// them with `tojson`), as the text sent otherwise.
pub(crate) fn template_tool_call(
    id: Option<&str>,
    kind: &str,
    name: &str,
    arguments: &str,
) -> serde_json::Value {
    let args = serde_json::from_str::<serde_json::Value>(arguments)
        .ok()
        .filter(|v| v.is_object())
        .unwrap_or_else(|| serde_json::Value::String(arguments.to_string()));
    serde_json::json!({
        "id": id,
        "type": kind,
        "function": {"name": name, "arguments": args},
    })
}

/// A message's text: a string, or the concatenated text of its text parts.
fn message_text(content: Option<&MessageContent>, i: usize) -> Result<Option<String>, ApiError> {
    match content {
        None => Ok(None),
        Some(MessageContent::Text(s)) => Ok(Some(s.clone())),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_deref(), part.text.as_deref()) {
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
        let prompts = match &self.prompt {
            PromptField::Text(s) => vec![PromptIn::Text(s.clone())],
            PromptField::Texts(v) => v.iter().cloned().map(PromptIn::Text).collect(),
            PromptField::Tokens(t) => vec![PromptIn::Tokens(t.clone())],
            PromptField::TokenLists(v) => v.iter().cloned().map(PromptIn::Tokens).collect(),
        };
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
    /// Structured output (set from `response_format` by the chat endpoint).
    pub constraint: Option<Arc<dyn arbor_engine::ConstraintFactory>>,
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
        for (k, v) in self.logit_bias.iter().flat_map(|m| &m.0) {
            let v = *v;
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
            .flat_map(|v| &v.0)
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
            logit_bias: logit_bias.into(),
        };
        Ok(Generation {
            sampling,
            stop: StopConditions {
                max_tokens: max_tokens.unwrap_or(0),
                min_tokens,
                stop_token_ids: self
                    .stop_token_ids
                    .as_ref()
                    .map_or_else(|| Arc::new([]) as Arc<[u32]>, |v| v.0.as_slice().into()),
                stop_strings: self
                    .stop
                    .as_ref()
                    .map_or_else(|| Arc::new([]) as Arc<[String]>, |s| s.0.as_slice().into()),
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
            constraint: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
        parse_body(v.to_string().as_bytes())
    }

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
    fn bodies_that_are_not_json_objects_are_refused_as_such() {
        let deep = "[".repeat(100_000);
        for body in [
            &b"{"[..],
            b"nul",
            b"{\"a\": 1} trailing",
            b"\xff\xfe",
            b"",
            deep.as_bytes(),
        ] {
            let e = parse_body::<CommonFields>(body).unwrap_err();
            assert!(e.message.contains("not valid JSON"), "{e}");
            assert_eq!(e.param, None);
        }
        for body in [&b"[]"[..], b"3", b"\"x\"", b"null"] {
            let e = parse_body::<CommonFields>(body).unwrap_err();
            assert!(e.message.contains("must be a JSON object"), "{e}");
        }
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
            (json!({"stop": ["a", 1]}), "stop[1]"),
            (json!({"stop": ""}), "stop"),
            (json!({"stop": 5}), "stop"),
            (json!({"logit_bias": {"5000": 1}}), "logit_bias"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias"),
            (json!({"stop_token_ids": [1, -1]}), "stop_token_ids[1]"),
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

    /// Every client-sized list has a bound that is checked while reading, and the error names
    /// the field and the limit.
    #[test]
    fn oversized_fields_are_refused_with_their_limit() {
        let long_stop = "x".repeat(MAX_STOP_STRING_BYTES + 1);
        let many_stops: Vec<String> = (0..=MAX_STOP_STRINGS).map(|i| format!("s{i}")).collect();
        let many_ids: Vec<u32> = (0..=MAX_STOP_TOKEN_IDS as u32).collect();
        let many_bias: serde_json::Map<String, Value> = (0..=MAX_LOGIT_BIAS)
            .map(|i| (i.to_string(), json!(1)))
            .collect();
        for (body, param, limit) in [
            (json!({"stop": long_stop}), "stop", MAX_STOP_STRING_BYTES),
            (
                json!({"stop": ["ok", long_stop]}),
                "stop[1]",
                MAX_STOP_STRING_BYTES,
            ),
            (json!({"stop": many_stops}), "stop", MAX_STOP_STRINGS),
            (
                json!({"stop_token_ids": many_ids}),
                "stop_token_ids",
                MAX_STOP_TOKEN_IDS,
            ),
            (
                json!({"logit_bias": many_bias}),
                "logit_bias",
                MAX_LOGIT_BIAS,
            ),
        ] {
            let e = parse::<CommonFields>(&body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{e}");
            assert!(e.message.contains(&limit.to_string()), "{e}");
            assert_eq!(e.status.as_u16(), 400);
        }
        // At the limits, accepted.
        let at_limit: Vec<String> = (0..MAX_STOP_STRINGS)
            .map(|_| "y".repeat(MAX_STOP_STRING_BYTES))
            .collect();
        let g = common(json!({"stop": at_limit})).unwrap();
        assert_eq!(g.stop.stop_strings.len(), MAX_STOP_STRINGS);
        let prompts: Vec<&str> = vec!["p"; MAX_N + 1];
        let e = parse::<CompletionFields>(&json!({ "prompt": prompts })).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"), "{e}");
        assert!(e.message.contains(&MAX_N.to_string()), "{e}");
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
        assert_eq!(&g.sampling.logit_bias[..], &[(3, -100.0)]);
        assert_eq!(&g.stop.stop_strings[..], &["END".to_string()]);
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
            let e = parse::<ChatFields>(&json!({ "messages": bad }))
                .and_then(|f| f.messages())
                .unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{e}");
        }
    }

    #[test]
    fn completion_prompts_in_every_shape() {
        let p = |v: Value| parse::<CompletionFields>(&json!({ "prompt": v }))?.prompts();
        assert!(matches!(&p(json!("hi")).unwrap()[..], [PromptIn::Text(_)]));
        assert_eq!(p(json!(["a", "b"])).unwrap().len(), 2);
        assert!(matches!(&p(json!([1, 2, 3])).unwrap()[..], [PromptIn::Tokens(t)] if t.len() == 3));
        assert_eq!(p(json!([[1], [2, 3]])).unwrap().len(), 2);
        for bad in [
            json!([]),
            json!([1, -2]),
            json!([1, 2.5]),
            json!({"a": 1}),
            json!(["a", 1]),
            json!([1, "a"]),
            json!([[1], 2]),
            json!([[1, 4294967296u64]]),
        ] {
            let e = p(bad.clone()).unwrap_err();
            assert!(
                e.param.as_deref().is_some_and(|p| p.starts_with("prompt")),
                "{bad}: {e}"
            );
        }
    }
}
