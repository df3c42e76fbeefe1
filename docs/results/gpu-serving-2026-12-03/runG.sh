#!/usr/bin/env bash
# Call G (one H200): the tensor-parallel runner after this session's sampler changes (launch and
# collect split; a draw's counter advancing when its row is packed), which it shares:
# gpu-check --tp 1 (one NCCL rank, the collectives in its decode graphs) and --tp 2 (both ranks
# on the one GPU, sums through the host) on tiny-llama, and --tp 1 on a dummy SmolLM2 shape.
set -u
cd "$(dirname "$0")/../../.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/g; mkdir -p $R
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print(d['device'], 'worst rel', round(d['worst_relative_logit_difference'],5), 'greedy identical', d['greedy_identical'], '/', d['prompts'], 'diverged', d['diverged'], 'failures', d['failures'])" $1; }
for n in 1 2; do
  $B gpu-check --model fixtures/tiny-llama --tp $n --json $R/tp$n-tiny-llama.json > $R/tp$n-tiny-llama.log 2>&1; echo "tiny-llama tp$n rc=$?"; summ $R/tp$n-tiny-llama.json 2>&1 | tail -1
done
$B gpu-check --dummy --model docs/results/cuda-tp-2026-12-02/smollm2-135m.json --tokenizer fixtures/tiny-llama --tp 1 --json $R/tp1-smollm2.json > $R/tp1-smollm2.log 2>&1; echo "smollm2 tp1 rc=$?"; summ $R/tp1-smollm2.json 2>&1 | tail -1
tar czf $OUT/g.tgz -C $OUT g
