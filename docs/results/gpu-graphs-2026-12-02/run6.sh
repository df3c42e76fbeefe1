#!/usr/bin/env bash
# Call 6: one-row decode steps through Arbor's GEMV launched as programmatic dependents.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
B=gpu/arbor
R=$OUT/r6; mkdir -p $R
$B gpu-check --kernels --json $R/check-kernels.json > $R/check-kernels.log 2>&1; echo "kernels rc=$?"
python3 -c "
import json; d=json.load(open('$R/check-kernels.json')); print('failed', d['failed']); print([ (g['rows'], g['out'], g['in'], '%.1e'%g['max_relative_difference']) for g in d['gemv']])"
for m in tiny-llama tiny-qwen2; do
  $B gpu-check --model fixtures/$m --transformers fixtures/tiny_logits.json --json $R/check-$m.json > $R/check-$m.log 2>&1; echo "$m rc=$?"
  python3 -c "import json; d=json.load(open('$R/check-$m.json')); print(d['decode_graphs'], d['worst_relative_logit_error'], d['failures'])"
done
D=(--device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 0 --decode-tokens 48 --batch 1,2 --context 512,4096)
for round in 1 2; do
  for v in cublas gemv; do
    X=(); [ $v = gemv ] && X=(--cuda-gemv)
    $B engine-bench "${D[@]}" "${X[@]}" --json $R/b1-$v-$round.json > $R/b1-$v-$round.log 2>&1; echo "$v round $round rc=$?"; grep "^decode" $R/b1-$v-$round.log | sed 's/ (.*per sequence)//'
  done
done
grep -i "capture\|warn" $R/*.log | head -5
tar czf $OUT/r6.tgz -C $OUT r6
