//! Broken or unsupported model files are clear errors, never panics.

mod common;

use std::io::Write;
use std::path::Path;

use arbor_model::{Device, ModelError};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::Tensor;

fn load(path: &Path) -> ModelError {
    arbor_model::load_model(path, &Device::Cpu).expect_err("loading must fail")
}

#[test]
fn missing_file() {
    let e = load(Path::new("/nonexistent/model.gguf"));
    assert!(matches!(e, ModelError::NotFound(_)), "{e}");
    assert!(e.to_string().contains("/nonexistent/model.gguf"));
}

#[test]
fn truncated_file_names_the_missing_bytes() {
    let bytes = std::fs::read(common::default_model_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let half = dir.path().join("half.gguf");
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&half);
    assert!(matches!(e, ModelError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
    // Cut inside the header: reported as an invalid GGUF.
    let head = dir.path().join("head.gguf");
    std::fs::write(&head, &bytes[..5000]).unwrap();
    let e = load(&head);
    assert!(matches!(e, ModelError::BadGguf { .. }), "{e}");
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.gguf");
    std::fs::write(&p, "this is not a model").unwrap();
    assert!(matches!(load(&p), ModelError::BadGguf { .. }));
}

#[test]
fn unsupported_architecture_in_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bert.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let arch = Value::String("bert".into());
    let mut f = std::fs::File::create(&p).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
    drop(f);
    let e = load(&p);
    assert!(
        matches!(&e, ModelError::UnsupportedArchitecture(a) if a == "bert"),
        "{e}"
    );
}

/// A GGUF whose one tensor has type 16 (IQ2_XXS), which Arbor does not support.
#[test]
fn unsupported_quantization_type() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("iq.gguf");
    let mut b: Vec<u8> = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    let key = b"general.architecture";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key);
    b.extend(8u32.to_le_bytes()); // string
    b.extend(5u64.to_le_bytes());
    b.extend(b"llama");
    let name = b"token_embd.weight";
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name);
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(16u32.to_le_bytes()); // IQ2_XXS
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + 4096, 0);
    std::fs::File::create(&p).unwrap().write_all(&b).unwrap();
    let e = load(&p);
    assert!(matches!(e, ModelError::UnsupportedDType { .. }), "{e}");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn unsupported_architecture_in_hf_folder() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&common::fixtures().join("tiny-llama"), dir.path());
    edit_config(dir.path(), |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    let e = load(dir.path());
    assert!(
        matches!(&e, ModelError::UnsupportedArchitecture(a) if a == "GPT2LMHeadModel"),
        "{e}"
    );
}

#[test]
fn tokenizer_larger_than_the_model_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&common::fixtures().join("tiny-llama"), dir.path());
    edit_config(dir.path(), |c| c["vocab_size"] = serde_json::json!(1000));
    let e = load(dir.path());
    assert!(matches!(e, ModelError::TokenizerMismatch(_)), "{e}");
}

#[test]
fn missing_shard_and_truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&common::fixtures().join("tiny-qwen2"), dir.path());
    let shard = dir.path().join("model-00002-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(dir.path());
    assert!(
        e.to_string().contains("model-00002-of-00003.safetensors"),
        "{e}"
    );
    std::fs::remove_file(&shard).unwrap();
    let e = load(dir.path());
    assert!(matches!(e, ModelError::NotFound(_)), "{e}");
}

#[test]
fn dummy_model_tokenizer_larger_than_its_vocabulary() {
    // `--load-format dummy --tokenizer DIR` reads a tokenizer folder against a config's
    // vocabulary: a tokenizer with more ids than the embedding has rows is refused.
    let dir = common::fixtures().join("tiny-llama");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let e = arbor_model::weights::hf::open_tokenizer(&dir, &cfg, 10).unwrap_err();
    assert!(matches!(e, ModelError::TokenizerMismatch(_)), "{e}");
    let (tok, _) = arbor_model::weights::hf::open_tokenizer(&dir, &cfg, 1 << 20).unwrap();
    assert!(!tok.encode("hello world", false).unwrap().is_empty());
}
