//! The GGUF tokenizer and chat template against llama.cpp and transformers on the default model.

mod common;

use arbor_model::ChatMessage;
use common::ids;

#[test]
fn tokenization_matches_llama_cpp_on_every_fixture_string() {
    let m = common::default_model();
    let fx = common::read_fixture("llamacpp_smollm2.json");
    let cases = common::cases(&fx, "tokenize", 24);
    let mut failures = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let got = m.tokenizer.encode(text, false).unwrap();
        if got != ids(&c["ids"]) {
            failures.push(format!(
                "{text:?}: arbor {got:?} llama.cpp {:?}",
                ids(&c["ids"])
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tokenization_matches_transformers_gguf_tokenizer() {
    let m = common::default_model();
    let fx = common::read_fixture("chat_templates.json");
    for c in common::cases(&fx, "hf_tokenize", 24) {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            m.tokenizer.encode(text, false).unwrap(),
            ids(&c["ids"]),
            "{text:?}"
        );
    }
}

#[test]
fn decoding_round_trips_the_fixture_strings() {
    let m = common::default_model();
    let fx = common::read_fixture("llamacpp_smollm2.json");
    for c in common::cases(&fx, "tokenize", 24) {
        let text = c["text"].as_str().unwrap();
        // Special tokens are kept in this decode so the text comes back whole.
        assert_eq!(m.tokenizer.decode(&ids(&c["ids"]), false).unwrap(), text);
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    let m = common::default_model();
    let fx = common::read_fixture("chat_templates.json");
    assert_eq!(m.chat_template.source(), fx["template"].as_str().unwrap());
    for r in common::cases(&fx, "renderings", 10) {
        let messages: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone()).unwrap();
        let gen = r["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            m.chat_template.render(&messages, gen).unwrap(),
            r["rendered"].as_str().unwrap(),
            "{messages:?}"
        );
    }
}

#[test]
fn special_tokens_and_stop_ids() {
    let t = &common::default_model().tokenizer;
    let im_end = t.token_to_id("<|im_end|>").unwrap();
    let eot = t.token_to_id("<|endoftext|>").unwrap();
    assert!(t.is_stop(im_end) && t.is_stop(eot));
    assert!(!t.is_stop(t.token_to_id("<|im_start|>").unwrap()));
    // SmolLM2's GGUF says add_bos_token = false.
    assert_eq!(
        t.encode("hi", true).unwrap(),
        t.encode("hi", false).unwrap()
    );
}
