#!/usr/bin/env bash
# One device call: the GPU checks against the CPU path (after the CPU forward pass became
# shard-aware for tensor parallelism: the digits must not move), then ncu on the tensor-core
# decode attention and its merge in pure batch-64 decode steps at 2,048 tokens.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/r1; mkdir -p $R
for m in tiny-llama tiny-qwen2; do
  $B gpu-check --model fixtures/$m --transformers fixtures/tiny_logits.json --json $R/check-$m.json > $R/check-$m.log 2>&1; echo "$m rc=$?"
  python3 -c "import json; d=json.load(open('$R/check-$m.json')); print(d['decode_graphs'], d['worst_relative_logit_error'], d['failures'])"
done
# 64 prompts of 2,048 tokens fill in 16 steps of 8,192 tokens (mixed steps once the first
# sequences decode): at most ~16 x 32 decode-attention launches before the pure decode steps,
# then 40 tokens x 32 layers of them. Skipping 900 lands inside the pure batch-64 steps.
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 0 --decode-tokens 40 --batch 64 --context 2048 --cuda-graphs off)
S=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section SourceCounters)
timeout 200 ncu --kernel-name regex:"attention_mma_decode" --launch-skip 900 --launch-count 4 "${S[@]}" $B "${D[@]}" > $R/ncu-attn.txt 2>&1; echo "ncu attn rc=$?"
timeout 150 ncu --kernel-name regex:"attention_merge" --launch-skip 900 --launch-count 2 "${S[@]}" $B "${D[@]}" > $R/ncu-merge.txt 2>&1; echo "ncu merge rc=$?"
grep -E "^  [a-z_0-9]+.*\(|Grid Size|Block Size|Duration|DRAM Throughput|Memory Throughput|L1/TEX Hit|L2 Hit|Achieved Occupancy|Theoretical Occupancy|Block Limit|Registers Per|Dynamic Shared|Stall|Issued Warp|No Eligible|Eligible Warps" $R/ncu-attn.txt | head -80
grep -E "^  [a-z_0-9]+.*\(|Duration|DRAM Throughput|Achieved Occupancy" $R/ncu-merge.txt | head -12
tar czf $OUT/r1.tgz -C $OUT r1
