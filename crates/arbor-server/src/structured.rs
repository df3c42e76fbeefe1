//! Structured output: replies constrained to a JSON schema (or any JSON object) by
//! llguidance, the constrained-decoding library vLLM, SGLang and llama.cpp use.
//!
//! The server builds llguidance's view of the tokenizer once (a trie over every token's
//! bytes, special tokens marked as such), compiles a request's schema in the handler (a
//! schema it cannot compile is a 400 naming the problem, before anything is queued), and
//! hands the engine a [`arbor_engine::ConstraintFactory`]: each sequence gets its own matcher,
//! which says before every sampling step which tokens keep the reply a valid prefix, and
//! follows each token drawn. The sampler (CPU or GPU) bans the others.
//!
//! End of sequence: llguidance knows one EOS token; when it allows it, every stop token of
//! the model is allowed (chat models end turns with `<|im_end|>`, `<|eot_id|>`, ...), and a
//! stop token drawn is fed to it as its EOS.

use std::sync::{Arc, Mutex, OnceLock};

use arbor_engine::{Constraint, ConstraintFactory};
use arbor_model::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

/// The tokenizer as llguidance sees it.
struct TokenizerView {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenizerView {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tokenizer
            .encode(&String::from_utf8_lossy(s), false)
            .unwrap_or_default()
    }
}

/// The bytes a token adds to the text: a SentencePiece piece has its `▁` as a space
/// (decoding one token alone would drop it); others are what `Tokenizer::token_bytes` says
/// (byte-fallback pieces included).
fn token_bytes(tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
    match tokenizer.id_to_token(id) {
        Some(piece) if piece.contains('\u{2581}') => piece.replace('\u{2581}', " ").into_bytes(),
        _ => tokenizer.token_bytes(id),
    }
}

/// Whitespace between JSON tokens: at most one line break and 40 spaces or tabs per gap, so a
/// model that would pad forever cannot (llguidance's default is any amount, and the default
/// model, sampled, fills hundreds of tokens with blank lines); enough for JSON pretty-printed
/// 20 levels deep.
pub const JSON_WHITESPACE: &str = r"\x0D?\x0A[\x20\x09]{0,40}|[\x20\x09]{1,40}";

/// `schema` with [`JSON_WHITESPACE`] unless it sets llguidance's options itself.
pub fn bounded_whitespace(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// The server's structured-output machinery, built on first use (a trie over the
/// vocabulary takes a moment; servers that never see a schema never pay it).
pub struct Structured {
    tokenizer: Arc<Tokenizer>,
    /// The model's vocabulary (masks cover it; the tokenizer's may be smaller).
    vocab: usize,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl Structured {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize) -> Self {
        Self {
            tokenizer,
            vocab,
            factory: OnceLock::new(),
        }
    }

    fn eos(&self) -> u32 {
        self.tokenizer
            .eos_id
            .or_else(|| self.tokenizer.stop_ids.first().copied())
            .unwrap_or(0)
    }

    fn factory(&self) -> Result<Arc<ParserFactory>, String> {
        self.factory
            .get_or_init(|| {
                let tok = &self.tokenizer;
                let n = self.vocab.max(tok.vocab_size());
                let special = tok.special_ids();
                let words: Vec<Vec<u8>> = (0..n as u32)
                    .map(|id| {
                        if special.binary_search(&id).is_ok() || id as usize >= tok.vocab_size() {
                            let name = tok.id_to_token(id).unwrap_or_else(|| format!("<[{id}]>"));
                            let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                            w.extend_from_slice(name.as_bytes());
                            w
                        } else {
                            token_bytes(tok, id)
                        }
                    })
                    .collect();
                let info = TokRxInfo::new(n as u32, self.eos());
                let trie = TokTrie::from(&info, &words);
                let env: TokEnv = Arc::new(TokenizerView {
                    trie,
                    tokenizer: tok.clone(),
                });
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.set_stderr_log_level(0);
                Ok(Arc::new(factory))
            })
            .clone()
    }

    /// A constraint for replies that follow `schema` (`None`: any JSON object). An error
    /// says why the schema cannot be used.
    pub fn json(&self, schema: Option<&Value>) -> Result<Arc<dyn ConstraintFactory>, String> {
        let schema = schema
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"type": "object"}));
        let grammar = TopLevelGrammar::from_json_schema(bounded_whitespace(schema));
        self.grammar(grammar)
    }

    /// A constraint for replies of a Lark grammar (as llguidance reads it).
    pub fn lark(&self, grammar: &str) -> Result<Arc<dyn ConstraintFactory>, String> {
        self.grammar(TopLevelGrammar::from_lark(grammar.to_string()))
    }

    /// A constraint for replies matching a regular expression (whole).
    pub fn regex(&self, regex: &str) -> Result<Arc<dyn ConstraintFactory>, String> {
        self.grammar(TopLevelGrammar::from_regex(regex))
    }

    /// A constraint for replies that are exactly one of `choices`.
    pub fn choice(&self, choices: &[String]) -> Result<Arc<dyn ConstraintFactory>, String> {
        // Lark's string literals take JSON's quoting.
        let alternatives: Vec<String> = choices
            .iter()
            .map(|c| serde_json::to_string(c).expect("a string serializes"))
            .collect();
        self.lark(&format!("start: {}", alternatives.join(" | ")))
    }

    fn grammar(&self, grammar: TopLevelGrammar) -> Result<Arc<dyn ConstraintFactory>, String> {
        let factory = self.factory()?;
        let parser = factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let mut matcher = Matcher::new(Ok(parser));
        // Compile errors surface at the first mask; find them now, not mid-generation.
        matcher.compute_mask().map_err(|e| e.to_string())?;
        Ok(Arc::new(GrammarFactory {
            prototype: Mutex::new(matcher),
            eos: self.eos(),
            stop_ids: self.tokenizer.stop_ids.clone(),
        }))
    }
}

/// A compiled grammar: each sequence gets a copy of the matcher in its start state.
struct GrammarFactory {
    prototype: Mutex<Matcher>,
    eos: u32,
    stop_ids: Vec<u32>,
}

impl std::fmt::Debug for GrammarFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarFactory")
    }
}

impl ConstraintFactory for GrammarFactory {
    fn start(&self) -> Box<dyn Constraint> {
        let matcher = self
            .prototype
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deep_clone();
        Box::new(GrammarConstraint {
            matcher,
            eos: self.eos,
            stop_ids: self.stop_ids.clone(),
        })
    }
}

/// An llguidance error's first line (the rest is a dump of the parser's state, no use to a
/// client).
fn first_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().to_string()
}

struct GrammarConstraint {
    matcher: Matcher,
    eos: u32,
    stop_ids: Vec<u32>,
}

impl std::fmt::Debug for GrammarConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarConstraint")
    }
}

impl Constraint for GrammarConstraint {
    fn allowed(&mut self, allowed: &mut [u32]) -> Result<(), String> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        let words = mask.as_slice();
        let n = allowed.len().min(words.len());
        allowed[..n].copy_from_slice(&words[..n]);
        // Bits past the model's vocabulary in the last word stay clear.
        if mask.is_allowed(self.eos) {
            for &t in &self.stop_ids {
                if let Some(w) = allowed.get_mut(t as usize / 32) {
                    *w |= 1 << (t % 32);
                }
            }
        }
        Ok(())
    }

    fn accept(&mut self, token: u32) -> Result<(), String> {
        let token = if self.stop_ids.contains(&token) {
            self.eos
        } else {
            token
        };
        self.matcher
            .consume_token(token)
            .map_err(|e| first_line(&e))
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
