#!/usr/bin/env bash
# Builds `arbor` with the CUDA backend (and the GPU test binaries) on this machine, for the
# GPU machine: target/cuda/release/arbor. The first build takes about 10 minutes (nvcc compiles
# candle's kernels); the CPU build (plain `cargo build`) needs none of this.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/env.sh
cargo build --release --features cuda --bin arbor "$@"
echo "built $CARGO_TARGET_DIR/release/arbor" >&2
