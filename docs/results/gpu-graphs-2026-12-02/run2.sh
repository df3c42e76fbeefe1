#!/usr/bin/env bash
# Call 2: kernel checks with the decode stages, graphs identity, decode stage A/B.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
xz -dkf gpu/smollm2-tok/tokenizer.json.xz
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
B=gpu/arbor
R=$OUT/r2; mkdir -p $R
t0=$SECONDS
$B gpu-check --kernels --json $R/check-kernels.json > $R/check-kernels.log 2>&1; echo "kernels rc=$? $((SECONDS-t0))s"
python3 -c "
import json; d=json.load(open('$R/check-kernels.json'))
print('failed', d['failed'], 'cases', len(d['cases']))
for c in d['cases']:
    if c.get('replayed_plan') or not c['ok']: print(c['kernel'], c['heads'], c['head_dim'], c['replayed_plan'], c['decode_stage_keys'], '%.2e'%c['max_relative_error'], c['ok'])
"
for m in tiny-llama tiny-qwen2; do
  $B gpu-check --model fixtures/$m --transformers fixtures/tiny_logits.json --json $R/check-$m.json > $R/check-$m.log 2>&1; echo "$m rc=$? $((SECONDS-t0))s"
  python3 -c "import json; d=json.load(open('$R/check-$m.json')); print(d['decode_graphs'], d['worst_relative_logit_error'], d['failures'])"
done
D=(--device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 0 --decode-tokens 32)
for round in 1 2; do
for st in 64 32 16; do
  $B engine-bench "${D[@]}" --cuda-decode-stage-keys $st --batch 1,64 --context 512,2048 --json $R/bench-s$st-$round.json > $R/bench-s$st-$round.log 2>&1
  echo "stage $st round $round rc=$? $((SECONDS-t0))s"; grep "^decode" $R/bench-s$st-$round.log | sed 's/bandwidth.*//'
done
done
$B engine-bench "${D[@]}" --batch 1,8 --context 8192 --json $R/bench-long.json > $R/bench-long.log 2>&1; echo "long rc=$?"; grep "^decode" $R/bench-long.log
$B engine-bench "${D[@]}" --batch 1,8 --context 8192 --cuda-decode-stage-keys 64 --json $R/bench-long64.json > $R/bench-long64.log 2>&1; echo "long64 rc=$?"; grep "^decode" $R/bench-long64.log
