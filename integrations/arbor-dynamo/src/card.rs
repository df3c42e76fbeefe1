//! A GGUF model as the Hugging Face folder Dynamo's model card reads.
//!
//! Dynamo's frontend tokenizes and applies the chat template itself, from the model card a
//! worker registers, and 1.6.1 builds that card only from a Hugging Face folder (`config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`). Arbor serves GGUF
//! files, which hold the same facts in their metadata; this writes them out as those files,
//! from the tokenizer and template Arbor itself uses, so the frontend's token ids are the ones
//! Arbor would produce for the same text. A Hugging Face folder is passed through unchanged.

use std::path::{Path, PathBuf};

use arbor_model::weights::gguf::open_gguf;
use serde_json::json;

/// The folder a GGUF file's card is written to by default: the same for every worker of the
/// same file (Dynamo's frontend accepts a model's workers only when their cards, paths
/// included, are equal), a different one for a different or changed file.
pub fn default_dir(model: &Path) -> anyhow::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let path =
        std::fs::canonicalize(model).map_err(|e| anyhow::anyhow!("{}: {e}", model.display()))?;
    let meta = std::fs::metadata(&path)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    meta.len().hash(&mut h);
    meta.modified().ok().hash(&mut h);
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    Ok(std::env::temp_dir().join(format!("arbor-dynamo-card-{stem}-{:016x}", h.finish())))
}

/// The folder to register for `model`: `model` itself when it is a folder, else a folder
/// written under `dir` from the GGUF file's metadata (its weights are not read).
pub fn hf_folder(model: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let gguf = open_gguf(model).map_err(|e| anyhow::anyhow!("{}: {e}", model.display()))?;
    let c = &gguf.config;
    let tok = &gguf.tokenizer;
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, value: &serde_json::Value| -> anyhow::Result<()> {
        // Written whole, then renamed: a reader (or another worker writing the same folder)
        // never sees half a file.
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    };
    // Every id that ends a reply (EOS and the end-of-turn tokens): Dynamo passes them to the
    // worker as `eos_token_ids`, and its detokenizer stops on them.
    let stops = &tok.stop_ids;
    write(
        "config.json",
        &json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": c.architecture,
            "bos_token_id": tok.bos_id,
            "eos_token_id": stops,
            "max_position_embeddings": c.max_position_embeddings,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads,
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
        }),
    )?;
    write(
        "generation_config.json",
        &json!({"bos_token_id": tok.bos_id, "eos_token_id": stops}),
    )?;
    let tokenizer: serde_json::Value = serde_json::from_str(&tok.to_json()?)?;
    write("tokenizer.json", &tokenizer)?;
    write(
        "tokenizer_config.json",
        &json!({
            "chat_template": gguf.chat_template.source(),
            "bos_token": tok.token_text(tok.bos_id),
            "eos_token": tok.token_text(tok.eos_id),
            "add_bos_token": tok.add_bos,
            "model_max_length": c.max_position_embeddings,
        }),
    )?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dynamo builds its model card from the folder (as the worker's registration does), and
    /// the card's tokenizer encodes as Arbor's own; its end-of-sequence ids are Arbor's stop
    /// ids and its template is the GGUF's.
    #[test]
    fn dynamo_reads_the_default_models_folder_as_arbor_reads_the_gguf() {
        use dynamo_llm::model_card::ModelDeploymentCard;

        let model = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            model.exists(),
            "`arbor fetch-model` fetches {}",
            model.display()
        );
        let dir = std::env::temp_dir().join(format!("arbor-card-test-{}", std::process::id()));
        let folder = hf_folder(&model, &dir).unwrap();
        let gguf = open_gguf(&model).unwrap();
        let card = ModelDeploymentCard::load_from_disk(&folder, None).unwrap();
        let tokenizer = card.tokenizer().unwrap();
        for text in [
            "Hello, world!",
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            "  leading spaces, ünïcödé, 12345 and tabs\t\tend",
        ] {
            let ours = gguf.tokenizer.encode(text, false).unwrap();
            let theirs = tokenizer.encode(text).unwrap().token_ids().to_vec();
            assert_eq!(ours, theirs, "{text:?}");
        }
        let info = card.model_info.as_ref().expect("the card has config.json");
        let mut eos = info.get_model_info().unwrap().eos_token_ids();
        eos.sort_unstable();
        assert_eq!(eos, gguf.tokenizer.stop_ids);
        assert!(eos.contains(&gguf.tokenizer.token_to_id("<|im_end|>").unwrap()));
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(folder.join("tokenizer_config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["chat_template"], gguf.chat_template.source());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
