#!/usr/bin/env bash
# Call 3 (one H200): what call 2's engine-bench runs missed (their 16 and 8 decode tokens left
# no full steps at batches 8 and 64), and the out-of-memory message without the backtrace.
# - sampling under -tp on rank 0's GPU against the host, batch 1 and 64, two alternating
#   rounds (ranks on one GPU summing through the host: only the difference means anything);
# - the profile's all-reduce phase at batch 1 and 8;
# - Llama-3.1-70B's shape at -tp 2 on one GPU: out of memory, said in one line.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/r3; mkdir -p $R
E=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json -tp 2 --tp-one-gpu --kv-slots 60000 --prefill 0 --context 512 --decode-tokens 32)
for round in 1 2; do for smp in device host; do
  $B "${E[@]}" --batch 1,64 --cuda-sampling $smp --json $R/sampling-$smp-$round.json > $R/sampling-$smp-$round.log 2>&1
  echo "tp2 sampling $smp round $round rc=$?"; grep -E "^decode|error" $R/sampling-$smp-$round.log
done; done
$B "${E[@]}" --batch 1,8 --cuda-profile > $R/profile-tp2.log 2>&1
echo "profile tp2 rc=$?"; grep -iE "all_reduce|^decode|error" $R/profile-tp2.log | head -8
$B generate --device cuda --load-format dummy --model configs/llama-3.1-70b.json -tp 2 --tp-one-gpu \
  --prompt hi --max-tokens 2 > $R/oom-70b.log 2>&1; echo "70b tp2 one gpu rc=$? (non-zero expected)"; cat $R/oom-70b.log | head -5
tar czf $OUT/r3.tgz -C $OUT r3
