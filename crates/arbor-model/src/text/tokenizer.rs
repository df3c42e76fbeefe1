//! Text <-> token ids, from a GGUF file's `tokenizer.ggml.*` metadata or a Hugging Face
//! `tokenizer.json`, on the `tokenizers` crate.
//!
//! A GGUF file carries the vocabulary, merges (or SentencePiece scores) and a pre-tokenizer name
//! but no `tokenizer.json`; [`gguf_tokenizer_json`] writes the equivalent `tokenizer.json` so one
//! well-tested implementation does the work for both kinds of model file.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::error::{ModelError, Result};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Texts of end-of-turn tokens that chat models emit instead of (or besides) their EOS token.
/// llama.cpp keeps the same list to decide what ends generation.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "</s>",
];

/// A tokenizer plus the special-token facts generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Prepend BOS when encoding a raw prompt (SentencePiece Llama models do; GPT-2 style BPE
    /// models such as SmolLM2 and Qwen2 do not).
    pub add_bos: bool,
    /// Tokens that end generation: EOS and the end-of-turn tokens the vocabulary has.
    pub stop_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("add_bos", &self.add_bos)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        add_bos: bool,
        extra_stop_ids: &[u32],
    ) -> Self {
        let mut stop_ids: Vec<u32> = eos_id
            .into_iter()
            .chain(extra_stop_ids.iter().copied())
            .collect();
        for text in END_OF_TURN_TEXTS {
            if let Some(id) = inner.token_to_id(text) {
                let special = inner
                    .get_added_tokens_decoder()
                    .get(&id)
                    .is_some_and(|t| t.special);
                if special {
                    stop_ids.push(id);
                }
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Self {
            inner,
            bos_id,
            eos_id,
            add_bos,
            stop_ids,
        }
    }

    /// A stand-in for models without a tokenizer (random `--load-format dummy` weights): one
    /// token per character, ids 0-127 the ASCII characters themselves (so different texts give
    /// different tokens, and a prompt's length in tokens is its length in characters), ids from
    /// 128 on the words `t128`, `t129`, ... that a random model may generate.
    pub fn placeholder(vocab: usize) -> Result<Self> {
        let mut words = serde_json::Map::new();
        for i in 0..vocab.max(128) {
            let word = if i < 128 {
                char::from(i as u8).to_string()
            } else {
                format!("t{i}")
            };
            words.insert(word, json!(i));
        }
        let spec = json!({
            "version": "1.0",
            "model": {"type": "WordLevel", "vocab": words, "unk_token": "?"},
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(?s)."}, "behavior": "Isolated", "invert": false},
            "decoder": {"type": "Fuse"},
        });
        let inner = spec
            .to_string()
            .parse::<tokenizers::Tokenizer>()
            .map_err(tok_err)?;
        Ok(Self::new(inner, None, None, false, &[]))
    }

    /// Number of ids the tokenizer can produce (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Largest id the tokenizer can produce.
    pub fn max_token_id(&self) -> u32 {
        let base = self.inner.get_vocab_size(false) as u32;
        self.inner
            .get_added_tokens_decoder()
            .keys()
            .copied()
            .chain(std::iter::once(base.saturating_sub(1)))
            .max()
            .unwrap_or(0)
    }

    /// Encodes text; special-token text such as `<|im_start|>` becomes its token. BOS is
    /// prepended when `add_bos` is set, the model wants it, and the text does not already start
    /// with it (chat templates often write it themselves).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        // `encode_fast` skips the character offsets, which nothing here reads: the same ids,
        // about a quarter less time on a long prompt (6.2 against 8.7 ms for 5.8k tokens).
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        if add_bos && self.add_bos {
            if let Some(bos) = self.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// The bytes a token stands for (what logprobs report as `bytes`). Byte-level BPE pieces
    /// of a multi-byte character do not decode alone, so they are mapped back through GPT-2's
    /// byte-to-character table; SentencePiece byte-fallback pieces (`<0xAB>`) are that byte.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let text = self.decode(&[id], false).unwrap_or_default();
        if !text.contains('\u{FFFD}') {
            return text.into_bytes();
        }
        let Some(piece) = self.id_to_token(id) else {
            return text.into_bytes();
        };
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
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

    /// Ids of the special (control) tokens: `<|im_start|>`, `<|eot_id|>`, ...
    pub fn special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_text(&self, id: Option<u32>) -> String {
        id.and_then(|i| self.inner.id_to_token(i))
            .unwrap_or_default()
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.binary_search(&id).is_ok()
    }

    /// The Hugging Face `tokenizer.json` of this tokenizer (for example to give a GGUF model's
    /// tokenizer to dummy-weight benchmarks with `--tokenizer`).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Loads a Hugging Face `tokenizer.json`, with `tokenizer_config.json` (if given) for BOS/EOS.
    pub fn from_hf_files(
        tokenizer_json: &std::path::Path,
        tokenizer_config: Option<&Value>,
        generation_eos: &[u32],
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        let named = |key: &str| -> Option<u32> {
            let v = tokenizer_config?.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(text)
        };
        let bos_id = named("bos_token");
        let eos_id = named("eos_token").or_else(|| generation_eos.first().copied());
        let add_bos = tokenizer_config
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
            // Llama 3's tokenizer.json adds BOS through its post-processor instead of this flag.
            .unwrap_or_else(|| post_processor_adds_bos(&inner, bos_id));
        Ok(Self::new(inner, bos_id, eos_id, add_bos, generation_eos))
    }
}

fn post_processor_adds_bos(inner: &tokenizers::Tokenizer, bos_id: Option<u32>) -> bool {
    let Some(bos) = bos_id else { return false };
    inner
        .encode("a", true)
        .map(|e| e.get_ids().first() == Some(&bos))
        .unwrap_or(false)
}

/// The GGUF tokenizer metadata Arbor reads.
pub struct GgufVocab<'a> {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: &'a str,
    /// `tokenizer.ggml.pre`: names the pre-tokenizer regex for BPE vocabularies.
    pub pre: Option<&'a str>,
    pub tokens: &'a [String],
    pub token_types: Option<&'a [i32]>,
    pub merges: Option<&'a [String]>,
    pub scores: Option<&'a [f32]>,
    pub unk_id: Option<u32>,
}

/// Writes the `tokenizer.json` equivalent of a GGUF vocabulary.
pub fn gguf_tokenizer_json(v: &GgufVocab) -> Result<Value> {
    let added: Vec<Value> = v
        .tokens
        .iter()
        .enumerate()
        .filter_map(|(id, text)| {
            let ty = v.token_types.and_then(|t| t.get(id)).copied()?;
            (ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED).then(|| {
                json!({
                    "id": id, "content": text, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
                })
            })
        })
        .collect();
    match v.model {
        "gpt2" => {
            let merges = v.merges.ok_or_else(|| {
                ModelError::MissingMetadata(
                    "tokenizer.ggml.merges (needed by a gpt2 tokenizer)".into(),
                )
            })?;
            let vocab: serde_json::Map<String, Value> = v
                .tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), json!(i)))
                .collect();
            let merges: Vec<Value> = merges
                .iter()
                .map(|m| {
                    let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
                    json!([a, b])
                })
                .collect();
            let (normalizer, pre_tokenizer) = bpe_pre_tokenizer(v.pre.unwrap_or("default"));
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": normalizer,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": merges,
                },
            }))
        }
        "llama" => {
            let scores = v.scores.ok_or_else(|| {
                ModelError::MissingMetadata(
                    "tokenizer.ggml.scores (needed by a llama tokenizer)".into(),
                )
            })?;
            let vocab: serde_json::Map<String, Value> = v
                .tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), json!(i)))
                .collect();
            let merges = sentencepiece_merges(v.tokens, scores);
            let unk = v
                .unk_id
                .and_then(|i| v.tokens.get(i as usize))
                .cloned()
                .unwrap_or_else(|| "<unk>".into());
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
                ]},
                "pre_tokenizer": null,
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                ]},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": unk,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab, "merges": merges,
                },
            }))
        }
        other => Err(ModelError::Tokenizer(format!(
            "unsupported GGUF tokenizer model {other:?} (supported: gpt2, llama)"
        ))),
    }
}

/// The regex splits of llama.cpp's named BPE pre-tokenizers (`llama-vocab.cpp`).
fn bpe_pre_tokenizer(pre: &str) -> (Value, Value) {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    match pre {
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]}),
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
        ),
        // SmolLM and StarCoder split every digit, then use GPT-2's regex.
        "smollm" | "starcoder" | "refact" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        _ => (Value::Null, byte_level(true)),
    }
}

/// Merges for a SentencePiece vocabulary, ranked by the score of the merged piece (the order in
/// which SentencePiece's BPE applies them). The same derivation as transformers' Llama converter.
fn sentencepiece_merges(tokens: &[String], scores: &[f32]) -> Vec<Value> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        for (split, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(split);
            if let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) {
                let score = scores.get(id).copied().unwrap_or(0.0);
                merges.push((score, ia, ib, a, b));
            }
        }
    }
    // Higher score merges first; ties broken by the pieces' ids like the converter does.
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    merges
        .into_iter()
        .map(|(_, _, _, a, b)| json!([a, b]))
        .collect()
}

/// Builds a [`Tokenizer`] from GGUF metadata.
pub fn tokenizer_from_gguf(
    v: &GgufVocab,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    extra_stop_ids: &[u32],
) -> Result<Tokenizer> {
    let json = gguf_tokenizer_json(v)?;
    let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json).map_err(tok_err)?)
        .map_err(tok_err)?;
    Ok(Tokenizer::new(
        inner,
        bos_id,
        eos_id,
        add_bos,
        extra_stop_ids,
    ))
}

/// Turns a growing list of generated ids into text deltas that are safe to print: a multi-byte
/// character split over tokens is held back until complete, and a SentencePiece leading space is
/// kept (decoding each token alone would drop it). The prefix/read offsets follow TGI.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = full.get(prefix.len()..).unwrap_or_default().to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others (0-32,
/// 127-160, 173) were shifted to U+0100 onwards in order.
pub fn gpt2_char_to_byte(c: char) -> Option<u8> {
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

#[cfg(test)]
mod tests {
    use super::gpt2_char_to_byte;

    #[test]
    fn placeholder_tokenizer_is_one_token_per_character() {
        let t = super::Tokenizer::placeholder(1000).unwrap();
        let ids = t.encode("ab a\n", false).unwrap();
        assert_eq!(ids, vec![97, 98, 32, 97, 10]);
        assert_eq!(t.decode(&ids, false).unwrap(), "ab a\n");
        assert_eq!(t.decode(&[500], false).unwrap(), "t500");
    }

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
