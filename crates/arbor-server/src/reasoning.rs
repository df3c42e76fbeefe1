//! Reasoning models' replies split into `reasoning_content` and `content`, as vLLM and SGLang
//! return them: what a model writes inside `<think>` ... `</think>` is its reasoning, the rest
//! its answer. One [`ReasoningSplitter`] per choice takes the reply's text token by token (the
//! same code for whole responses and streams), holding back only text that may be the start of
//! a tag split across tokens.
//!
//! Where the reply starts matters: DeepSeek-R1's template opens the think block in the prompt
//! (`<｜Assistant｜><think>\n`), so the reply starts inside it; Qwen3's leaves it to the model
//! (which may skip it: non-thinking mode). So a reply starts inside reasoning when the prompt
//! ends with an open `<think>`, or always with [`ReasoningParser::DeepSeekR1`] (R1 replies
//! reason first even when a template does not say so, as vLLM's R1 parser assumes); otherwise
//! it is reasoning only if it begins with `<think>`.

use std::str::FromStr;

pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// How replies are split (`--reasoning-parser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningParser {
    /// From the chat template: reasoning templates (those that mention `</think>`) get
    /// [`ReasoningParser::Qwen3`]'s rules, others none.
    #[default]
    Auto,
    /// Replies are not split.
    Off,
    /// Replies start inside reasoning.
    DeepSeekR1,
    /// Replies are reasoning up to `</think>` when they (or the prompt) open a think block.
    Qwen3,
}

impl FromStr for ReasoningParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" | "off" => Ok(Self::Off),
            "deepseek-r1" | "deepseek_r1" => Ok(Self::DeepSeekR1),
            "qwen3" => Ok(Self::Qwen3),
            _ => Err(format!(
                "a reasoning parser is auto, none, deepseek-r1 or qwen3, not {s:?}"
            )),
        }
    }
}

impl ReasoningParser {
    /// The parser in force for a chat template: `Auto` resolved, `None` when replies are not
    /// split.
    pub fn resolve(self, template_source: &str) -> Option<Self> {
        match self {
            Self::Off => None,
            Self::Auto if template_source.contains(THINK_END) => Some(Self::Qwen3),
            Self::Auto => None,
            p => Some(p),
        }
    }
}

/// Whether a rendered prompt leaves a think block open (the reply continues inside it).
pub fn prompt_opens_think(prompt: &str) -> bool {
    let tail = prompt.trim_end();
    tail.ends_with(THINK_START)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: a `<think>` opens reasoning, anything else is the answer.
    Start,
    /// Inside the think block; `at_start` while a `<think>` the model repeats may still come.
    Reasoning {
        at_start: bool,
    },
    Content,
}

/// Text of one piece of a reply, by kind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

/// One choice's splitter; see the module docs.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    state: State,
    /// Text not yet given out: it may be the beginning of a tag.
    held: String,
    reasoning_tokens: usize,
    /// Whether any reasoning text was seen (a reply without any reports none).
    saw_reasoning: bool,
}

/// The longest suffix of `text` that is a proper prefix of `tag` (text to hold back).
fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

impl ReasoningSplitter {
    pub fn new(parser: ReasoningParser, prompt_opens_think: bool) -> Self {
        let state = if parser == ReasoningParser::DeepSeekR1 || prompt_opens_think {
            State::Reasoning { at_start: true }
        } else {
            State::Start
        };
        Self {
            state,
            held: String::new(),
            reasoning_tokens: 0,
            saw_reasoning: false,
        }
    }

    /// Tokens generated inside the think block (tags included).
    pub fn reasoning_tokens(&self) -> usize {
        self.reasoning_tokens
    }

    /// Whether the reply had a think block (so `reasoning_content` is reported, even if empty).
    pub fn saw_reasoning(&self) -> bool {
        self.saw_reasoning
    }

    /// One token's text.
    pub fn push(&mut self, text: &str) -> Split {
        let before = self.state;
        self.held.push_str(text);
        let out = self.drain(false);
        let reasoning = matches!(before, State::Reasoning { .. })
            || matches!(self.state, State::Reasoning { .. })
            || (before == State::Start && self.state == State::Content && self.saw_reasoning);
        if reasoning && !text.is_empty() {
            self.reasoning_tokens += 1;
        }
        out
    }

    /// The end of the reply: text held back goes out as what it was taken for.
    pub fn finish(&mut self, text: &str) -> Split {
        let mut out = self.push(text);
        let rest = self.drain(true);
        out.reasoning.push_str(&rest.reasoning);
        out.content.push_str(&rest.content);
        out
    }

    fn drain(&mut self, at_end: bool) -> Split {
        let mut out = Split::default();
        loop {
            match self.state {
                State::Content => {
                    out.content.push_str(&std::mem::take(&mut self.held));
                    return out;
                }
                State::Start | State::Reasoning { at_start: true } => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(THINK_START) {
                        self.held = rest.to_string();
                        self.saw_reasoning = true;
                        self.state = State::Reasoning { at_start: false };
                        continue;
                    }
                    if !at_end && THINK_START.starts_with(trimmed) {
                        // All whitespace or the start of `<think>`: wait for more.
                        return out;
                    }
                    self.state = match self.state {
                        State::Start => State::Content,
                        _ => State::Reasoning { at_start: false },
                    };
                }
                State::Reasoning { at_start: false } => {
                    self.saw_reasoning = true;
                    if let Some(end) = self.held.find(THINK_END) {
                        out.reasoning.push_str(&self.held[..end]);
                        self.held = self.held[end + THINK_END.len()..].to_string();
                        self.state = State::Content;
                        continue;
                    }
                    let keep = if at_end {
                        0
                    } else {
                        partial_tag_suffix(&self.held, THINK_END)
                    };
                    let give = self.held.len() - keep;
                    out.reasoning.push_str(&self.held[..give]);
                    self.held.drain(..give);
                    return out;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole reply in one piece.
    fn whole(parser: ReasoningParser, opens: bool, reply: &str) -> (String, String, bool) {
        let mut s = ReasoningSplitter::new(parser, opens);
        let out = s.finish(reply);
        (out.reasoning, out.content, s.saw_reasoning())
    }

    /// Every way of cutting the reply into two and three pieces gives the same split as the
    /// whole (tags cut anywhere).
    fn same_when_streamed(parser: ReasoningParser, opens: bool, reply: &str) {
        let want = whole(parser, opens, reply);
        let cuts: Vec<usize> = (0..=reply.len())
            .filter(|&i| reply.is_char_boundary(i))
            .collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let mut s = ReasoningSplitter::new(parser, opens);
                let mut got = Split::default();
                for piece in [&reply[..a], &reply[a..b]] {
                    let o = s.push(piece);
                    got.reasoning += &o.reasoning;
                    got.content += &o.content;
                }
                let o = s.finish(&reply[b..]);
                got.reasoning += &o.reasoning;
                got.content += &o.content;
                assert_eq!(
                    (got.reasoning, got.content, s.saw_reasoning()),
                    want,
                    "{reply:?} cut at {a}, {b}"
                );
            }
        }
    }

    #[test]
    fn replies_split_at_the_think_tags() {
        use ReasoningParser::*;
        let r1 = "Let me think. 2+2=4.\n</think>\n\nThe answer is 4.";
        assert_eq!(
            whole(DeepSeekR1, false, r1),
            (
                "Let me think. 2+2=4.\n".into(),
                "\n\nThe answer is 4.".into(),
                true
            )
        );
        // R1 repeating the opening tag itself.
        let again = "<think>\nhmm</think>ok";
        assert_eq!(
            whole(DeepSeekR1, true, again),
            ("\nhmm".into(), "ok".into(), true)
        );
        // Qwen3: thinking when the reply opens the block, plain answers otherwise.
        assert_eq!(
            whole(Qwen3, false, "<think>a < b</think>yes"),
            ("a < b".into(), "yes".into(), true)
        );
        assert_eq!(
            whole(Qwen3, false, "Just an answer, <think> inside."),
            ("".into(), "Just an answer, <think> inside.".into(), false)
        );
        // The prompt opened the block (R1's template under any parser name).
        assert_eq!(
            whole(Qwen3, true, "step 1</think>done"),
            ("step 1".into(), "done".into(), true)
        );
        // A reply cut off while reasoning is all reasoning, with no content.
        assert_eq!(
            whole(DeepSeekR1, false, "still thinking </thi"),
            ("still thinking </thi".into(), "".into(), true)
        );
        for (p, opens, reply) in [
            (DeepSeekR1, false, r1),
            (DeepSeekR1, true, again),
            (Qwen3, false, "  <think>x</think>y"),
            (Qwen3, false, "<thinking is not a tag"),
            (Qwen3, false, "no tags at all"),
            (Qwen3, true, "é</think>ü</think>"),
        ] {
            same_when_streamed(p, opens, reply);
        }
    }

    #[test]
    fn reasoning_tokens_count_the_think_block() {
        let mut s = ReasoningSplitter::new(ReasoningParser::Qwen3, false);
        for t in ["<think>", "a", "b", "</think>", "c", "d"] {
            s.push(t);
        }
        assert_eq!(s.reasoning_tokens(), 4);
        let mut s = ReasoningSplitter::new(ReasoningParser::Qwen3, false);
        for t in ["plain", " answer"] {
            s.push(t);
        }
        assert_eq!(s.reasoning_tokens(), 0);
    }

    #[test]
    fn parsers_resolve_from_the_flag_and_the_template() {
        assert_eq!("deepseek-r1".parse(), Ok(ReasoningParser::DeepSeekR1));
        assert!("r1"
            .parse::<ReasoningParser>()
            .unwrap_err()
            .contains("qwen3"));
        let thinking = "{% if x %}<think>\n{% endif %}{{ c.split('</think>')[-1] }}";
        assert_eq!(
            ReasoningParser::Auto.resolve(thinking),
            Some(ReasoningParser::Qwen3)
        );
        assert_eq!(ReasoningParser::Auto.resolve("{{ messages }}"), None);
        assert_eq!(ReasoningParser::Off.resolve(thinking), None);
        assert_eq!(
            ReasoningParser::DeepSeekR1.resolve("{{ messages }}"),
            Some(ReasoningParser::DeepSeekR1)
        );
        assert!(prompt_opens_think("<｜Assistant｜><think>\n"));
        assert!(!prompt_opens_think("<think>x</think>\n"));
    }
}
