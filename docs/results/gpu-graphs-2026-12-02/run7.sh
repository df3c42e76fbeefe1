#!/usr/bin/env bash
# Call 7: ncu on the decode attention at batch 64 x 2k tokens (launch by launch).
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
R=$OUT/r7; mkdir -p $R
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 0 --decode-tokens 12 --batch 64 --context 2048 --cuda-graphs off)
timeout 240 ncu --kernel-name regex:"attention_mma_decode|attention_merge|gemm|gemv|rmsnorm|silu|rope" --launch-skip 2000 --launch-count 40 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
  gpu/arbor "${D[@]}" > $R/ncu.txt 2>&1; echo "ncu rc=$?"
grep -E "^  [a-z_0-9]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Block Limit Shared|Registers Per|Stall" $R/ncu.txt | head -120
tar czf $OUT/r7.tgz -C $OUT r7
