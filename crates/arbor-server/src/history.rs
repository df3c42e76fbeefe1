//! A conversation's next turn, and where a prompt left the cache.
//!
//! Chat templates rewrite earlier turns when they render the next request: DeepSeek-R1's
//! drops every past answer's reasoning, Qwen3's drops it from the turns before the latest
//! question, others add separators or headers. The KV cached while a reply was generated (its
//! think block included) then stops matching where that reply starts, and the next turn
//! recomputes the reply as rendered on top of its new message. [`Turn::next_turn_prefix`]
//! renders the history the way the next request will (the reply as the client sends it back,
//! then a next message) and keeps the tokens every next message shares; the engine computes
//! them as a warm-up while it has nothing else to do (`Engine::warm_prefix`), so the next turn
//! computes only its new message.
//!
//! [`Turn::cache_miss`] says where a prompt left the cache: the token, the message it falls
//! in and the text around it, so that a user can see why a turn missed (`usage.prompt_cache_miss`).

use arbor_model::{ChatMessage, ChatTemplate, Tokenizer};
use serde::Serialize;
use serde_json::Value;

use crate::tools::ToolCall;

/// What a chat request keeps for its reply's end: enough to render the next turn and to
/// explain the prompt's cache hit.
#[derive(Debug)]
pub(crate) struct Turn {
    pub namespace: u64,
    pub messages: Vec<ChatMessage>,
    pub tools: Option<Value>,
    pub prompt: Vec<u32>,
    /// The rendered prompt.
    pub prompt_text: String,
    /// Each message's content as a byte range of the rendered prompt, where it was found.
    pub spans: Vec<Option<(usize, usize)>>,
    /// Whether to warm the next turn when the reply ends (warm-ups on, one choice).
    pub warm: bool,
    /// Whether the client sends replies' reasoning back (see [`ReasoningEchoes`]; `None`:
    /// not known yet).
    pub sends_reasoning: Option<bool>,
}

/// Whether each cache namespace's clients send replies' reasoning back in later requests
/// (`reasoning_content` on assistant messages; OpenAI's clients do not, some agent frameworks
/// do, and Qwen3's template renders it inside a tool loop). Learned from requests that carry
/// assistant messages, used for a conversation's first reply, which has none to tell.
/// Bounded: past [`ReasoningEchoes::MAX`] namespaces it starts over.
#[derive(Debug, Default)]
pub(crate) struct ReasoningEchoes(std::sync::Mutex<std::collections::HashMap<u64, bool>>);

impl ReasoningEchoes {
    const MAX: usize = 4096;

    /// What this request shows (its assistant messages carry reasoning or not), else what
    /// the namespace's last such request showed, else `None`.
    pub fn observe(&self, namespace: u64, messages: &[ChatMessage]) -> Option<bool> {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut answers = messages.iter().filter(|m| m.role == "assistant").peekable();
        if answers.peek().is_none() {
            return seen.get(&namespace).copied();
        }
        let sends = answers.any(|m| m.reasoning_content.is_some());
        if seen.len() >= Self::MAX && !seen.contains_key(&namespace) {
            seen.clear();
        }
        seen.insert(namespace, sends);
        Some(sends)
    }
}

/// A reply as its client will send it back in the next request.
#[derive(Debug, Default, Clone)]
pub(crate) struct Reply {
    /// The generated text as it came (what the cache holds after the prompt).
    pub raw: String,
    pub reasoning: String,
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// Where a prompt left the cache (an Arbor extension of `usage`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct CacheMiss {
    /// The first prompt token computed rather than found in the cache (`cached_tokens`).
    pub at_token: usize,
    /// The message it falls in (an index into `messages`), when the prompt's text shows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_message: Option<usize>,
    /// The prompt's text just before that token, and from it (a few tokens each).
    pub text_before: String,
    pub text_after: String,
}

/// Tokens of context shown on each side of a cache miss.
const MISS_CONTEXT_TOKENS: usize = 12;

/// The byte range of each message's content in the rendered prompt, searched in order (a
/// template that rewrites a message's content leaves it unfound).
pub(crate) fn content_spans(
    messages: &[ChatMessage],
    rendered: &str,
) -> Vec<Option<(usize, usize)>> {
    let mut cursor = 0;
    messages
        .iter()
        .map(|m| {
            if m.content.is_empty() {
                return None;
            }
            let start = cursor + rendered[cursor..].find(m.content.as_str())?;
            cursor = start + m.content.len();
            Some((start, cursor))
        })
        .collect()
}

impl Turn {
    /// The tokens the next request of this conversation will start with: the history and
    /// `reply` rendered as the template will render them then, up to where the next message's
    /// own text begins. Empty when the template cannot render the reply back.
    ///
    /// The reply goes back as clients send it: its content and tool calls, and its reasoning
    /// if the namespace's clients send reasoning back; when that is not known yet, both ways
    /// (one prefix when the template renders them alike). The next message is a tool result
    /// after calls, a user message otherwise; two different ones are rendered and the shared
    /// tokens kept, less one (the tokenizer may merge across the boundary). Nothing when the
    /// next request starts with this prompt and the reply as generated: the cache has it all
    /// but the template's few tokens between turns, not worth tokenizing the conversation for
    /// (the common case of a template that does not rewrite history).
    pub fn next_turn_prefixes(
        &self,
        template: &ChatTemplate,
        tokenizer: &Tokenizer,
        reply: &Reply,
    ) -> Vec<Vec<u32>> {
        let with_reasoning: &[bool] = match self.sends_reasoning {
            _ if reply.reasoning.is_empty() => &[false],
            Some(true) => &[true],
            Some(false) => &[false],
            None => &[false, true],
        };
        let mut prefixes: Vec<Vec<u32>> = Vec::new();
        for &reasoning in with_reasoning {
            if let Some(p) = self.next_turn_prefix(template, tokenizer, reply, reasoning) {
                if !prefixes.contains(&p) {
                    prefixes.push(p);
                }
            }
        }
        prefixes
    }

    fn next_turn_prefix(
        &self,
        template: &ChatTemplate,
        tokenizer: &Tokenizer,
        reply: &Reply,
        with_reasoning: bool,
    ) -> Option<Vec<u32>> {
        let mut answer = ChatMessage::new("assistant", reply.content.clone());
        if with_reasoning {
            answer.reasoning_content = Some(reply.reasoning.clone());
        }
        if !reply.calls.is_empty() {
            answer.tool_calls = Some(Value::Array(
                reply
                    .calls
                    .iter()
                    .map(|c| {
                        crate::api::template_tool_call(
                            Some(&c.id),
                            "function",
                            &c.name,
                            &c.arguments,
                        )
                    })
                    .collect(),
            ));
        }
        let mut conversation = self.messages.clone();
        conversation.push(answer);
        let mut render = |probe: &str| -> Option<String> {
            let next = match reply.calls.first() {
                Some(call) => {
                    let mut m = ChatMessage::new("tool", probe);
                    m.tool_call_id = Some(call.id.clone());
                    m.name = Some(call.name.clone());
                    m
                }
                None => ChatMessage::new("user", probe),
            };
            conversation.push(next);
            let text = template.render_with_tools(&conversation, self.tools.as_ref(), true);
            conversation.pop();
            text.ok()
        };
        let a = render("Hello")?;
        if a.starts_with(&self.prompt_text) && a[self.prompt_text.len()..].starts_with(&reply.raw) {
            return None;
        }
        let b = render("1.\n")?;
        let tokenize = |text: &str| tokenizer.encode(text, true).ok();
        let (a, b) = (tokenize(&a)?, tokenize(&b)?);
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        Some(a[..shared.saturating_sub(1)].to_vec())
    }

    /// Where the prompt left the cache, when it did before its last token (which is always
    /// computed, for its logits).
    pub fn cache_miss(&self, tokenizer: &Tokenizer, cached: usize) -> Option<CacheMiss> {
        if cached + 1 >= self.prompt.len() {
            return None;
        }
        let decode = |ids: &[u32]| tokenizer.decode(ids, false).unwrap_or_default();
        let before = &self.prompt[cached.saturating_sub(MISS_CONTEXT_TOKENS)..cached];
        let after = &self.prompt[cached..(cached + MISS_CONTEXT_TOKENS).min(self.prompt.len())];
        let offset = decode(&self.prompt[..cached]).len();
        // The first message whose content ends past the miss: the miss is in it, or in the
        // template's text in front of it.
        let at_message = self
            .spans
            .iter()
            .position(|s| s.is_some_and(|(_, end)| end > offset));
        Some(CacheMiss {
            at_token: cached,
            at_message,
            text_before: decode(before),
            text_after: decode(after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template that drops an answer's reasoning once the conversation goes on, as
    /// DeepSeek-R1's does (written here, not copied).
    const DROPS_REASONING: &str = "{% for m in messages %}<|{{ m.role }}|>{% if m.role == 'assistant' %}{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}";

    fn tokenizer() -> Tokenizer {
        // A byte-level tokenizer is enough: the test is about text, not merges.
        Tokenizer::placeholder(256).unwrap()
    }

    fn turn(messages: Vec<ChatMessage>, template: &ChatTemplate, tok: &Tokenizer) -> Turn {
        let text = template.render(&messages, true).unwrap();
        Turn {
            namespace: 0,
            spans: content_spans(&messages, &text),
            prompt: tok.encode(&text, true).unwrap(),
            prompt_text: text,
            messages,
            tools: None,
            warm: true,
            sends_reasoning: Some(false),
        }
    }

    #[test]
    fn the_next_turn_prefix_is_the_history_as_the_template_renders_it_next() {
        let template = ChatTemplate::new(DROPS_REASONING, "", "").unwrap();
        let tok = tokenizer();
        let t = turn(
            vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi?"),
            ],
            &template,
            &tok,
        );
        let reply = Reply {
            raw: "<think>The user greets.</think>Hello.".into(),
            reasoning: "The user greets.".into(),
            content: "Hello.".into(),
            calls: Vec::new(),
        };
        let prefixes = t.next_turn_prefixes(&template, &tok, &reply);
        // The template never renders `reasoning_content`: one prefix, whether it is sent back.
        assert_eq!(
            Turn {
                sends_reasoning: None,
                ..turn(t.messages.clone(), &template, &tok)
            }
            .next_turn_prefixes(&template, &tok, &reply),
            prefixes
        );
        let [prefix] = &prefixes[..] else {
            panic!("{prefixes:?}")
        };
        let next = template
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi?"),
                    ChatMessage::new("assistant", "Hello."),
                    ChatMessage::new("user", "And you?"),
                ],
                true,
            )
            .unwrap();
        let next = tok.encode(&next, true).unwrap();
        assert!(next.starts_with(prefix));
        // Everything up to the new message's text, but the last token held back.
        let text = tok.decode(prefix, false).unwrap();
        assert_eq!(
            text,
            "<|system|>Be brief.<|end|><|user|>Hi?<|end|><|assistant|>Hello.<|end|><|user|"
        );
        // The prompt that was cached diverges from it where the reasoning began.
        let shared = t
            .prompt
            .iter()
            .zip(prefix)
            .take_while(|(a, b)| a == b)
            .count();
        assert_eq!(
            tok.decode(&prefix[shared..], false).unwrap(),
            "Hello.<|end|><|user|"
        );
    }

    #[test]
    fn reasoning_goes_back_as_the_namespace_sends_it_and_both_ways_when_unknown() {
        // Renders an answer's reasoning when the client sends it back (as Qwen3's does in a
        // tool loop; written here, not copied).
        let keeps = "{% for m in messages %}<|{{ m.role }}|>{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let template = ChatTemplate::new(keeps, "", "").unwrap();
        let tok = tokenizer();
        let reply = Reply {
            // As generated: newlines the template does not write back.
            raw: "<think>\nThe user greets.\n</think>\n\nHello.".into(),
            reasoning: "The user greets.".into(),
            content: "Hello.".into(),
            calls: Vec::new(),
        };
        let text = |p: &Vec<u32>| tok.decode(p, false).unwrap();
        let base = turn(vec![ChatMessage::new("user", "Hi?")], &template, &tok);
        for (sends, want) in [
            (Some(false), vec!["<|user|>Hi?<|end|><|assistant|>Hello.<|end|><|user|"]),
            (
                Some(true),
                vec!["<|user|>Hi?<|end|><|assistant|><think>The user greets.</think>Hello.<|end|><|user|"],
            ),
            (
                None,
                vec![
                    "<|user|>Hi?<|end|><|assistant|>Hello.<|end|><|user|",
                    "<|user|>Hi?<|end|><|assistant|><think>The user greets.</think>Hello.<|end|><|user|",
                ],
            ),
        ] {
            let t = Turn {
                sends_reasoning: sends,
                messages: base.messages.clone(),
                prompt: base.prompt.clone(),
                prompt_text: base.prompt_text.clone(),
                spans: base.spans.clone(),
                namespace: 0,
                tools: None,
                warm: true,
            };
            let got: Vec<String> = t.next_turn_prefixes(&template, &tok, &reply).iter().map(text).collect();
            assert_eq!(got, want, "{sends:?}");
        }
    }

    #[test]
    fn a_template_that_keeps_history_as_generated_needs_no_warm_up() {
        let template = ChatTemplate::new(arbor_model::text::chat::CHATML_TEMPLATE, "", "").unwrap();
        let tok = tokenizer();
        let t = turn(vec![ChatMessage::new("user", "Hi?")], &template, &tok);
        let reply = Reply {
            raw: "Hello.".into(),
            content: "Hello.".into(),
            ..Default::default()
        };
        assert!(t.next_turn_prefixes(&template, &tok, &reply).is_empty());
        // A reply whose reasoning the client drops does need one.
        let reply = Reply {
            raw: "<think>Greeting.</think>Hello.".into(),
            reasoning: "Greeting.".into(),
            content: "Hello.".into(),
            calls: Vec::new(),
        };
        assert_eq!(t.next_turn_prefixes(&template, &tok, &reply).len(), 1);
    }

    #[test]
    fn whether_clients_send_reasoning_back_is_learned_per_namespace() {
        let echoes = ReasoningEchoes::default();
        let question = [ChatMessage::new("user", "Hi?")];
        let mut answer = ChatMessage::new("assistant", "Hello.");
        assert_eq!(echoes.observe(1, &question), None, "nothing seen yet");
        answer.reasoning_content = Some("The user greets.".into());
        let with = [question[0].clone(), answer.clone(), question[0].clone()];
        assert_eq!(echoes.observe(1, &with), Some(true));
        // A first turn in namespace 1 follows what its clients did; namespace 2 knows nothing.
        assert_eq!(echoes.observe(1, &question), Some(true));
        assert_eq!(echoes.observe(2, &question), None);
        answer.reasoning_content = None;
        let without = [question[0].clone(), answer, question[0].clone()];
        assert_eq!(echoes.observe(1, &without), Some(false));
        assert_eq!(echoes.observe(1, &question), Some(false));
    }

    #[test]
    fn a_cache_miss_names_the_message_and_the_text_around_it() {
        let template = ChatTemplate::new(DROPS_REASONING, "", "").unwrap();
        let tok = tokenizer();
        let messages = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi?"),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "And you?"),
        ];
        let t = turn(messages, &template, &tok);
        let rendered = tok.decode(&t.prompt, false).unwrap();
        // Cached up to the answer's start (what the reply's think block left behind).
        let cached = rendered.find("Hello.").unwrap();
        let miss = t.cache_miss(&tok, cached).unwrap();
        assert_eq!(miss.at_token, cached);
        assert_eq!(miss.at_message, Some(2));
        assert_eq!(miss.text_before, "|assistant|>");
        assert!(miss.text_after.starts_with("Hello."), "{miss:?}");
        // In the template's text in front of the last message: that message.
        let cached = rendered.rfind("<|user|>").unwrap() + 2;
        assert_eq!(t.cache_miss(&tok, cached).unwrap().at_message, Some(3));
        // Nothing cached: the first message; all but the last token: no miss.
        assert_eq!(t.cache_miss(&tok, 0).unwrap().at_message, Some(0));
        assert_eq!(t.cache_miss(&tok, t.prompt.len() - 1), None);
    }
}
