#!/usr/bin/env bash
# Call A (one H200): how many splits the replayed decode attention should cut a row's keys
# into. Today's rule: splits = target warps / (rows x KV heads x query-head groups), up to one
# split per 16 keys, so one 8k-token row gets 512 splits of 16 keys, and the per-split partial
# results (written, then read by the merge) weigh half as much as the K/V they summarize.
# Sweep --cuda-decode-target-warps (which sets the split count of each batch size) over
# engine-bench's decode cases, dummy Llama-3.1-8B shape, bf16 cache (and FP8 at two points).
set -u
cd "$(dirname "$0")/../../.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/a; mkdir -p $R
t0=$SECONDS
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --decode-tokens 32 --prefill 0)
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print([(r.get('batch'), r.get('context'), round(r['step_ms'],3), round(r['tokens_per_s'],1)) for r in d['results']])" $1 2>&1 | tail -1; }
for round in 1 2; do
for tw in 256 512 1024 2048 4096; do
  $B "${D[@]}" --cuda-decode-target-warps $tw --batch 1,8 --context 8192 --json $R/long-$tw-$round.json > $R/long-$tw-$round.log 2>&1
  echo "tw $tw long round $round rc=$? $((SECONDS-t0))s"; summ $R/long-$tw-$round.json
  $B "${D[@]}" --cuda-decode-target-warps $tw --batch 1,64 --context 512,2048 --json $R/short-$tw-$round.json > $R/short-$tw-$round.log 2>&1
  echo "tw $tw short round $round rc=$? $((SECONDS-t0))s"; summ $R/short-$tw-$round.json
done
done
for tw in 512 4096; do
  $B "${D[@]}" --kv-cache-dtype fp8 --cuda-decode-target-warps $tw --batch 1,8 --context 8192 --json $R/fp8-long-$tw.json > $R/fp8-long-$tw.log 2>&1
  echo "fp8 tw $tw long rc=$? $((SECONDS-t0))s"; summ $R/fp8-long-$tw.json
done
tar czf $OUT/a.tgz -C $OUT a
