//! An OpenAI-compatible client for measuring: streams a chat completion and times it.
//!
//! Time to first token is taken at the first chunk with content; inter-token latencies
//! between content chunks. Token counts come from the stream's `usage` when the server sends
//! it (`stream_options.include_usage`); otherwise completion tokens are counted as content
//! chunks and prompt tokens through the target's tokenize endpoint, and marked so.
//! Every request has a deadline; a server that is down, slow, sends errors or malformed
//! streams gives a record with an `error`, never a hang or a panic.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad target `{0}`: expected NAME=URL[,key=KEY][,model=MODEL]")]
    BadTarget(String),
    #[error("{target}: cannot reach {url}: {reason}")]
    Unreachable {
        target: String,
        url: String,
        reason: String,
    },
    #[error("{target}: {url} answered {status}: {body}")]
    Status {
        target: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{target}: /v1/models lists no model; pass model=NAME in --target")]
    NoModel { target: String },
}

/// A server to measure: `NAME=URL[,key=KEY][,model=MODEL]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    /// Without the trailing `/v1`.
    pub base_url: String,
    #[serde(skip_serializing)]
    pub api_key: Option<String>,
    pub model: Option<String>,
}

impl Target {
    pub fn parse(spec: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::BadTarget(spec.to_string());
        let (name, rest) = spec.split_once('=').ok_or_else(bad)?;
        let mut parts = rest.split(',');
        let url = parts.next().filter(|u| !u.is_empty()).ok_or_else(bad)?;
        if name.is_empty() || !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad());
        }
        let mut target = Target {
            name: name.to_string(),
            base_url: url
                .trim_end_matches('/')
                .trim_end_matches("/v1")
                .to_string(),
            api_key: None,
            model: None,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("key", k)) => target.api_key = Some(k.to_string()),
                Some(("model", m)) => target.model = Some(m.to_string()),
                _ => return Err(bad()),
            }
        }
        Ok(target)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Where a token count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountSource {
    /// The server's `usage`.
    Usage,
    /// The target's tokenize endpoint, on the messages' text (no chat template).
    Tokenize,
    /// Content chunks (completion) or characters / 4 (prompt).
    Estimated,
}

/// One streamed request's measurements.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measured {
    /// Seconds from sending to the first content.
    pub ttft: Option<f64>,
    /// Seconds from sending to the end of the stream (or the error).
    pub e2e: f64,
    /// Seconds between consecutive content chunks.
    pub itl: Vec<f64>,
    #[serde(skip)]
    pub text: String,
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
    /// Prompt tokens served from the server's prefix cache, when it reports them.
    pub cached_tokens: Option<usize>,
    pub prompt_source: Option<CountSource>,
    pub completion_source: Option<CountSource>,
    pub content_chunks: usize,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
}

/// How a target counts tokens, found by probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenizeApi {
    /// vLLM, SGLang and Arbor: POST /tokenize {"model", "prompt"} -> {"count" | "tokens"}.
    Prompt,
    /// llama-cpp-python: POST /extras/tokenize/count {"input"} -> {"count"}.
    LlamaCppPython,
    /// llama.cpp's own server: POST /tokenize {"content"} -> {"tokens"}.
    Content,
    None,
}

pub struct Client {
    http: reqwest::Client,
    pub target: Target,
    pub model: String,
    timeout: Duration,
    tokenize: TokenizeApi,
}

/// Sampling of a measured request.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub max_tokens: usize,
    pub temperature: f32,
    /// Ask for exactly max_tokens (`ignore_eos` and `min_tokens`, which servers that know them
    /// honour), so engines are compared on equal work.
    pub ignore_eos: bool,
}

impl Client {
    /// Connects: lists the models (the first one is used unless the target names one) and
    /// finds how the target tokenizes.
    pub async fn connect(target: Target, timeout: Duration) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Unreachable {
                target: target.name.clone(),
                url: target.base_url.clone(),
                reason: e.to_string(),
            })?;
        let mut client = Client {
            http,
            model: target.model.clone().unwrap_or_default(),
            target,
            timeout,
            tokenize: TokenizeApi::None,
        };
        let models = client
            .get_json("/v1/models", Duration::from_secs(30))
            .await?;
        if client.model.is_empty() {
            client.model = models["data"][0]["id"]
                .as_str()
                .ok_or_else(|| ClientError::NoModel {
                    target: client.target.name.clone(),
                })?
                .to_string();
        }
        client.tokenize = client.probe_tokenize().await;
        Ok(client)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.target.base_url)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, self.url(path));
        if let Some(k) = &self.target.api_key {
            r = r.bearer_auth(k);
        }
        r
    }

    async fn get_json(&self, path: &str, timeout: Duration) -> Result<Value, ClientError> {
        self.send_json(self.request(reqwest::Method::GET, path), path, timeout)
            .await
    }

    async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send_json(
            self.request(reqwest::Method::POST, path).json(body),
            path,
            Duration::from_secs(60),
        )
        .await
    }

    async fn send_json(
        &self,
        req: reqwest::RequestBuilder,
        path: &str,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let unreachable = |e: String| ClientError::Unreachable {
            target: self.target.name.clone(),
            url: self.url(path),
            reason: e,
        };
        let resp = req
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        if !status.is_success() {
            return Err(ClientError::Status {
                target: self.target.name.clone(),
                url: self.url(path),
                status: status.as_u16(),
                body: text.chars().take(300).collect(),
            });
        }
        serde_json::from_str(&text).map_err(|e| unreachable(format!("not JSON: {e}")))
    }

    async fn probe_tokenize(&self) -> TokenizeApi {
        for api in [
            TokenizeApi::Prompt,
            TokenizeApi::LlamaCppPython,
            TokenizeApi::Content,
        ] {
            if self.count_with(api, "hello world").await.is_some() {
                return api;
            }
        }
        TokenizeApi::None
    }

    async fn count_with(&self, api: TokenizeApi, text: &str) -> Option<usize> {
        let (path, body) = match api {
            TokenizeApi::Prompt => (
                "/tokenize",
                json!({"model": self.model, "prompt": text, "add_special_tokens": false}),
            ),
            TokenizeApi::LlamaCppPython => ("/extras/tokenize/count", json!({"input": text})),
            TokenizeApi::Content => ("/tokenize", json!({"content": text})),
            TokenizeApi::None => return None,
        };
        let v = self.post_json(path, &body).await.ok()?;
        v["count"]
            .as_u64()
            .map(|c| c as usize)
            .or_else(|| v["tokens"].as_array().map(Vec::len))
    }

    /// Tokens of `text` on the target's tokenizer, if it exposes one.
    pub async fn count_tokens(&self, text: &str) -> Option<usize> {
        self.count_with(self.tokenize, text).await
    }

    pub fn can_tokenize(&self) -> bool {
        self.tokenize != TokenizeApi::None
    }

    /// Streams one chat completion and measures it. Never fails: problems go in `error`.
    pub async fn chat(&self, messages: &[Message], sampling: Sampling) -> Measured {
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if sampling.ignore_eos {
            body["ignore_eos"] = json!(true);
            body["min_tokens"] = json!(sampling.max_tokens);
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut m = Measured::default();
        let result = tokio::time::timeout_at(deadline, self.stream_into(&body, started, &mut m))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "timed out after {:.0} s",
                    self.timeout.as_secs_f64()
                ))
            });
        m.e2e = started.elapsed().as_secs_f64();
        match result {
            Err(e) => m.error = Some(e),
            // Every OpenAI stream ends its choice with a finish_reason. Without one the server
            // dropped the request (llama-cpp-python's server does this to concurrent streams:
            // a role chunk, then [DONE]).
            Ok(()) if m.finish_reason.is_none() => {
                m.error = Some(format!(
                    "the stream ended without a finish_reason after {} content chunks: the server dropped the request",
                    m.content_chunks
                ))
            }
            Ok(()) => {}
        }
        self.fill_missing_counts(messages, &mut m).await;
        m
    }

    async fn stream_into(
        &self,
        body: &Value,
        started: Instant,
        m: &mut Measured,
    ) -> Result<(), String> {
        let mut resp = self
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .json(body)
            .send()
            .await
            .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(300).collect());
            return Err(format!("HTTP {}: {message}", status.as_u16()));
        }
        let mut parser = SseParser::default();
        let mut last_content: Option<Instant> = None;
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| format!("stream broke: {}", error_chain(&e)))?;
            let Some(bytes) = chunk else {
                return if parser.done {
                    Ok(())
                } else {
                    Err("the stream ended without `data: [DONE]`".to_string())
                };
            };
            for data in parser.push(&bytes) {
                if data == "[DONE]" {
                    parser.done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(&data).map_err(|e| {
                    format!(
                        "malformed stream event ({e}): {}",
                        data.chars().take(120).collect::<String>()
                    )
                })?;
                if let Some(err) = v.get("error") {
                    let msg = err["message"].as_str().unwrap_or("unknown error");
                    return Err(format!("error in stream: {msg}"));
                }
                let now = Instant::now();
                if let Some(choice) = v["choices"].get(0) {
                    let content = choice["delta"]["content"].as_str().unwrap_or("");
                    if !content.is_empty() {
                        m.ttft.get_or_insert((now - started).as_secs_f64());
                        if let Some(prev) = last_content.replace(now) {
                            m.itl.push((now - prev).as_secs_f64());
                        }
                        m.content_chunks += 1;
                        m.text.push_str(content);
                    }
                    if let Some(r) = choice["finish_reason"].as_str() {
                        m.finish_reason = Some(r.to_string());
                    }
                }
                let usage = &v["usage"];
                if let Some(c) = usage["completion_tokens"].as_u64() {
                    m.completion_tokens = Some(c as usize);
                    m.completion_source = Some(CountSource::Usage);
                }
                if let Some(p) = usage["prompt_tokens"].as_u64() {
                    m.prompt_tokens = Some(p as usize);
                    m.prompt_source = Some(CountSource::Usage);
                }
                if let Some(c) = usage["prompt_tokens_details"]["cached_tokens"].as_u64() {
                    m.cached_tokens = Some(c as usize);
                }
            }
            if parser.done {
                return Ok(());
            }
        }
    }

    /// Counts what the server did not report.
    async fn fill_missing_counts(&self, messages: &[Message], m: &mut Measured) {
        if m.completion_tokens.is_none() && m.content_chunks > 0 {
            m.completion_tokens = Some(m.content_chunks);
            m.completion_source = Some(CountSource::Estimated);
        }
        if m.prompt_tokens.is_none() {
            let text: String = messages.iter().map(|x| x.content.as_str()).collect();
            match self.count_tokens(&text).await {
                Some(n) => {
                    m.prompt_tokens = Some(n);
                    m.prompt_source = Some(CountSource::Tokenize);
                }
                None => {
                    m.prompt_tokens = Some(text.len().div_ceil(4));
                    m.prompt_source = Some(CountSource::Estimated);
                }
            }
        }
    }
}

/// The error and its causes ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Splits a server-sent-event byte stream into `data` payloads (multi-line data joined by
/// newlines; comments and other fields ignored; CRLF or LF line ends).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
    pub done: bool,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if let Some(d) = self.data.take() {
                    out.push(d);
                }
            } else if let Some(rest) = line.strip_prefix("data:") {
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(rest);
                    }
                    None => self.data = Some(rest.to_string()),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_options() {
        let t = Target::parse("vllm=http://gpu:8000/v1/,key=abc,model=m").unwrap();
        assert_eq!(t.base_url, "http://gpu:8000");
        assert_eq!(t.api_key.as_deref(), Some("abc"));
        assert_eq!(t.model.as_deref(), Some("m"));
        assert!(Target::parse("nourl").is_err());
        assert!(Target::parse("x=ftp://a").is_err());
        assert!(Target::parse("x=http://a,colour=blue").is_err());
    }

    #[test]
    fn sse_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            p.push(b":1}\r\n\r\n: keep-alive\n\ndata: x\ndata: y\n\n"),
            vec!["{\"a\":1}".to_string(), "x\ny".to_string()]
        );
        assert_eq!(p.push(b"data: [DONE]\n\n"), vec!["[DONE]".to_string()]);
    }
}
