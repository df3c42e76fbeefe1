#!/usr/bin/env bash
# Installs what a local Dynamo deployment of Arbor needs (on Debian, as root):
#   - etcd and NATS from Debian (etcd-server, nats-server), protoc (protobuf-compiler), which
#     the etcd client crate needs to build, and libclang (libclang-dev), which NIXL's bindings
#     (a Dynamo dependency, built against a stub when NIXL itself is absent) need;
#   - Dynamo's frontend and KV router from PyPI (ai-dynamo==1.6.1) into .venv-dynamo. Its
#     dependency `aisimulate` is a stub that downloads from pypi.nvidia.com, unreachable from
#     many networks and used only by Dynamo's planner simulator, so ai-dynamo is installed
#     without it (its other dependencies listed here);
#   - the worker: integrations/arbor-dynamo (its own workspace: Dynamo's crates stay out of the
#     main build), built in release mode.
# Then: bash scripts/dynamo/deploy.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v etcd >/dev/null || ! command -v nats-server >/dev/null || ! command -v protoc >/dev/null \
    || ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server nats-server protobuf-compiler libclang-dev
fi
if [ ! -x .venv-dynamo/bin/python ]; then
    python3 -m venv .venv-dynamo
fi
.venv-dynamo/bin/pip install --quiet --disable-pip-version-check --no-deps \
    ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
.venv-dynamo/bin/pip install --quiet --disable-pip-version-check \
    "aiohttp>=3.14.3,<4" "certifi>=2026.10.19" "kubernetes>=32.0.1,<33" "msgspec>=0.19" \
    "prometheus-client>=0.23.1,<1" "pyzmq>=26" "redis>=6.2,<9" tqdm "transformers>=4.56" \
    "typing-extensions>=4.10" "zstandard>=0.23,<1" "uvloop>=0.21" "pydantic>=2.10.6,<=2.13.5"
cargo run --quiet --release --bin arbor -- fetch-model >/dev/null
cargo build --release --manifest-path integrations/arbor-dynamo/Cargo.toml
echo "ready: bash scripts/dynamo/deploy.sh"
