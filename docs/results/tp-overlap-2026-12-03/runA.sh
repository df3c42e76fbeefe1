#!/usr/bin/env bash
# Call A (one H200): the tensor-parallel runner's steps overlapped (launch hands the step to the
# rank threads and returns; collect waits for their answer).
# - gpu-check --tp 1 (one NCCL rank, collectives in the decode graphs) and --tp 2 (both ranks on
#   the one GPU, sums through the host) on tiny-llama, --tp 1 on a dummy SmolLM2 shape and --tp 2
#   on the dummy 8B shape: each now also compares greedy and seeded tokens with the overlap on
#   and off;
# - engine-bench on Llama-3.1-8B's shape (dummy bf16) through the tensor-parallel runner at one
#   NCCL rank, overlap on against off in two alternating rounds, batch 1, 64 and 256 over
#   512-token contexts; the one-GPU runner beside it for scale.
set -u
cd "$(dirname "$0")/../../.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/a; mkdir -p $R
t0=$SECONDS
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print(d['device'], 'worst rel', round(d['worst_relative_logit_difference'],5), 'greedy identical', d['greedy_identical'], '/', d['prompts'], 'overlap on=off', d['identical_with_and_without_overlap'], '/', d['overlap_runs'], 'diverged', d['diverged'], 'failures', d['failures'])" $1; }
for n in 1 2; do
  $B gpu-check --model fixtures/tiny-llama --tp $n --json $R/tp$n-tiny-llama.json > $R/tp$n-tiny-llama.log 2>&1; echo "tiny-llama tp$n rc=$? $((SECONDS-t0))s"; summ $R/tp$n-tiny-llama.json 2>&1 | tail -1
done
$B gpu-check --dummy --model docs/results/cuda-tp-2026-12-02/smollm2-135m.json --tokenizer fixtures/tiny-llama --tp 1 --json $R/tp1-smollm2.json > $R/tp1-smollm2.log 2>&1; echo "smollm2 tp1 rc=$? $((SECONDS-t0))s"; summ $R/tp1-smollm2.json 2>&1 | tail -1
$B gpu-check --dummy --model configs/llama-3.1-8b.json --tokenizer fixtures/tiny-llama --tp 2 --tokens 24 --json $R/tp2-8b.json > $R/tp2-8b.log 2>&1; echo "8b tp2 rc=$? $((SECONDS-t0))s"; summ $R/tp2-8b.json 2>&1 | tail -1
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --decode-tokens 48 --prefill 0 --context 512)
eb() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print([(r.get('batch'), round(r['step_ms'],3), round(r['forward_ms'],3), round(r['tokens_per_s'],1)) for r in d['results']])" $1 2>&1 | tail -1; }
for round in 1 2; do for ov in on off; do
  $B "${D[@]}" --tp-runner --overlap $ov --batch 1,64,256 --json $R/tp-$ov-$round.json > $R/tp-$ov-$round.log 2>&1
  echo "tp runner overlap $ov round $round rc=$? $((SECONDS-t0))s"; eb $R/tp-$ov-$round.json
done; done
$B "${D[@]}" --batch 1,64,256 --json $R/one-gpu.json > $R/one-gpu.log 2>&1
echo "one-GPU runner rc=$? $((SECONDS-t0))s"; eb $R/one-gpu.json
tar czf $OUT/a.tgz -C $OUT a
