#!/usr/bin/env bash
# KV-aware routing measured: the same `arbor bench` workloads against one Arbor server, two
# Arbor workers behind Dynamo's KV router, and the same two behind round-robin routing.
#
#   bash scripts/dynamo/routing_bench.sh [OUT_DIR] [-- extra arbor bench flags]
#
# WORKLOADS="multi-turn" limits the workloads (default: multi-turn shared-prefix); TURNS
# (default 4) and SYSTEM_TOKENS (default 1000, shared by all conversations) shape them.
# Each deployment starts fresh (empty caches). Writes OUT_DIR/WORKLOAD-TARGET.json (every
# request) and OUT_DIR/report.txt (per-turn hit ratio, time to first token, and how many turns
# landed on the worker holding their conversation; scripts/dynamo/routing_report.py).
# Needs: bash scripts/dynamo/setup.sh, and cargo build --release --bin arbor.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-docs/results/dynamo-routing-$(date +%F)}
shift || true
[ "${1:-}" = "--" ] && shift
ARBOR=$PWD/target/release/arbor
mkdir -p "$OUT"
# Concurrency 4 over 8 conversations: conversations are spread over both workers, and each
# conversation's turns come back while others run.
# TURNS and SYSTEM_TOKENS change the conversations' shape.
COMMON=(--conversations 8 --turns "${TURNS:-4}" --system-tokens "${SYSTEM_TOKENS:-1000}"
    --concurrency 4 --repeats 2 --max-tokens 32 --groups 4 --prompts-per-group 4 "$@")
for workload in ${WORKLOADS:-multi-turn shared-prefix}; do
    echo "== $workload: one Arbor server" >&2
    "$ARBOR" bench --spawn --workload "$workload" "${COMMON[@]}" \
        --out "$OUT/$workload-single.json" >/dev/null
    for mode in kv round-robin; do
        echo "== $workload: two workers, Dynamo router $mode" >&2
        bash scripts/dynamo/deploy.sh --router-mode "$mode" -- \
            "$ARBOR" bench --target "dynamo-$mode=http://127.0.0.1:8000/v1,model=smollm2" \
            --workload "$workload" "${COMMON[@]}" --out "$OUT/$workload-$mode.json" >/dev/null
    done
done
rm -f "$OUT"/*.html
python3 scripts/dynamo/routing_report.py "$OUT"/*.json | tee "$OUT/report.txt"
