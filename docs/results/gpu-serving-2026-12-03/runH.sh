#!/usr/bin/env bash
# Call H (one H200): the final tree (commit 133e841's engine mend: collected rows keep their
# index) on the GPU path: gpu-check on tiny-llama (seeded tokens with overlap on and off, graphs
# on and off), and 64 multi-turn conversations through `arbor serve` (bf16, overlap on).
set -u
cd "$(dirname "$0")/../../.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/h; mkdir -p $R
$B gpu-check --model fixtures/tiny-llama --transformers fixtures/tiny_logits.json --json $R/check-tiny-llama.json > $R/check-tiny-llama.log 2>&1; echo "check rc=$?"
python3 -c "
import json,sys; d=json.load(open(sys.argv[1])); print('worst rel', round(d['worst_relative_logit_error'],4), 'top1', d['same_top1'], '/', d['prompts'], 'graphs', d['decode_graphs'], 'failures', d['failures'])" $R/check-tiny-llama.json
S=()
for a in --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 \
    --tokenizer fixtures/tiny-llama --kv-slots 300000; do S+=("--spawn-arg=$a"); done
$B bench --spawn "${S[@]}" --workload multi-turn --turns 3 --system-tokens 2000 --max-tokens 128 --conversations 64 --concurrency 64 --out $R/mt64.json > $R/mt64.log 2>&1
echo "multi-turn 64 rc=$?"; grep -E "TTFT s|TPOT s|output tok/s" $R/mt64.log
rm -f $R/*.html; gzip -f $R/mt64.json
tar czf $OUT/h.tgz -C $OUT h
