#!/usr/bin/env bash
# Call 9: the one-row GEMV as the default: model checks with the defaults, batch 1 and 64 A/B.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
B=gpu/arbor
R=$OUT/r9; mkdir -p $R
for m in tiny-llama tiny-qwen2; do
  $B gpu-check --model fixtures/$m --transformers fixtures/tiny_logits.json --json $R/check-$m.json > $R/check-$m.log 2>&1; echo "$m rc=$?"
  python3 -c "import json; d=json.load(open('$R/check-$m.json')); print(d['decode_graphs'], d['worst_relative_logit_error'], d['same_top1'], d['greedy_identical'], d['failures'])"
done
D=(--device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 2048 --decode-tokens 32 --batch 1,64 --context 512)
for v in on off; do
  $B engine-bench "${D[@]}" --cuda-gemv $v --json $R/bench-gemv-$v.json > $R/bench-gemv-$v.log 2>&1; echo "gemv $v rc=$?"; grep -E "^decode|^prefill" $R/bench-gemv-$v.log | sed 's/ (.*per sequence)//'
done
tar czf $OUT/r9.tgz -C $OUT r9
