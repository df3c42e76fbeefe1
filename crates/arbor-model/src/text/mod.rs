//! The text side of a model: its tokenizer with the incremental detokenizer ([`tokenizer`])
//! and its chat template ([`chat`]).

pub mod chat;
pub mod tokenizer;
