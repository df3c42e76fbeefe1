#!/usr/bin/env bash
# Call 2: the merge with fewer threads (one group of head_dim threads per 8 splits) against
# the binary of call 1 (the same tree but the merge's block size): kernel and model checks,
# then engine-bench in two alternating rounds.
set -u
cd "$(dirname "$0")/.."
for b in arbor arbor-before; do xz -dkf gpu/$b.xz && chmod +x gpu/$b; done
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
R=$OUT/r2; mkdir -p $R
gpu/arbor gpu-check --kernels --json $R/check-kernels.json > $R/check-kernels.log 2>&1; echo "kernels rc=$?"
python3 -c "
import json; d=json.load(open('$R/check-kernels.json')); print('failed', d['failed'])" 2>&1 | tail -2
grep -iE "worst|fail" $R/check-kernels.log | head -5
for m in tiny-llama tiny-qwen2; do
  gpu/arbor gpu-check --model fixtures/$m --transformers fixtures/tiny_logits.json --json $R/check-$m.json > $R/check-$m.log 2>&1; echo "$m rc=$?"
  python3 -c "import json; d=json.load(open('$R/check-$m.json')); print(d['decode_graphs'], d['worst_relative_logit_error'], d['failures'])"
done
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 0 --decode-tokens 32)
run() {  # run NAME BINARY ROUND ARGS...
  local name=$1 b=$2 round=$3; shift 3
  gpu/$b "${D[@]}" "$@" > $R/$name-$b-$round.log 2>&1; echo "$b $name round $round rc=$?"
  grep "^decode" $R/$name-$b-$round.log | sed 's/ (.*per sequence)//'
}
for round in 1 2; do
  for b in arbor-before arbor; do
    run b1-64-256x512 $b $round --batch 1,64,256 --context 512
    run b64x2k $b $round --batch 64 --context 2048
    run b8x8k $b $round --batch 8 --context 8192
  done
done
tar czf $OUT/r2.tgz -C $OUT r2
