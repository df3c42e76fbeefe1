#!/usr/bin/env bash
# The test command (README): fetches the default model if it is missing, then runs every test.
# Tests read committed fixtures (fixtures/) and the default model; no network beyond the fetch.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --bin arbor -- fetch-model >/dev/null
cargo test --workspace "$@"
