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

#[test]
fn an_empty_api_key_is_an_error_at_start() {
    // A stray comma in ARBOR_API_KEYS, or a blank --api-key, must not silently drop a key.
    for args in [
        &["serve", "--api-key", "a", "--api-key", "  "][..],
        &["serve", "--api-key", ""],
    ] {
        let err = arbor_err(args);
        assert!(err.contains("API key #") && err.contains("empty"), "{err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["serve", "--model", "/nonexistent.gguf"])
        .env("ARBOR_API_KEYS", "a,,b")
        .output()
        .expect("run arbor");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("API key #2 is empty"), "{err}");
    assert!(
        arbor_err(&["serve", "--max-seqs-per-request", "0"]).contains("at least 1"),
        "a zero bound is refused"
    );
}

#[test]
fn cuda_knobs_are_for_the_gpu() {
    let e = arbor_err(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--cuda-profile",
        "--prompt",
        "hi",
    ]);
    assert!(
        e.contains("--cuda-profile") && e.contains("need --device cuda"),
        "{e}"
    );
    let e = arbor_err(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--cuda-decode-target-warps",
        "0",
        "--prompt",
        "hi",
    ]);
    assert!(
        e.contains("--cuda-decode-target-warps must be at least 1"),
        "{e}"
    );
}

/// `arbor dynamo-worker` hands its arguments to the separately built worker, and says how to
/// build it when it is missing.
#[test]
fn dynamo_worker_forwards_or_says_how_to_build_it() {
    let run = |worker: &str| {
        Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["dynamo-worker", "--model", "m.gguf", "--help"])
            .env("ARBOR_DYNAMO_WORKER", worker)
            .output()
            .expect("run arbor")
    };
    let out = run("/bin/echo");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "--model m.gguf --help\n"
    );
    let out = run("/nonexistent/arbor-dynamo-worker");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("cannot start /nonexistent/arbor-dynamo-worker"),
        "{e}"
    );
    assert!(e.contains("bash scripts/dynamo/setup.sh"), "{e}");
}

/// `-tp N` (vLLM's and SGLang's spelling) is `--tensor-parallel-size N`; a size the model
/// cannot be cut into names the flag and the reason. tiny-llama has 4 heads.
#[test]
fn tensor_parallel_sizes_that_do_not_divide_the_heads_are_refused() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny-llama");
    for flag in [
        &["-tp", "3"][..],
        &["-tp=3"],
        &["--tensor-parallel-size", "3"],
    ] {
        let mut args = vec!["generate", "--model", model, "--prompt", "hi"];
        args.extend(flag);
        let e = arbor_err(&args);
        assert!(
            e.contains("--tensor-parallel-size 3 does not divide the model's 4 attention heads"),
            "{flag:?}: {e}"
        );
    }
    let e = arbor_err(&["generate", "--model", model, "-tp", "0", "--prompt", "hi"]);
    assert!(
        e.contains("--tensor-parallel-size must be at least 1"),
        "{e}"
    );
}
