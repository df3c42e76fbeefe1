#!/usr/bin/env bash
# A Dynamo deployment of Arbor on this machine, on loopback: etcd, NATS, N Arbor workers
# (arbor-dynamo-worker) on the default model, and Dynamo's OpenAI frontend with its router.
#
#   bash scripts/dynamo/deploy.sh [--router-mode kv|round-robin] [--workers 2] [--port 8000] \
#       [--frontend-arg ARG ...] [-- COMMAND ...]
#
# --frontend-arg passes one argument on to Dynamo's frontend (repeatable), e.g.
# --frontend-arg=--router-predicted-ttl-secs --frontend-arg=60.
#
# With a COMMAND, it runs once the frontend serves the model and everything stops after;
# without, the deployment runs until Ctrl-C. The COMMAND gets DYNAMO_URL (the frontend's
# /v1) and DYNAMO_RUN, the run's directory: logs, workerN.pid, and workerN.sh, which starts
# worker N again (for fault tests: kill -9 "$(cat "$DYNAMO_RUN/worker2.pid")", then
# bash "$DYNAMO_RUN/worker2.sh"). Set-up: bash scripts/dynamo/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=kv
WORKERS=2
PORT=8000
FRONTEND_ARGS=()
MODEL=${ARBOR_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
while [ $# -gt 0 ]; do
    case "$1" in
        --router-mode) MODE=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --frontend-arg) FRONTEND_ARGS+=("$2"); shift 2 ;;
        --frontend-arg=*) FRONTEND_ARGS+=("${1#--frontend-arg=}"); shift ;;
        --) shift; break ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
# The release build (setup.sh), or the test build (`cargo test` in integrations/arbor-dynamo,
# whose profile optimises the model's code), or ARBOR_DYNAMO_WORKER.
WORKER=${ARBOR_DYNAMO_WORKER:-integrations/arbor-dynamo/target/release/arbor-dynamo-worker}
if [ -z "${ARBOR_DYNAMO_WORKER:-}" ] && [ ! -x "$WORKER" ]; then
    WORKER=integrations/arbor-dynamo/target/debug/arbor-dynamo-worker
fi
for need in etcd nats-server .venv-dynamo/bin/python "$WORKER" "$MODEL"; do
    if ! command -v "$need" >/dev/null && [ ! -e "$need" ]; then
        echo "$need is missing: run bash scripts/dynamo/setup.sh" >&2
        exit 1
    fi
done
RUN=$(mktemp -d /tmp/arbor-dynamo.XXXXXX)
export DYNAMO_RUN=$RUN
echo "logs: $RUN" >&2
PIDS=()
stop() {
    # Workers first (a restarted one is known only by its pid file), the frontend, then
    # NATS and etcd.
    for f in "$RUN"/worker*.pid; do
        [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[i]}" 2>/dev/null || true; done
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
# Every plane on loopback (Dynamo binds the first non-loopback address by default).
export DYN_TCP_RPC_HOST=127.0.0.1 DYN_TCP_RESPONSE_STREAM_HOST=127.0.0.1 \
    DYN_EVENT_PLANE_HOST=127.0.0.1 DYN_SYSTEM_HOST=127.0.0.1 DYN_HTTP_HOST=127.0.0.1
# KV pool per worker (token slots; 22 KiB each on the default model): several workers share
# this machine's memory.
KV_SLOTS=${KV_SLOTS:-65536}
for _ in $(seq 50); do
    curl -sf http://127.0.0.1:2379/health >/dev/null && break
    sleep 0.2
done
for i in $(seq "$WORKERS"); do
    # Each worker's own start script: a restart appends to the same log and pid file.
    cat >"$RUN/worker$i.sh" <<EOF
ETCD_ENDPOINTS=$ETCD_ENDPOINTS NATS_SERVER=$NATS_SERVER DYN_TCP_RPC_HOST=127.0.0.1 \\
    DYN_TCP_RESPONSE_STREAM_HOST=127.0.0.1 DYN_EVENT_PLANE_HOST=127.0.0.1 DYN_SYSTEM_HOST=127.0.0.1 \\
    DYN_LOG=${DYN_LOG:-info,arbor_dynamo=debug} DYN_LOGGING_CONSOLE_FORMAT=jsonl \\
    setsid "$PWD/$WORKER" --model "$PWD/$MODEL" --served-model-name smollm2 --kv-slots $KV_SLOTS \\
    >>"$RUN/worker$i.log" 2>&1 &
echo \$! >"$RUN/worker$i.pid"
EOF
    bash "$RUN/worker$i.sh"
done
.venv-dynamo/bin/python -m dynamo.frontend --http-port "$PORT" --router-mode "$MODE" "${FRONTEND_ARGS[@]}" \
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
# Every worker registered (the frontend lists the model once the first one has).
for i in $(seq "$WORKERS"); do
    for _ in $(seq 100); do
        grep -q '"Serving smollm2 on' "$RUN/worker$i.log" && break
        sleep 0.2
    done
    if ! grep -q '"Serving smollm2 on' "$RUN/worker$i.log"; then
        echo "worker $i did not register; see $RUN/worker$i.log" >&2
        exit 1
    fi
done
sleep 1
if grep -q "Rejected incompatible workers" "$RUN/frontend.log"; then
    echo "the frontend rejected a worker (its model card differs); see $RUN/frontend.log" >&2
    exit 1
fi
echo "serving at $DYNAMO_URL (router: $MODE, $WORKERS Arbor workers)" >&2
if [ $# -gt 0 ]; then
    "$@"
else
    wait
fi
