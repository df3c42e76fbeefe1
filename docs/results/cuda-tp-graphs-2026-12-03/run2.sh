#!/usr/bin/env bash
# Call 2 (one H200): after the review mends (the NCCL calls share one enqueue): the kernel
# checks, the NCCL round trip and gpu-check --tp 1 on the 8B shape (collectives captured in the
# decode graphs, bits equal to the one-GPU runner), and tiny-llama at TP=2 on the one GPU.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/r2; mkdir -p $R
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print(d['device'], 'worst rel', round(d['worst_relative_logit_difference'],5), 'greedy identical', d['greedy_identical'], '/', d['prompts'], 'failures', d['failures'])" $1; }
$B gpu-check --kernels --json $R/kernels.json > $R/kernels.log 2>&1; echo "kernels rc=$?"
$B gpu-check --nccl --json $R/nccl.json > $R/nccl.log 2>&1; echo "nccl rc=$?"
$B gpu-check --dummy --model configs/llama-3.1-8b.json --tp 1 --tokens 16 --json $R/tp1-8b.json > $R/tp1-8b.log 2>&1; echo "8b tp1 runner rc=$?"; summ $R/tp1-8b.json 2>&1 | tail -1
$B gpu-check --model fixtures/tiny-llama --tp 2 --json $R/tp2-tiny-llama.json > $R/tp2-tiny-llama.log 2>&1; echo "tiny-llama tp2 rc=$?"; summ $R/tp2-tiny-llama.json 2>&1 | tail -1
