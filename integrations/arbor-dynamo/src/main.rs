//! `arbor-dynamo-worker`: see the library's docs.

use std::sync::Arc;

use arbor_dynamo::{ArborWorker, Args};
use clap::Parser;

fn main() -> anyhow::Result<()> {
    // vLLM's two-letter `-tp N` / `-tp=N`, which clap's short flags cannot spell.
    let args = std::env::args_os().map(|a| match a.to_str() {
        Some("-tp") => "--tensor-parallel-size".into(),
        Some(t) if t.starts_with("-tp=") => format!("--tensor-parallel-size={}", &t[4..]).into(),
        _ => a,
    });
    let worker = ArborWorker::new(Args::parse_from(args));
    let config = worker.worker_config()?;
    dynamo_backend_common::run(Arc::new(worker), config)
}
