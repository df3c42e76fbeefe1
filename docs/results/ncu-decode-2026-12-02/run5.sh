#!/usr/bin/env bash
# Call 5: the decode attention bounded to 128 registers a thread (16 one-warp blocks an SM)
# against the binary of calls 2-4 (`arbor-before`, unbounded: 165 registers, 12 blocks):
# kernel checks (with a 32-head query group case), tiny models, ncu of the decode kernel,
# then engine-bench at stages 32 (default) and 16, two alternating rounds.
set -u
cd "$(dirname "$0")/.."
for b in arbor arbor-before; do xz -dkf gpu/$b.xz && chmod +x gpu/$b; done
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
R=$OUT/r5; mkdir -p $R
gpu/arbor gpu-check --kernels --json $R/check-kernels.json > $R/check-kernels.log 2>&1; echo "kernels rc=$?"
python3 -c "
import json; d=json.load(open('$R/check-kernels.json')); print('failed', d['failed'])" 2>&1 | tail -1
for m in tiny-llama tiny-qwen2; do
  gpu/arbor gpu-check --model fixtures/$m --transformers fixtures/tiny_logits.json --json $R/check-$m.json > $R/check-$m.log 2>&1; echo "$m rc=$?"
  python3 -c "import json; d=json.load(open('$R/check-$m.json')); print(d['decode_graphs'], d['worst_relative_logit_error'], d['failures'])"
done
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 0)
timeout 150 ncu --kernel-name regex:"attention_mma_decode" --launch-skip 900 --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
  gpu/arbor "${D[@]}" --decode-tokens 40 --batch 64 --context 2048 --cuda-graphs off > $R/ncu-attn.txt 2>&1; echo "ncu rc=$?"
grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit Reg|Block Limit Shared|Spilling Requests " $R/ncu-attn.txt | head -12
run() {  # run NAME BINARY ROUND ARGS...
  local name=$1 b=$2 round=$3; shift 3
  gpu/$b "${D[@]}" --decode-tokens 32 "$@" > $R/$name-$b-$round.log 2>&1; echo "$b $name round $round rc=$?"
  grep "^decode" $R/$name-$b-$round.log | sed 's/ (.*per sequence)//'
}
for round in 1 2; do
  for b in arbor-before arbor; do
    run s32 $b $round --batch 1,64 --context 512,2048
    run s16 $b $round --batch 64 --context 2048 --cuda-decode-stage-keys 16
    run b8x8k $b $round --batch 8 --context 8192
  done
done
tar czf $OUT/r5.tgz -C $OUT r5
