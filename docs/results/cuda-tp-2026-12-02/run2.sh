#!/usr/bin/env bash
# Call 2 (one H200): tensor parallelism through the server and the out-of-memory message.
# - `arbor serve -tp 2 --tp-one-gpu` (both ranks on the one GPU, summing through the host) on
#   Llama-3.1-8B's shape, multi-turn conversations in flight together through `arbor bench`:
#   batching, the prefix cache and streaming over the tensor-parallel runner; TP=1 alongside
#   (the host-staged sums make TP=2 on one GPU slow: this is a check, not a benchmark);
# - the one-rank NCCL round trip again (the NCCL calls now share one path);
# - Llama-3.1-70B's shape at -tp 2 on one GPU: 141 GB of weights do not fit in 139 GiB, and
#   loading must say so clearly;
# - sampling on rank 0's GPU against the host under -tp;
# - engine-bench --cuda-profile under -tp (the all-reduce phase);
# - gpu-check --tp again (greedy tokens now sampled on rank 0's GPU).
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/r2; mkdir -p $R
t0=$SECONDS
$B gpu-check --nccl --json $R/nccl.json > $R/nccl.log 2>&1; echo "nccl rc=$?"; grep -E "identical|failed" $R/nccl.log
serve() {  # serve NAME EXTRA-ARGS...
  local name=$1; shift
  local S=()
  for a in --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 \
      --tokenizer fixtures/tiny-llama --kv-slots 100000 "$@"; do S+=("--spawn-arg=$a"); done
  timeout 280 $B bench --spawn "${S[@]}" --workload multi-turn --turns 3 --system-tokens 2000 --max-tokens 64 \
    --conversations 16 --concurrency 16 --out $R/$name.json > $R/$name.log 2>&1
  echo "$name rc=$? $((SECONDS-t0))s"; grep -iE "tok/s|tpot|ttft|cached|error|fail" $R/$name.log | tail -8
}
serve tp2-one-gpu --tensor-parallel-size 2 --tp-one-gpu
serve tp1
timeout 240 $B generate --device cuda --load-format dummy --model configs/llama-3.1-70b.json -tp 2 --tp-one-gpu \
  --prompt hi --max-tokens 2 > $R/oom-70b.log 2>&1; echo "70b tp2 one gpu rc=$? (non-zero expected) $((SECONDS-t0))s"; tail -3 $R/oom-70b.log
# Sampling under -tp: on rank 0's GPU from the gathered logits (default) against the host
# (--cuda-sampling host), same binary, two alternating rounds; both through the host-staged
# sums of ranks sharing one GPU, so only the difference between them means anything.
for round in 1 2; do for smp in device host; do
  $B engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json -tp 2 --tp-one-gpu \
    --kv-slots 40000 --prefill 0 --context 512 --decode-tokens 16 --batch 1,64 --cuda-sampling $smp \
    --json $R/sampling-$smp-$round.json > $R/sampling-$smp-$round.log 2>&1
  echo "tp2 sampling $smp round $round rc=$?"; grep -E "^decode" $R/sampling-$smp-$round.log
done; done
# The profile's all-reduce phase under -tp (here the host-staged sums), and the tiny model's
# TP check again after the profiling change.
$B engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json -tp 2 --tp-one-gpu \
  --kv-slots 20000 --prefill 0 --context 512 --decode-tokens 8 --batch 1,8 --cuda-profile > $R/profile-tp2.log 2>&1
echo "profile tp2 rc=$?"; grep -iE "all_reduce|^decode" $R/profile-tp2.log | head -8
for m in tiny-llama tiny-qwen2; do
  $B gpu-check --model fixtures/$m --tp 2 --json $R/tp2-$m.json > $R/tp2-$m.log 2>&1; echo "$m tp2 rc=$?"
done
$B gpu-check --dummy --model docs/results/cuda-tp-2026-12-02/smollm2-135m.json --tokenizer fixtures/tiny-llama --tp 3 --json $R/tp3-smollm2.json > $R/tp3-smollm2.log 2>&1; echo "smollm2 tp3 rc=$?"
$B gpu-check --dummy --model configs/llama-3.1-8b.json --tp 2 --tokens 16 --json $R/tp2-8b.json > $R/tp2-8b.log 2>&1; echo "8b tp2 rc=$?"
for f in $R/tp*.json; do python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print(sys.argv[1].split('/')[-1], 'worst rel', round(d['worst_relative_logit_difference'],4), 'greedy identical', d['greedy_identical'], '/', d['prompts'], 'margins', [x['tp1_margin'] for x in d['diverged']], d['failures'])" $f; done
tar czf $OUT/r2.tgz -C $OUT r2
