#!/usr/bin/env bash
# Call C (one H200): the new default split rule (`DecodeTuning::target_warps`: about one wave
# of blocks for a bf16 cache, 4,096 warps for FP8 or past one wave) against the old fixed
# 4,096 (`--cuda-decode-target-warps 4096`), two alternating rounds of engine-bench, one
# serving run each; and the kernel checks, whose decode cases now split by the new rule.
set -u
cd "$(dirname "$0")/../../.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/c; mkdir -p $R
t0=$SECONDS
$B gpu-check --kernels --json $R/kernels.json > $R/kernels.log 2>&1; echo "kernels rc=$? $((SECONDS-t0))s"
python3 -c "
import json; d=json.load(open('$R/kernels.json')); print('failed', d['failed'], 'cases', len(d['cases']), 'worst', max(c['max_relative_error'] for c in d['cases']))"
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 400000 --decode-tokens 32 --prefill 0)
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print([(r.get('batch'), r.get('context'), round(r['step_ms'],3), round(r['tokens_per_s'],1)) for r in d['results']])" $1 2>&1 | tail -1; }
for round in 1 2; do for mode in auto 4096; do
  TW=(); [ $mode = 4096 ] && TW=(--cuda-decode-target-warps 4096)
  $B "${D[@]}" "${TW[@]}" --batch 1,32,64,128,256 --context 512 --json $R/short-$mode-$round.json > $R/short-$mode-$round.log 2>&1
  echo "$mode short round $round rc=$? $((SECONDS-t0))s"; summ $R/short-$mode-$round.json
  $B "${D[@]}" "${TW[@]}" --batch 1,8 --context 8192 --json $R/long-$mode-$round.json > $R/long-$mode-$round.log 2>&1
  echo "$mode long round $round rc=$? $((SECONDS-t0))s"; summ $R/long-$mode-$round.json
  $B "${D[@]}" "${TW[@]}" --batch 64 --context 2048 --json $R/mid-$mode-$round.json > $R/mid-$mode-$round.log 2>&1
  echo "$mode 64x2k round $round rc=$? $((SECONDS-t0))s"; summ $R/mid-$mode-$round.json
done; done
S=()
for a in --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 \
    --tokenizer fixtures/tiny-llama --kv-slots 300000; do S+=("--spawn-arg=$a"); done
for mode in auto 4096; do
  TW=(); [ $mode = 4096 ] && TW=(--spawn-arg=--cuda-decode-target-warps --spawn-arg=4096)
  $B bench --spawn "${S[@]}" "${TW[@]}" --workload multi-turn --turns 3 --system-tokens 2000 --max-tokens 128 --conversations 64 --concurrency 64 --out $R/mt64-$mode.json > $R/mt64-$mode.log 2>&1
  echo "multi-turn 64 $mode rc=$? $((SECONDS-t0))s"; grep -E "TTFT s|TPOT s|output tok/s" $R/mt64-$mode.log
done
rm -f $R/*.html; gzip -f $R/mt64-*.json
tar czf $OUT/c.tgz -C $OUT c
