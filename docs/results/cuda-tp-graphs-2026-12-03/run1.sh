#!/usr/bin/env bash
# Call 1 (one H200): tensor-parallel decode steps on the decode path, their collectives recorded
# in the CUDA graphs.
# - kernel checks (now with the shard kernels: sliced embedding, logit join);
# - gpu-check --tp 1: the whole model through the tensor-parallel runner (one NCCL rank, its
#   all-reduces and all-gather captured in the decode graphs) against the one-GPU runner:
#   logits and greedy tokens must be identical; tiny Llama, SmolLM2-135M's shape and
#   Llama-3.1-8B's shape;
# - gpu-check --tp N with every rank on the one GPU (host-staged sums, so the decode path runs
#   launch by launch): the shards' decode path against TP=1, the models of the 12-02 call 1;
# - engine-bench on Llama-3.1-8B's shape: the one-GPU runner (this binary and the previous),
#   the tensor-parallel runner at one rank with graphs, and without.
set -u
cd "$(dirname "$0")/.."
for b in arbor arbor-before; do xz -dkf gpu/$b.xz && chmod +x gpu/$b; done
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/r1; mkdir -p $R
t0=$SECONDS
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $R/gpu.txt
$B gpu-check --kernels --json $R/kernels.json > $R/kernels.log 2>&1; echo "kernels rc=$?"
python3 -c "import json; d=json.load(open('$R/kernels.json')); print('failed', d['failed']); [print(c) for c in d['shard_kernels']]"
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print(d['device'], 'worst rel', round(d['worst_relative_logit_difference'],5), 'greedy identical', d['greedy_identical'], '/', d['prompts'], 'diverged', d['diverged'], 'failures', d['failures'])" $1; }
$B gpu-check --model fixtures/tiny-llama --tp 1 --json $R/tp1-tiny-llama.json > $R/tp1-tiny-llama.log 2>&1; echo "tiny-llama tp1 runner rc=$?"; summ $R/tp1-tiny-llama.json 2>&1 | tail -1
grep -iE "capture|warn" $R/tp1-tiny-llama.log | head -3
$B gpu-check --dummy --model docs/results/cuda-tp-2026-12-02/smollm2-135m.json --tokenizer fixtures/tiny-llama --tp 1 --json $R/tp1-smollm2.json > $R/tp1-smollm2.log 2>&1; echo "smollm2 tp1 runner rc=$?"; summ $R/tp1-smollm2.json 2>&1 | tail -1
$B gpu-check --dummy --model configs/llama-3.1-8b.json --tp 1 --tokens 16 --json $R/tp1-8b.json > $R/tp1-8b.log 2>&1; echo "8b tp1 runner rc=$? $((SECONDS-t0))s"; summ $R/tp1-8b.json 2>&1 | tail -1
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 0 --context 512 --decode-tokens 32 --batch 1,64)
run() { local name=$1; shift; "$@" --json $R/bench-$name.json > $R/bench-$name.log 2>&1; echo "$name rc=$? $((SECONDS-t0))s"; python3 -c "
import json; d=json.load(open('$R/bench-$name.json')); print(d['device'], [(r['batch'], round(r['step_ms'],3), round(r['tokens_per_s'],1)) for r in d['results'] if r['test']=='decode'])" 2>&1 | tail -1; tail -1 $R/bench-$name.log; }
for round in 1 2; do
  run before-$round gpu/arbor-before "${D[@]}"
  run plain-$round $B "${D[@]}"
  run tprunner-$round $B "${D[@]}" --tp-runner
  run tprunner-nographs-$round $B "${D[@]}" --tp-runner --cuda-graphs off
done
for m in tiny-llama tiny-qwen2; do for n in 2 4; do
  $B gpu-check --model fixtures/$m --tp $n --json $R/tp$n-$m.json > $R/tp$n-$m.log 2>&1; echo "$m tp$n rc=$?"; summ $R/tp$n-$m.json 2>&1 | tail -1
done; done
$B gpu-check --dummy --model docs/results/cuda-tp-2026-12-02/smollm2-135m.json --tokenizer fixtures/tiny-llama --tp 3 --json $R/tp3-smollm2.json > $R/tp3-smollm2.log 2>&1; echo "smollm2 tp3 rc=$?"; summ $R/tp3-smollm2.json 2>&1 | tail -1
$B gpu-check --dummy --model configs/llama-3.1-8b.json --tp 2 --tokens 16 --json $R/tp2-8b.json > $R/tp2-8b.log 2>&1; echo "8b tp2 rc=$? $((SECONDS-t0))s"; summ $R/tp2-8b.json 2>&1 | tail -1
tar czf $OUT/r1.tgz -C $OUT r1
