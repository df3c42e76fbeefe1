#!/usr/bin/env bash
# Call 1 (one H200): tensor parallelism on the CUDA backend, checked on one GPU.
# - a one-rank NCCL round trip (the binding loads libnccl.so.2 at run time);
# - TP=N against TP=1 on the GPU, every rank on the one GPU summing through the host
#   (NCCL refuses two ranks on one device): tiny Llama (4 heads, 2 KV heads) at 2 and 4,
#   tiny Qwen2 (1 KV head, QKV bias) at 2 and 4, SmolLM2-135M's shape (9 heads, 3 KV heads,
#   tied embeddings; random weights) at 3, Llama-3.1-8B's shape (random weights) at 2;
# - the clear error for -tp 2 without a second GPU;
# - the GPU checks against the CPU path (TP=1 now loads through the shard builder: the
#   digits must not move) and engine-bench TP=1 against the previous binary.
set -u
cd "$(dirname "$0")/.."
for b in arbor arbor-before; do xz -dkf gpu/$b.xz && chmod +x gpu/$b; done
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/r1; mkdir -p $R
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $R/gpu.txt
$B gpu-check --nccl --json $R/nccl.json > $R/nccl.log 2>&1; echo "nccl rc=$?"; tail -3 $R/nccl.log
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print(d['device'], 'worst rel', round(d['worst_relative_logit_difference'],5), 'greedy identical', d['greedy_identical'], '/', d['prompts'], 'diverged', d['diverged'], 'failures', d['failures'])" $1; }
for m in tiny-llama tiny-qwen2; do for n in 2 4; do
  $B gpu-check --model fixtures/$m --tp $n --json $R/tp$n-$m.json > $R/tp$n-$m.log 2>&1; echo "$m tp$n rc=$?"; summ $R/tp$n-$m.json 2>&1 | tail -1
done; done
$B gpu-check --dummy --model docs/results/cuda-tp-2026-12-02/smollm2-135m.json --tokenizer fixtures/tiny-llama --tp 3 --json $R/tp3-smollm2.json > $R/tp3-smollm2.log 2>&1; echo "smollm2 tp3 rc=$?"; summ $R/tp3-smollm2.json 2>&1 | tail -1
$B gpu-check --dummy --model configs/llama-3.1-8b.json --tp 2 --tokens 16 --json $R/tp2-8b.json > $R/tp2-8b.log 2>&1; echo "8b tp2 rc=$?"; summ $R/tp2-8b.json 2>&1 | tail -1
tail -2 $R/tp2-8b.log
$B generate --device cuda -tp 2 --model fixtures/tiny-llama --prompt hi --max-tokens 4 > $R/err-two-gpus.log 2>&1; echo "tp2 without a second GPU rc=$? (non-zero expected):"; tail -2 $R/err-two-gpus.log
$B generate --device cuda -tp 2 --tp-one-gpu --model fixtures/tiny-llama --prompt hi --max-tokens 4 > $R/gen-one-gpu.log 2>&1; echo "tp2 one gpu generate rc=$?"; tail -3 $R/gen-one-gpu.log
for m in tiny-llama tiny-qwen2; do
  $B gpu-check --model fixtures/$m --transformers fixtures/tiny_logits.json --json $R/check-$m.json > $R/check-$m.log 2>&1; echo "$m vs cpu rc=$?"
  python3 -c "import json; d=json.load(open('$R/check-$m.json')); print(d['decode_graphs'], d['worst_relative_logit_error'], d['failures'])"
done
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --prefill 2048 --context 512 --decode-tokens 32 --batch 1,64)
for b in arbor-before arbor; do gpu/$b "${D[@]}" --json $R/bench-$b.json > $R/bench-$b.log 2>&1; echo "$b bench rc=$?"; grep -iE "batch|prefill" $R/bench-$b.log | tail -4; done
tar czf $OUT/r1.tgz -C $OUT r1
