#!/usr/bin/env bash
# A worker killed mid-run, then restarted, under load through Dynamo's KV router.
#
#   bash scripts/dynamo/deploy.sh -- bash scripts/dynamo/faults.sh [OUT_DIR]
#
# Runs `arbor bench --workload multi-turn` through the frontend; KILL_AT seconds in, kills
# worker 2 with SIGKILL (no goodbye to the router: as a crash or a lost machine); RESTART_AT
# seconds in, starts it again. Then reports, from the bench's records and the workers' logs:
# the requests that failed and when, what each worker served before the kill, while worker 2
# was down, and after its restart. Ten seconds after the restart, a second bench starts new
# conversations: the restarted worker's cache hits on their later turns show the router
# routed on its new event stream (which opens with AllBlocksCleared). Needs DYNAMO_URL and DYNAMO_RUN
# (deploy.sh sets them) and the workers logging requests (deploy.sh sets
# DYN_LOG=info,arbor_dynamo=debug).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DYNAMO_URL:?run under scripts/dynamo/deploy.sh}" "${DYNAMO_RUN:?}"
OUT=${1:-docs/results/dynamo-faults-$(date +%F)}
KILL_AT=${KILL_AT:-20}
RESTART_AT=${RESTART_AT:-45}
mkdir -p "$OUT"
start=$(date +%s.%N)
target/release/arbor bench --target "dynamo=$DYNAMO_URL,model=smollm2" --workload multi-turn \
    --conversations 24 --turns 4 --concurrency 4 --repeats 1 --max-tokens 32 \
    --request-timeout 60 --out "$OUT/faults.json" >"$OUT/bench.txt" 2>&1 &
bench=$!
sleep "$KILL_AT"
kill -9 "$(cat "$DYNAMO_RUN/worker2.pid")"
killed=$(date +%s.%N)
echo "worker 2 killed at $(echo "$killed - $start" | bc) s" | tee "$OUT/events.txt"
sleep $((RESTART_AT - KILL_AT))
bash "$DYNAMO_RUN/worker2.sh"
restarted=$(date +%s.%N)
echo "worker 2 restarted at $(echo "$restarted - $start" | bc) s" | tee -a "$OUT/events.txt"
# New conversations once the worker is back: worker 1 holds every prefix of the first bench,
# so the router keeps those conversations there; these have a system prompt of their own and
# find worker 2 the less loaded, and their later turns must find their prefixes there.
sleep 10
target/release/arbor bench --target "dynamo=$DYNAMO_URL,model=smollm2" --workload multi-turn \
    --conversations 4 --turns 3 --concurrency 2 --repeats 1 --max-tokens 32 --seed 1 \
    --request-timeout 60 --out "$OUT/after-restart.json" >"$OUT/bench-after-restart.txt" 2>&1 \
    || echo "the second arbor bench exited $?" | tee -a "$OUT/events.txt"
wait "$bench" || echo "arbor bench exited $?" | tee -a "$OUT/events.txt"
rm -f "$OUT"/*.html
cp "$DYNAMO_RUN"/worker*.log "$OUT/"
python3 scripts/dynamo/faults_report.py "$OUT" "$start" "$killed" "$restarted" | tee "$OUT/report.txt"
