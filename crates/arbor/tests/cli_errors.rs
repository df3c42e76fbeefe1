//! Flags that make no sense together are refused with a clear message before any model is
//! loaded (the CPU build: the GPU-only flags).

use std::process::Command;

fn arbor_err(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(args)
        .output()
        .expect("run arbor");
    assert!(!out.status.success(), "arbor {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tokenizer_flag_needs_dummy_weights() {
    let e = arbor_err(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--tokenizer",
        "/nonexistent/tokenizer-dir",
        "--prompt",
        "hi",
    ]);
    assert!(
        e.contains("--tokenizer goes with --load-format dummy"),
        "{e}"
    );
}

#[test]
fn gguf_weights_flag_is_for_the_gpu() {
    let e = arbor_err(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--gguf-weights",
        "quantized",
        "--prompt",
        "hi",
    ]);
    assert!(e.contains("--gguf-weights is for --device cuda"), "{e}");
}

#[test]
fn dummy_weights_need_a_gpu() {
    let e = arbor_err(&[
        "engine-bench",
        "--load-format",
        "dummy",
        "--model",
        "configs/llama-3.1-8b.json",
    ]);
    assert!(e.contains("--load-format dummy needs --device cuda"), "{e}");
}
