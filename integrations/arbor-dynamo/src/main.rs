//! `arbor-dynamo-worker`: see the library's docs.

use std::sync::Arc;

use arbor_dynamo::{ArborWorker, Args};
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let worker = ArborWorker::new(Args::parse());
    let config = worker.worker_config()?;
    dynamo_backend_common::run(Arc::new(worker), config)
}
