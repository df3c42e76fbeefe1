#!/usr/bin/env bash
# Calls A and C (one H200; the default model travels in three parts, with calls A, B and C on
# the same machine, as 64 MiB travel per call with the tracked tree): call A runs this with
# SKIP_MODEL=1 after its own checks, call C with MODEL_ONLY=1 once the model is whole.
# - the default model (SmolLM2-135M-Instruct Q4_1, dequantized to bf16 on the GPU) against the
#   CPU path: with the bf16 cache (llama.cpp's greedy prompts), with the FP8 cache (the same
#   prompts, and random prompts of 5 to 1,000 tokens), the FP8 runs also against the GPU's
#   bf16 cache;
# - the reference workload through arbor serve (8B shape, SmolLM2's tokenizer), both caches;
# - 64 multi-turn conversations at concurrency 64 through arbor serve, both caches;
# - the default KV pool size of each cache on the 8B shape.
set -u
cd "$(dirname "$0")/../../.."
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
[ -x gpu/arbor ] || { xz -dkf gpu/arbor.xz && chmod +x gpu/arbor; }
B=gpu/arbor
R=$OUT/c; mkdir -p $R
t0=$SECONDS
M=models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p models
if [ -f gpu/m1 ] && [ -f gpu/m2 ] && [ -f gpu/m3 ]; then cat gpu/m1 gpu/m2 gpu/m3 > $M; fi
if [ "${SKIP_MODEL:-0}" = 1 ]; then
  echo "model checks left to the call that brings the model's last part"
elif [ -f $M ] && sha256sum $M | grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53; then
  summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print('vs cpu: worst rel', round(d['worst_relative_logit_error'],4), 'bound', d['bound'], 'top1', d['same_top1'], '/', d['prompts'], 'greedy identical', d['greedy_identical'], 'graphs', d['decode_graphs'], 'failures', d['failures'])
b=d.get('against_bf16_kv')
if b: print('vs bf16 cache: worst rel', round(b['worst_relative_logit_difference'],4), 'top1', b['same_top1'], 'greedy identical', b['greedy_identical'], [r['greedy_common_prefix'] for r in b['rows']])" $1 2>&1 | tail -2; }
  F=fixtures/llamacpp_smollm2.json
  $B gpu-check --model $M --fixture $F --json $R/check-bf16.json > $R/check-bf16.log 2>&1; echo "check bf16 rc=$? $((SECONDS-t0))s"; summ $R/check-bf16.json
  $B gpu-check --model $M --fixture $F --kv-fp8 --json $R/check-fp8.json > $R/check-fp8.log 2>&1; echo "check fp8 rc=$? $((SECONDS-t0))s"; summ $R/check-fp8.json
  $B gpu-check --model $M --kv-fp8 --json $R/check-fp8-random.json > $R/check-fp8-random.log 2>&1; echo "check fp8 random rc=$? $((SECONDS-t0))s"; summ $R/check-fp8-random.json
else
  echo "no default model here (a part missing): model checks skipped"
fi
# MODEL_ONLY=1: the model checks alone; SKIP_MODEL=1: everything else (run from call A).
if [ "${MODEL_ONLY:-0}" = 1 ]; then tar czf $OUT/c.tgz -C $OUT c; exit 0; fi
S=()
for a in --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 \
    --tokenizer fixtures/tiny-llama --kv-slots 200000; do S+=("--spawn-arg=$a"); done
ref() {  # ref CACHE
  $B bench --spawn "${S[@]}" --spawn-arg=--kv-cache-dtype --spawn-arg=$1 --workload reference --repeats 3 --out $R/ref-$1.json > $R/ref-$1.log 2>&1
  echo "ref $1 rc=$? $((SECONDS-t0))s"; grep -E "^(Test|LARGE|SMALL)" $R/ref-$1.log | tail -5
}
ref fp8
ref auto
mt() {
  $B bench --spawn "${S[@]}" --spawn-arg=--kv-cache-dtype --spawn-arg=$1 --workload multi-turn --turns 3 --system-tokens 2000 --max-tokens 128 --conversations 64 --concurrency 64 --out $R/mt64-$1.json > $R/mt64-$1.log 2>&1
  echo "multi-turn 64 $1 rc=$? $((SECONDS-t0))s"; grep -E "TTFT s|TPOT s|output tok/s" $R/mt64-$1.log
}
mt fp8
mt auto
for kv in auto fp8; do
  ARBOR_LOG=info $B engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --kv-cache-dtype $kv --prefill 0 --batch 1 --context 512 --decode-tokens 4 > $R/pool-$kv.log 2>&1
  echo "default pool $kv rc=$?"; grep -E "KV pool" $R/pool-$kv.log | head -2
done
gzip -f $R/*.json
tar czf $OUT/c.tgz -C $OUT c
