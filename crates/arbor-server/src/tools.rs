//! Tool calls parsed out of a chat reply, in the formats models are trained to write them:
//!
//! ```text
//!   hermes       (Hermes, Qwen 2.5/3)   text <tool_call>{"name": N, "arguments": {...}}</tool_call> ...
//!   llama3_json  (Llama 3.1-3.3)        [<|python_tag|>]{"name": N, "parameters": {...}}[; {...}]
//!   mistral      (Mistral)              [TOOL_CALLS][{"name": N, "arguments": {...}}, ...]
//!                                       [TOOL_CALLS]N[ARGS]{...}          (newer tokenizers)
//! ```
//!
//! One [`ToolCallSplitter`] per choice takes the reply's content piece by piece (the same code
//! for whole responses and streams) and splits it into text content and complete tool calls,
//! each released as soon as it closes; only text that may still turn out to be part of a call
//! is held back. A call that never parses (the model wrote half a call, or JSON that is not
//! one) is given back as content, so no text is ever lost. Llama 3 and Mistral calls must
//! open the reply (their templates say so); Hermes calls may follow text.

use std::str::FromStr;

use serde_json::Value;

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_TAG: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";

/// The format of tool calls in replies (`--tool-call-parser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolCallParser {
    /// From the chat template: the format its tool-call syntax names, none if it has none.
    #[default]
    Auto,
    /// Tool calls are not parsed (`tools` with `tool_choice` other than `none` is a 400).
    Off,
    Hermes,
    Llama3Json,
    Mistral,
}

impl FromStr for ToolCallParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" | "off" => Ok(Self::Off),
            "hermes" | "qwen" | "qwen2_5" => Ok(Self::Hermes),
            "llama3_json" | "llama3" | "llama" => Ok(Self::Llama3Json),
            "mistral" => Ok(Self::Mistral),
            _ => Err(format!(
                "a tool-call parser is auto, none, hermes, llama3_json or mistral, not {s:?}"
            )),
        }
    }
}

impl ToolCallParser {
    /// The format in force for a chat template (`Auto` resolved; `None`: not parsed).
    pub fn resolve(self, template_source: &str) -> Option<Self> {
        match self {
            Self::Off => None,
            Self::Auto => {
                if template_source.contains(HERMES_OPEN) {
                    Some(Self::Hermes)
                } else if template_source.contains(MISTRAL_TAG) {
                    Some(Self::Mistral)
                } else if template_source.contains(PYTHON_TAG)
                    || (template_source.contains("ipython")
                        && template_source.contains("parameters"))
                {
                    Some(Self::Llama3Json)
                } else {
                    None
                }
            }
            p => Some(p),
        }
    }
}

/// A parsed call: the function's name and its arguments as JSON text (OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// One piece of a reply, by kind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ToolSplit {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Only whitespace so far: for formats whose calls must open the reply.
    Start,
    /// Text content (Hermes: a `<tool_call>` may still come).
    Content,
    /// Inside calls: buffered until they parse.
    Calls,
}

pub struct ToolCallSplitter {
    format: ToolCallParser,
    state: State,
    /// Text not yet released: a possible tag's start, or calls still being written.
    held: String,
    /// Calls released so far (numbering, and `parallel_tool_calls: false`).
    calls: usize,
    parallel: bool,
}

impl ToolCallSplitter {
    /// `format` is a resolved parser; `parallel` false keeps only the first call.
    pub fn new(format: ToolCallParser, parallel: bool) -> Self {
        Self {
            format,
            state: State::Start,
            held: String::new(),
            calls: 0,
            parallel,
        }
    }

    /// Calls released so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// The next piece of the reply.
    pub fn push(&mut self, text: &str) -> ToolSplit {
        self.held.push_str(text);
        let mut out = ToolSplit::default();
        self.advance(&mut out, false);
        out
    }

    /// The last piece: everything held is released, as calls if it parses, else as text.
    pub fn finish(&mut self, text: &str) -> ToolSplit {
        self.held.push_str(text);
        let mut out = ToolSplit::default();
        self.advance(&mut out, true);
        if !self.held.is_empty() {
            out.content.push_str(&std::mem::take(&mut self.held));
        }
        out
    }

    fn advance(&mut self, out: &mut ToolSplit, last: bool) {
        loop {
            match (self.format, self.state) {
                (ToolCallParser::Hermes, State::Start | State::Content) => {
                    // After a call, white space alone (between calls, at the end) is layout,
                    // not content.
                    let after_call = self.calls > 0;
                    if let Some(at) = self.held.find(HERMES_OPEN) {
                        let text = &self.held[..at];
                        if !(after_call && text.trim().is_empty()) {
                            out.content.push_str(text);
                        }
                        self.held.drain(..at + HERMES_OPEN.len());
                        self.state = State::Calls;
                        continue;
                    }
                    // Keep back what could be the start of a tag split across pieces.
                    let keep = if last {
                        0
                    } else {
                        partial_suffix(&self.held, HERMES_OPEN)
                    };
                    let upto = self.held.len() - keep;
                    self.state = State::Content;
                    if after_call && self.held[..upto].trim().is_empty() {
                        if last {
                            self.held.clear();
                        }
                        return;
                    }
                    out.content.push_str(&self.held[..upto]);
                    self.held.drain(..upto);
                    return;
                }
                (ToolCallParser::Hermes, State::Calls) => {
                    let Some(at) = self.held.find(HERMES_CLOSE) else {
                        if last {
                            // No closing tag at the end (some models stop right after the
                            // JSON): a call if what is there parses.
                            let body = self.held.trim();
                            if let Some(call) = parse_call(body) {
                                self.emit(out, call);
                                self.held.clear();
                            } else {
                                self.held.insert_str(0, HERMES_OPEN);
                            }
                        }
                        return;
                    };
                    let body = self.held[..at].trim().to_string();
                    match parse_call(&body) {
                        Some(call) => {
                            self.emit(out, call);
                            self.held.drain(..at + HERMES_CLOSE.len());
                        }
                        None => {
                            // Not a call after all: the whole tagged text is content.
                            out.content.push_str(HERMES_OPEN);
                            out.content.push_str(&self.held[..at + HERMES_CLOSE.len()]);
                            self.held.drain(..at + HERMES_CLOSE.len());
                        }
                    }
                    self.state = State::Content;
                }
                (ToolCallParser::Llama3Json | ToolCallParser::Mistral, State::Start) => {
                    let t = self.held.trim_start();
                    if t.is_empty() && !last {
                        return;
                    }
                    let opens = match self.format {
                        ToolCallParser::Llama3Json => {
                            t.starts_with('{') || t.starts_with(PYTHON_TAG)
                        }
                        _ => t.starts_with(MISTRAL_TAG) || t.starts_with("[{"),
                    };
                    let could_open = match self.format {
                        ToolCallParser::Llama3Json => PYTHON_TAG.starts_with(t),
                        _ => MISTRAL_TAG.starts_with(t) || t == "[",
                    };
                    if opens {
                        self.state = State::Calls;
                    } else if could_open && !last {
                        return;
                    } else {
                        self.state = State::Content;
                    }
                }
                (ToolCallParser::Llama3Json | ToolCallParser::Mistral, State::Content) => {
                    out.content.push_str(&std::mem::take(&mut self.held));
                    return;
                }
                (ToolCallParser::Llama3Json, State::Calls) => {
                    // Release each object as it closes; an unfinished one waits for more text.
                    let lead = self.held.len() - self.held.trim_start().len();
                    let mut pos = lead;
                    if self.held[lead..].starts_with(PYTHON_TAG) {
                        pos += PYTHON_TAG.len();
                    }
                    let mut calls = Vec::new();
                    let mut bad = false;
                    loop {
                        let rest = &self.held[pos..];
                        // Calls are separated by `;` and white space.
                        let skip = rest.len()
                            - rest
                                .trim_start_matches(|c: char| c == ';' || c.is_whitespace())
                                .len();
                        let rest = &rest[skip..];
                        if rest.is_empty() {
                            break;
                        }
                        let mut values =
                            serde_json::Deserializer::from_str(rest).into_iter::<Value>();
                        match values.next() {
                            Some(Ok(v)) => match call_from_value(&v, "parameters") {
                                Some(c) => {
                                    calls.push(c);
                                    pos += skip + values.byte_offset();
                                }
                                None => {
                                    bad = true;
                                    break;
                                }
                            },
                            Some(Err(e)) if e.is_eof() && !last => break,
                            _ => {
                                bad = true;
                                break;
                            }
                        }
                    }
                    if bad && self.calls == 0 && calls.is_empty() {
                        // Not calls: the reply is text.
                        self.state = State::Content;
                        continue;
                    }
                    for c in calls {
                        self.emit(out, c);
                    }
                    self.held.drain(..pos);
                    if bad || last {
                        // What follows the calls did not parse: text.
                        self.state = State::Content;
                        continue;
                    }
                    return;
                }
                (ToolCallParser::Mistral, State::Calls) => {
                    if !last {
                        return;
                    }
                    let body = self.held.trim_start();
                    let body = body.strip_prefix(MISTRAL_TAG).unwrap_or(body).trim();
                    match parse_mistral(body) {
                        Some(calls) => {
                            for c in calls {
                                self.emit(out, c);
                            }
                            self.held.clear();
                        }
                        None => self.state = State::Content,
                    }
                    return;
                }
                (ToolCallParser::Auto | ToolCallParser::Off, _) => {
                    out.content.push_str(&std::mem::take(&mut self.held));
                    return;
                }
            }
        }
    }

    fn emit(&mut self, out: &mut ToolSplit, mut call: ToolCall) {
        if self.parallel || self.calls == 0 {
            call.id = call_id(self.format);
            out.calls.push(call);
            self.calls += 1;
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// A Lark grammar (llguidance's dialect) for replies that are nothing but calls in `format`
/// of the tools given as `(name, parameters schema)`: what `tool_choice: "required"` (any of
/// them) and a named function (a list of one) enforce. `parallel` allows several calls.
pub fn forced_calls_grammar(
    format: ToolCallParser,
    tools: &[(String, Option<Value>)],
    parallel: bool,
) -> String {
    let args_key = if format == ToolCallParser::Llama3Json {
        "parameters"
    } else {
        "arguments"
    };
    let any_of: Vec<Value> = tools
        .iter()
        .map(|(name, params)| {
            serde_json::json!({
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    args_key: params.clone().unwrap_or_else(|| serde_json::json!({"type": "object"})),
                },
                "required": ["name", args_key],
                "additionalProperties": false,
            })
        })
        .collect();
    let call = crate::structured::bounded_whitespace(serde_json::json!({"anyOf": any_of}));
    let (one, sep, open, close) = match format {
        ToolCallParser::Llama3Json => ("call", "\"; \"", "", ""),
        ToolCallParser::Mistral => ("call", "\", \"", "\"[\" ", " \"]\""),
        _ => ("tagged", "\"\\n\"", "", ""),
    };
    let body = if parallel {
        format!("{one} ({sep} {one})*")
    } else {
        one.to_string()
    };
    format!(
        "start: {open}{body}{close}\n\
         tagged: \"{HERMES_OPEN}\\n\" call \"\\n{HERMES_CLOSE}\"\n\
         call: %json {call}\n"
    )
}

/// `{"name": ..., "arguments": {...}}` (or `"parameters"`), as a call.
fn parse_call(body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body).ok()?;
    call_from_value(&v, "arguments")
}

fn call_from_value(v: &Value, args_key: &str) -> Option<ToolCall> {
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.to_string();
    if name.is_empty() {
        return None;
    }
    let args = obj
        .get(args_key)
        .or_else(|| obj.get("arguments"))
        .or_else(|| obj.get("parameters"));
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments as a JSON string already.
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ToolCall {
        id: String::new(),
        name,
        arguments,
    })
}

/// Mistral's bodies: a JSON array of calls, or `name[ARGS]{...}` repeated.
fn parse_mistral(body: &str) -> Option<Vec<ToolCall>> {
    if body.starts_with('[') {
        let v: Value = serde_json::from_str(body).ok()?;
        return v
            .as_array()?
            .iter()
            .map(|c| call_from_value(c, "arguments"))
            .collect();
    }
    let mut calls = Vec::new();
    for part in body.split(MISTRAL_TAG) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (name, args) = part.split_once(MISTRAL_ARGS)?;
        let args: Value = serde_json::from_str(args.trim()).ok()?;
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        calls.push(ToolCall {
            id: String::new(),
            name: name.to_string(),
            arguments: args.to_string(),
        });
    }
    (!calls.is_empty()).then_some(calls)
}

/// A fresh call id: Mistral's templates require 9 alphanumerics; others get OpenAI's shape.
fn call_id(format: ToolCallParser) -> String {
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let n = if format == ToolCallParser::Mistral {
        9
    } else {
        24
    };
    let s: String = (0..n)
        .map(|_| ALNUM[rand::random_range(0..ALNUM.len())] as char)
        .collect();
    if format == ToolCallParser::Mistral {
        s
    } else {
        format!("call_{s}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `reply` into pieces at every cut (all 2-piece splits, and char by char), and
    /// checks each way gives the same content and calls as the whole.
    fn split_all_ways(format: ToolCallParser, reply: &str) -> (String, Vec<(String, String)>) {
        let run = |pieces: &[&str]| {
            let mut s = ToolCallSplitter::new(format, true);
            let mut content = String::new();
            let mut calls = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                let out = if i + 1 == pieces.len() {
                    s.finish(p)
                } else {
                    s.push(p)
                };
                content.push_str(&out.content);
                calls.extend(out.calls.into_iter().map(|c| (c.name, c.arguments)));
            }
            (content, calls)
        };
        let whole = run(&[reply]);
        let chars: Vec<&str> = reply
            .char_indices()
            .map(|(i, c)| &reply[i..i + c.len_utf8()])
            .collect();
        let mut by_char = chars.clone();
        by_char.push("");
        assert_eq!(run(&by_char), whole, "char by char: {reply:?}");
        for (i, _) in reply.char_indices().skip(1) {
            assert_eq!(
                run(&[&reply[..i], &reply[i..]]),
                whole,
                "cut at {i}: {reply:?}"
            );
        }
        whole
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.into(), args.into())
    }

    #[test]
    fn hermes_calls_after_text_and_several() {
        let reply = "Let me check. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = split_all_ways(ToolCallParser::Hermes, reply);
        assert_eq!(content, "Let me check. ");
        assert_eq!(
            calls,
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("get_time", "{}")
            ]
        );
    }

    #[test]
    fn text_after_calls_is_kept_unless_only_white_space() {
        let reply =
            "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\n\nDone, see above.";
        let (content, calls) = split_all_ways(ToolCallParser::Hermes, reply);
        assert_eq!(content, "\n\nDone, see above.");
        assert_eq!(calls.len(), 1);
        let (content, _) = split_all_ways(
            ToolCallParser::Hermes,
            "<tool_call>{\"name\": \"f\"}</tool_call>\n \n",
        );
        assert_eq!(content, "");
    }

    #[test]
    fn hermes_without_a_call_or_with_a_broken_one_is_text() {
        for reply in [
            "No tools needed: 2 + 2 = 4. A < b and <tool is not a tag.",
            "<tool_call>{\"oops\": 1}</tool_call> after",
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": ",
        ] {
            let (content, calls) = split_all_ways(ToolCallParser::Hermes, reply);
            assert_eq!(content, reply);
            assert!(calls.is_empty());
        }
        // A call the model did not close before the end still counts.
        let (content, calls) = split_all_ways(
            ToolCallParser::Hermes,
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}",
        );
        assert_eq!(content, "");
        assert_eq!(calls, vec![call("f", r#"{"a":1}"#)]);
    }

    #[test]
    fn llama3_json_calls_open_the_reply() {
        let reply = "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"q\": \"rust; zmq\"}}; {\"name\": \"open\", \"parameters\": {\"id\": 3}}";
        let (content, calls) = split_all_ways(ToolCallParser::Llama3Json, reply);
        assert_eq!(content, "");
        assert_eq!(
            calls,
            vec![
                call("search", r#"{"q":"rust; zmq"}"#),
                call("open", r#"{"id":3}"#)
            ]
        );
        let (content, calls) = split_all_ways(
            ToolCallParser::Llama3Json,
            " {\"name\": \"f\", \"arguments\": {\"x\": [1, 2]}}",
        );
        assert_eq!(content, "");
        assert_eq!(calls, vec![call("f", r#"{"x":[1,2]}"#)]);
        for text in [
            "The answer is {not json}",
            "Plain answer.",
            "{\"a\": 1} is a JSON object",
        ] {
            let (content, calls) = split_all_ways(ToolCallParser::Llama3Json, text);
            assert_eq!(content, text);
            assert!(calls.is_empty(), "{text}");
        }
    }

    #[test]
    fn mistral_both_syntaxes() {
        let reply = "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"k\": \"v\"}}, {\"name\": \"b\", \"arguments\": {}}]";
        let (content, calls) = split_all_ways(ToolCallParser::Mistral, reply);
        assert_eq!(content, "");
        assert_eq!(calls, vec![call("a", r#"{"k":"v"}"#), call("b", "{}")]);
        let (_, calls) = split_all_ways(
            ToolCallParser::Mistral,
            "[TOOL_CALLS]a[ARGS]{\"k\": 1}[TOOL_CALLS]b[ARGS]{}",
        );
        assert_eq!(calls, vec![call("a", r#"{"k":1}"#), call("b", "{}")]);
        // The tag stripped as a special token: the array alone still opens calls.
        let (_, calls) = split_all_ways(
            ToolCallParser::Mistral,
            "[{\"name\": \"a\", \"arguments\": {}}]",
        );
        assert_eq!(calls, vec![call("a", "{}")]);
        for text in [
            "[1, 2, 3] are numbers",
            "Sure. [TOOL_CALLS] is a token",
            "[link](x)",
        ] {
            let (content, calls) = split_all_ways(ToolCallParser::Mistral, text);
            assert_eq!(content, text);
            assert!(calls.is_empty());
        }
    }

    #[test]
    fn one_call_only_unless_parallel_and_ids() {
        let reply = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";
        let mut s = ToolCallSplitter::new(ToolCallParser::Hermes, false);
        let out = s.finish(reply);
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.calls[0].name, "a");
        assert!(out.calls[0].id.starts_with("call_") && out.calls[0].id.len() == 29);
        let mut m = ToolCallSplitter::new(ToolCallParser::Mistral, true);
        let out = m.finish("[{\"name\": \"a\", \"arguments\": {}}]");
        assert_eq!(out.calls[0].id.len(), 9);
        assert!(out.calls[0].id.chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn formats_from_templates() {
        let p = ToolCallParser::Auto;
        assert_eq!(
            p.resolve("{{ '<tool_call>' }}"),
            Some(ToolCallParser::Hermes)
        );
        assert_eq!(
            p.resolve("[TOOL_CALLS] {{ x }}"),
            Some(ToolCallParser::Mistral)
        );
        assert_eq!(
            p.resolve("<|python_tag|>"),
            Some(ToolCallParser::Llama3Json)
        );
        assert_eq!(p.resolve("{{ messages }}"), None);
        assert_eq!(ToolCallParser::Off.resolve("<tool_call>"), None);
        assert_eq!(
            ToolCallParser::Mistral.resolve(""),
            Some(ToolCallParser::Mistral)
        );
        assert!("bogus".parse::<ToolCallParser>().is_err());
    }
}
