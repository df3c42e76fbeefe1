//! Dynamo's conformance kit for `LLMEngine`s, run on Arbor with the default model: start,
//! generate (one and concurrent), cancellation within the kit's deadline, the terminal chunk
//! and its usage, KV event sources, metrics and cleanup (twice, and before start).

use std::path::PathBuf;

use arbor_dynamo::{ArborWorker, Args};
use clap::Parser;

fn model() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} missing: `arbor fetch-model` fetches it",
        path.display()
    );
    path
}

// A pool of two contexts: a request without max_tokens may use the whole context, as in
// `arbor serve`.
#[tokio::test(flavor = "multi_thread")]
async fn arbor_meets_dynamos_engine_contract() {
    let model = model();
    dynamo_backend_common::testing::run_conformance(|| {
        let args = Args::parse_from([
            "arbor-dynamo-worker",
            "--model",
            model.to_str().unwrap(),
            "--kv-slots",
            "16384",
        ]);
        ArborWorker::new(args)
    })
    .await
    .expect("conformance");
}
