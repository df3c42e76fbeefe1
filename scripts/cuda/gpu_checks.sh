#!/usr/bin/env bash
# On the GPU machine: every GPU check and benchmark, from a prebuilt binary, results into a
# folder. Needs no Rust and no network: the binary (scripts/cuda/build.sh), this repository's
# fixtures and configs, and optionally the default GGUF.
#
#   scripts/cuda/gpu_checks.sh BIN OUT_DIR [quick]
#
# Results: OUT_DIR/check-*.json (GPU against CPU, and against transformers' logits),
# OUT_DIR/bench-8b.json (decode by batch size, prefill by length, Llama-3.1-8B shape, bf16),
# OUT_DIR/reference-8b.json (the reference workload through the server), *.log.
set -uo pipefail
BIN=${1:?usage: gpu_checks.sh BIN OUT_DIR [quick]}
OUT=${2:?usage: gpu_checks.sh BIN OUT_DIR [quick]}
MODE=${3:-full}
mkdir -p "$OUT"
# The CUDA user libraries live in the machine's PyTorch environment (shared/cuda/README.md).
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
if [ -n "$SP" ] && [ -d "$SP/nvidia" ]; then
    export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
fi
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
status=0
run() {  # run NAME CMD...: log to OUT/NAME.log, remember failures, go on
    local name=$1; shift
    echo "== $name" >&2
    if ! "$@" > "$OUT/$name.log" 2>&1; then
        echo "FAILED: $name (see $name.log)" >&2
        tail -5 "$OUT/$name.log" >&2
        status=1
    fi
}
# 1. Correctness: the attention kernels against a float reference; the GPU path against the
#    CPU path, and against transformers' logits.
run check-kernels "$BIN" gpu-check --kernels --json "$OUT/check-kernels.json"
for m in tiny-llama tiny-qwen2; do
    run "check-$m" "$BIN" gpu-check --model "fixtures/$m" --transformers fixtures/tiny_logits.json \
        --json "$OUT/check-$m.json"
done
if [ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    run check-smollm2 "$BIN" gpu-check --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --fixture fixtures/llamacpp_smollm2.json --json "$OUT/check-smollm2.json"
fi
# 2. Speed on the Llama-3.1-8B shape (random bf16 weights made on the GPU).
DUMMY=(--device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192)
if [ "$MODE" = quick ]; then
    run bench-8b "$BIN" engine-bench "${DUMMY[@]}" --batch 1,8 --context 512 --decode-tokens 32 \
        --prefill 2048 --kv-slots 100000 --json "$OUT/bench-8b.json"
else
    run bench-8b "$BIN" engine-bench "${DUMMY[@]}" --batch 1,8,32,64 --context 512 --decode-tokens 64 \
        --prefill 2048,8192 --kv-slots 200000 --json "$OUT/bench-8b.json"
    # 3. The reference workload through the HTTP server (context sized on the stand-in tokenizer).
    SPAWN=()
    for a in "${DUMMY[@]}" --kv-slots 200000; do SPAWN+=("--spawn-arg=$a"); done
    run reference-8b "$BIN" bench --spawn "${SPAWN[@]}" --workload reference --repeats 2 \
        --out "$OUT/reference-8b.json" --html "$OUT/reference-8b.html"
fi
exit $status
