#!/usr/bin/env bash
# A Dynamo deployment of Arbor on this machine, on loopback: etcd, NATS, N Arbor workers
# (arbor-dynamo-worker) on the default model, and Dynamo's OpenAI frontend with its router.
#
#   bash scripts/dynamo/deploy.sh [--router-mode kv|round-robin] [--workers 2] [--port 8000] \
#       [-- COMMAND ...]
#
# With a COMMAND, it runs once the frontend serves the model (DYNAMO_URL is set for it) and
# everything stops after; without, the deployment runs until Ctrl-C. Logs go to a temporary
# directory, printed at start. Set-up: bash scripts/dynamo/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=kv
WORKERS=2
PORT=8000
MODEL=${ARBOR_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
while [ $# -gt 0 ]; do
    case "$1" in
        --router-mode) MODE=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
WORKER=integrations/arbor-dynamo/target/release/arbor-dynamo-worker
for need in etcd nats-server .venv-dynamo/bin/python "$WORKER" "$MODEL"; do
    if ! command -v "$need" >/dev/null && [ ! -e "$need" ]; then
        echo "$need is missing: run bash scripts/dynamo/setup.sh" >&2
        exit 1
    fi
done
RUN=$(mktemp -d /tmp/arbor-dynamo.XXXXXX)
echo "logs: $RUN" >&2
PIDS=()
stop() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop EXIT
etcd --name arbor --data-dir "$RUN/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 >"$RUN/etcd.log" 2>&1 &
PIDS+=($!)
nats-server -js -a 127.0.0.1 -p 4222 -sd "$RUN/nats" >"$RUN/nats.log" 2>&1 &
PIDS+=($!)
export ETCD_ENDPOINTS=http://127.0.0.1:2379 NATS_SERVER=nats://127.0.0.1:4222
for _ in $(seq 50); do
    curl -sf http://127.0.0.1:2379/health >/dev/null && break
    sleep 0.2
done
for i in $(seq "$WORKERS"); do
    ARBOR_LOG=${ARBOR_LOG:-info} "$WORKER" --model "$MODEL" --served-model-name smollm2 \
        >"$RUN/worker$i.log" 2>&1 &
    PIDS+=($!)
done
.venv-dynamo/bin/python -m dynamo.frontend --http-port "$PORT" --router-mode "$MODE" \
    >"$RUN/frontend.log" 2>&1 &
PIDS+=($!)
export DYNAMO_URL="http://127.0.0.1:$PORT/v1"
for _ in $(seq 300); do
    if curl -sf "$DYNAMO_URL/models" | grep -q smollm2; then
        break
    fi
    sleep 0.5
done
if ! curl -sf "$DYNAMO_URL/models" | grep -q smollm2; then
    echo "the frontend does not serve the model after 150 s; see $RUN" >&2
    exit 1
fi
echo "serving at $DYNAMO_URL (router: $MODE, $WORKERS Arbor workers)" >&2
if [ $# -gt 0 ]; then
    "$@"
else
    wait
fi
