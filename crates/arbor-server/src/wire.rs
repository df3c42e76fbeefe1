//! OpenAI's wire format for what the engine produces: finish reasons, usage, and
//! log-probabilities with each token's bytes (byte-level BPE pieces mapped back to bytes).

use arbor_engine::{FinishReason, TokenLogprob, Usage};
use serde_json::{json, Value};

use crate::AppState;

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

pub(crate) fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// The bytes a token stands for. Byte-level BPE pieces of a multi-byte character do not
/// decode alone, so they are mapped back through GPT-2's byte-to-character table.
pub(crate) fn token_bytes(st: &AppState, id: u32) -> Vec<u8> {
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
pub(crate) fn gpt2_char_to_byte(c: char) -> Option<u8> {
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

pub(crate) fn token_string(st: &AppState, id: u32) -> String {
    String::from_utf8_lossy(&token_bytes(st, id)).into_owned()
}

/// Chat logprobs entry: {"token", "logprob", "bytes", "top_logprobs": [...]}.
pub(crate) fn chat_logprob(st: &AppState, token: u32, lp: &TokenLogprob) -> Value {
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
pub(crate) struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub(crate) fn push(&mut self, st: &AppState, token: u32, lp: &TokenLogprob, offset: usize) {
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

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
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
