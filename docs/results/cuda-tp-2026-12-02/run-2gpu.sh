#!/usr/bin/env bash
# For the first session lent two GPUs (kind nvidia-h200-x2): issue 15's benchmark in one call.
# Not yet run (no 2-GPU machine has been lent). Package gpu/ as for the other calls
# (gpu/arbor.xz from scripts/cuda/build.sh), then: run with carry ["gpu"], this script copied
# to gpu/.
# 1. gpu-check --tp 2 over NCCL (two GPUs): TP=2 against TP=1 on tiny-llama, tiny-qwen2 and
#    Llama-3.1-8B's shape.
# 2. Llama-3.1-70B's shape at TP=2: decode at batch 1, 8, 32, 64 (512-token contexts), batch 1
#    and 64 with CUDA graphs off (the collectives recorded in the graphs against launched one by
#    one) and with the overlap off (steps one at a time against overlapped), then with --cuda-profile for the all-reduce's share of a step (phases summed over
#    ranks; profiling runs the general pass).
# 3. The reference workload on the 70B shape at TP=2 (SmolLM2's tokenizer: ~6,900-token context).
# 4. Llama-3.1-8B's shape, TP=2 against TP=1 in the same call: batch-1 latency, batch-64 throughput.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/r2gpu; mkdir -p $R
t0=$SECONDS
nvidia-smi topo -m > $R/topo.txt 2>&1
for m in tiny-llama tiny-qwen2; do
  $B gpu-check --model fixtures/$m --tp 2 --json $R/tp2-$m.json > $R/tp2-$m.log 2>&1; echo "$m tp2 nccl rc=$?"
done
$B gpu-check --dummy --model configs/llama-3.1-8b.json --tp 2 --tokens 16 --json $R/tp2-8b.json > $R/tp2-8b.log 2>&1; echo "8b tp2 nccl rc=$? $((SECONDS-t0))s"
E=(engine-bench --device cuda --load-format dummy --max-batch-tokens 8192 --prefill 0 --context 512 --decode-tokens 32)
$B "${E[@]}" --model configs/llama-3.1-70b.json -tp 2 --kv-slots 100000 --batch 1,8,32,64 --json $R/bench-70b-tp2.json > $R/bench-70b-tp2.log 2>&1
echo "70b tp2 rc=$? $((SECONDS-t0))s"; grep -E "^decode" $R/bench-70b-tp2.log
$B "${E[@]}" --model configs/llama-3.1-70b.json -tp 2 --kv-slots 100000 --batch 1,64 --cuda-graphs off --json $R/bench-70b-tp2-nographs.json > $R/bench-70b-tp2-nographs.log 2>&1
echo "70b tp2 graphs off rc=$?"; grep -E "^decode" $R/bench-70b-tp2-nographs.log
$B "${E[@]}" --model configs/llama-3.1-70b.json -tp 2 --kv-slots 100000 --batch 1,64 --overlap off --json $R/bench-70b-tp2-serial.json > $R/bench-70b-tp2-serial.log 2>&1
echo "70b tp2 overlap off rc=$?"; grep -E "^decode" $R/bench-70b-tp2-serial.log
$B "${E[@]}" --model configs/llama-3.1-70b.json -tp 2 --kv-slots 100000 --batch 1,64 --cuda-profile > $R/profile-70b-tp2.log 2>&1
echo "70b tp2 profile rc=$?"; grep -iE "all_reduce|decode" $R/profile-70b-tp2.log | head -12
S=()
for a in --device cuda --load-format dummy --model configs/llama-3.1-70b.json -tp 2 --max-batch-tokens 8192 \
    --tokenizer fixtures/tiny-llama --kv-slots 100000; do S+=("--spawn-arg=$a"); done
$B bench --spawn "${S[@]}" --workload reference --repeats 3 --out $R/ref-70b-tp2.json > $R/ref-70b-tp2.log 2>&1
echo "70b reference rc=$? $((SECONDS-t0))s"; grep -iE "large|small|overall" $R/ref-70b-tp2.log | tail -8
for tp in 1 2; do
  $B "${E[@]}" --model configs/llama-3.1-8b.json -tp $tp --kv-slots 200000 --batch 1,64 --json $R/bench-8b-tp$tp.json > $R/bench-8b-tp$tp.log 2>&1
  echo "8b tp$tp rc=$?"; grep -E "^decode" $R/bench-8b-tp$tp.log
done
tar czf $OUT/r2gpu.tgz -C $OUT r2gpu
