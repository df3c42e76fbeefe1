#!/usr/bin/env bash
# Call B (one H200): call A found 1,024 target warps (a split count that fills about one wave
# of resident one-warp blocks) faster than the default 4,096 at batch 8 x 8k and 64 x 2k and
# equal at batch 1. Here the larger batches, where 1,024 warps means one split a row: batch
# 32, 128 and 256 over 512 tokens, 128 over 2,048, and the FP8 cache at 64 x 2,048; target
# warps 1,024, 1,536 and 4,096, two alternating rounds.
set -u
cd "$(dirname "$0")/../../.."
[ -x gpu/arbor ] || { xz -dkf gpu/arbor.xz && chmod +x gpu/arbor; }
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/b; mkdir -p $R
t0=$SECONDS
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 400000 --decode-tokens 32 --prefill 0)
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print([(r.get('batch'), r.get('context'), round(r['step_ms'],3), round(r['tokens_per_s'],1)) for r in d['results']])" $1 2>&1 | tail -1; }
for round in 1 2; do
for tw in 1024 1536 4096; do
  $B "${D[@]}" --cuda-decode-target-warps $tw --batch 32,128,256 --context 512 --json $R/big-$tw-$round.json > $R/big-$tw-$round.log 2>&1
  echo "tw $tw big round $round rc=$? $((SECONDS-t0))s"; summ $R/big-$tw-$round.json
  $B "${D[@]}" --cuda-decode-target-warps $tw --batch 128 --context 2048 --json $R/b128-$tw-$round.json > $R/b128-$tw-$round.log 2>&1
  echo "tw $tw b128x2k round $round rc=$? $((SECONDS-t0))s"; summ $R/b128-$tw-$round.json
  $B "${D[@]}" --kv-cache-dtype fp8 --cuda-decode-target-warps $tw --batch 64 --context 2048 --json $R/fp8-$tw-$round.json > $R/fp8-$tw-$round.log 2>&1
  echo "tw $tw fp8 64x2k round $round rc=$? $((SECONDS-t0))s"; summ $R/fp8-$tw-$round.json
done
done
tar czf $OUT/b.tgz -C $OUT b
