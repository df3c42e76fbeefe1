#!/usr/bin/env bash
# Calls E1-E3 (one H200, after call D on the same machine): the default model travels in three
# parts (gpu/m1, m2, m3: 64 MiB travel per call with the tracked tree); the call that finds all
# three runs `gpu-check --kv-fp8` on it with both binaries of call D: the scaled and the
# unscaled FP8 cache against the CPU path and against the GPU's bf16 cache, on llama.cpp's
# greedy prompts and on random prompts of 5 to 1,000 tokens.
set -u
cd "$(dirname "$0")/../../../.."
ls -la gpu/ | grep -E " m[123]$|arbor" || true
[ -f gpu/m1 ] && [ -f gpu/m2 ] && [ -f gpu/m3 ] || { echo "model parts missing: checks wait for the last part"; exit 0; }
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
for b in arbor arbor-unscaled; do [ -x gpu/$b ] || { xz -dkf gpu/$b.xz && chmod +x gpu/$b; }; done
R=$OUT/e; mkdir -p $R
t0=$SECONDS
M=models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p models && cat gpu/m1 gpu/m2 gpu/m3 > $M
sha256sum $M | grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 || { echo "model checksum mismatch"; exit 1; }
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print('vs cpu: worst rel', round(d['worst_relative_logit_error'],4), 'bound', d['bound'], 'top1', d['same_top1'], '/', d['prompts'], 'greedy identical', d['greedy_identical'], 'failures', d['failures'])
b=d.get('against_bf16_kv')
if b: print('vs bf16 cache: worst rel', round(b['worst_relative_logit_difference'],4), 'top1', b['same_top1'], 'greedy identical', b['greedy_identical'], [r['greedy_common_prefix'] for r in b['rows']])" $1 2>&1 | tail -2; }
for b in arbor arbor-unscaled; do
  gpu/$b gpu-check --model $M --fixture fixtures/llamacpp_smollm2.json --kv-fp8 --json $R/fixture-$b.json > $R/fixture-$b.log 2>&1; echo "fixture prompts $b rc=$? $((SECONDS-t0))s"; summ $R/fixture-$b.json
  gpu/$b gpu-check --model $M --kv-fp8 --json $R/random-$b.json > $R/random-$b.log 2>&1; echo "random prompts $b rc=$? $((SECONDS-t0))s"; summ $R/random-$b.json
done
tar czf $OUT/e.tgz -C $OUT e
