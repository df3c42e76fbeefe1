#!/usr/bin/env bash
# Call 4 (one H200): call 3's sampling A/B at batch 64 again, with the --max-batch-tokens 8192
# that call 3 left out (at the default, 64 prompts of 512 tokens prefill over so many steps that
# no step has all 64 decoding). Ranks on one GPU summing through the host: only the difference
# between the two sampling paths means anything.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/r4; mkdir -p $R
E=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json -tp 2 --tp-one-gpu --max-batch-tokens 8192 --kv-slots 60000 --prefill 0 --context 512 --decode-tokens 32 --batch 64)
for round in 1 2; do for smp in device host; do
  timeout 120 $B "${E[@]}" --cuda-sampling $smp --json $R/sampling-$smp-$round.json > $R/sampling-$smp-$round.log 2>&1
  echo "tp2 sampling $smp round $round rc=$?"; grep -E "^decode|error" $R/sampling-$smp-$round.log
done; done
tar czf $OUT/r4.tgz -C $OUT r4
