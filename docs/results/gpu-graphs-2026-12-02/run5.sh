#!/usr/bin/env bash
# Call 5: where a step's time goes (eager profile), linear layers by batch, profilers present?
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
B=gpu/arbor
R=$OUT/r5; mkdir -p $R
which nsys ncu nvprof 2>&1 | head; ls /usr/local/cuda*/bin 2>/dev/null | grep -i "nsys\|ncu" | head
$B gpu-check --linear-bench configs/llama-3.1-8b.json --json $R/linear.json > $R/linear.log 2>&1; echo "linear rc=$?"; grep -E "bf16" $R/linear.log | head -12
$B engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 0 --decode-tokens 16 --batch 1,64 --context 512,2048 --cuda-profile > $R/profile.log 2>&1; echo "profile rc=$?"; grep -E "profile|^decode" $R/profile.log
tar czf $OUT/r5.tgz -C $OUT r5
