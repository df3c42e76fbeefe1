#!/usr/bin/env bash
# Call 2 (one H200): tensor parallelism through the server and the out-of-memory message.
# - `arbor serve -tp 2 --tp-one-gpu` (both ranks on the one GPU, summing through the host) on
#   Llama-3.1-8B's shape, multi-turn conversations in flight together through `arbor bench`:
#   batching, the prefix cache and streaming over the tensor-parallel runner; TP=1 alongside
#   (the host-staged sums make TP=2 on one GPU slow: this is a check, not a benchmark);
# - Llama-3.1-70B's shape at -tp 2 on one GPU: 141 GB of weights do not fit in 139 GiB, and
#   loading must say so clearly;
# - engine-bench --cuda-profile under -tp (the all-reduce phase).
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/r2; mkdir -p $R
t0=$SECONDS
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
# The profile's all-reduce phase under -tp (here the host-staged sums), and the tiny model's
# TP check again after the profiling change.
$B engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json -tp 2 --tp-one-gpu \
  --kv-slots 20000 --prefill 0 --context 512 --decode-tokens 8 --batch 1,8 --cuda-profile > $R/profile-tp2.log 2>&1
echo "profile tp2 rc=$?"; grep -iE "all_reduce|^decode" $R/profile-tp2.log | head -8
$B gpu-check --model fixtures/tiny-llama --tp 2 --json $R/tp2-tiny-llama.json > $R/tp2-tiny-llama.log 2>&1; echo "tiny-llama tp2 rc=$?"
tar czf $OUT/r2.tgz -C $OUT r2
