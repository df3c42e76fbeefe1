#!/usr/bin/env bash
# Call 1: correctness of the decode graphs, then a quick A/B.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
xz -dkf gpu/smollm2-tok/tokenizer.json.xz
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
B=gpu/arbor
mkdir -p $OUT/r1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/r1/gpu.txt
t0=$SECONDS
$B gpu-check --kernels --json $OUT/r1/check-kernels.json > $OUT/r1/check-kernels.log 2>&1; echo "kernels rc=$? $((SECONDS-t0))s"
grep -c '"ok": false' $OUT/r1/check-kernels.json
for m in tiny-llama tiny-qwen2; do
  $B gpu-check --model fixtures/$m --transformers fixtures/tiny_logits.json --json $OUT/r1/check-$m.json > $OUT/r1/check-$m.log 2>&1; echo "$m rc=$? $((SECONDS-t0))s"
  grep -A3 '"decode_graphs"' $OUT/r1/check-$m.json; grep -A3 '"failures"' $OUT/r1/check-$m.json | head -5
done
D=(--device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 0 --context 512 --decode-tokens 32 --batch 1,8,64,256)
for g in on off; do
  $B engine-bench "${D[@]}" --cuda-graphs $g --json $OUT/r1/bench-$g.json > $OUT/r1/bench-$g.log 2>&1; echo "bench $g rc=$? $((SECONDS-t0))s"
  grep -iE "batch|tok/s" $OUT/r1/bench-$g.log | tail -6
done
