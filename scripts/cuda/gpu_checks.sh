#!/usr/bin/env bash
# On the GPU machine: every GPU check and benchmark, from a prebuilt binary, results into a
# folder. Needs no Rust and no network: the binary (scripts/cuda/build.sh), this repository's
# fixtures and configs, and optionally the default GGUF, a `gguf` wheel (for the
# transformers reference) and a tokenizer folder for the dummy 8B model.
#
#   scripts/cuda/gpu_checks.sh BIN OUT_DIR [STAGE ...]
#
# Stages (all of them by default, in this order):
#   kernels    the attention kernels (tensor-core and CUDA-core) against an f64 reference
#   sampler    the GPU sampler against the CPU sampler: greedy identical, seeded draws by a
#              chi-square test (ARBOR_SAMPLER_DRAWS per case, default 200000)
#   models     the GPU path against the CPU path (tiny fixtures, default model; bf16 and
#              quantized GGUF weights, the FP8 KV cache) and against transformers/PyTorch on
#              this GPU
#   linear     dense bf16 against GGUF block formats, the 8B shape's linear layers by batch
#   bench      decode by batch size and context, prefill by length (8B shape, bf16); the
#              tensor-core attention and the CUDA-core one
#   bench-gguf the default model's decode and prefill, GGUF weights in bf16 and quantized
#   reference  the reference workload through `arbor serve` (8B shape)
#   quick      a short decode/prefill run only
# Environment: ARBOR_GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf), ARBOR_GGUF_WHEEL
# (a gguf-*.whl put on PYTHONPATH), ARBOR_TOKENIZER (a Hugging Face folder whose tokenizer the
# dummy 8B model uses, so the reference context is ~7k real tokens), ARBOR_REF_REPEATS (2).
set -uo pipefail
BIN=${1:?usage: gpu_checks.sh BIN OUT_DIR [STAGE ...]}
OUT=${2:?usage: gpu_checks.sh BIN OUT_DIR [STAGE ...]}
shift 2
STAGES=${*:-kernels sampler models linear bench bench-gguf reference}
mkdir -p "$OUT"
# The CUDA user libraries live in the machine's PyTorch environment (shared/cuda/README.md).
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
if [ -n "$SP" ] && [ -d "$SP/nvidia" ]; then
    export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
fi
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
GGUF=${ARBOR_GGUF:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
status=0
run() {  # run NAME CMD...: log to OUT/NAME.log, remember failures, go on
    local name=$1; shift
    echo "== $name" >&2
    local t0=$SECONDS
    if ! "$@" > "$OUT/$name.log" 2>&1; then
        echo "FAILED: $name (see $name.log)" >&2
        tail -5 "$OUT/$name.log" >&2
        status=1
    fi
    echo "   $name: $((SECONDS - t0)) s" >&2
}
has() { [[ " $STAGES " == *" $1 "* ]]; }
DUMMY=(--device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192)

if has kernels; then
    run check-kernels "$BIN" gpu-check --kernels --json "$OUT/check-kernels.json"
fi
if has sampler; then
    run check-sampler "$BIN" gpu-check --sampler "${ARBOR_SAMPLER_DRAWS:-200000}" \
        --json "$OUT/check-sampler.json"
fi
if has models; then
    for m in tiny-llama tiny-qwen2; do
        run "check-$m" "$BIN" gpu-check --model "fixtures/$m" --transformers fixtures/tiny_logits.json \
            --json "$OUT/check-$m.json"
    done
    if [ -f "$GGUF" ]; then
        HF=()
        if [ -n "${ARBOR_GGUF_WHEEL:-}" ]; then
            for dt in float32 bfloat16; do
                base=(); [ "$dt" = bfloat16 ] && base=(--baseline "$OUT/hf-float32.json")
                PYTHONPATH="$ARBOR_GGUF_WHEEL${PYTHONPATH:+:$PYTHONPATH}" run "hf-$dt" python3 \
                    scripts/cuda/hf_reference.py --gguf "$GGUF" --fixture fixtures/llamacpp_smollm2.json \
                    --dtype $dt --out "$OUT/hf-$dt.json" "${base[@]}"
                [ -f "$OUT/hf-$dt.json" ] && HF+=(--hf-reference "$OUT/hf-$dt.json")
            done
        fi
        run check-smollm2 "$BIN" gpu-check --model "$GGUF" --fixture fixtures/llamacpp_smollm2.json \
            "${HF[@]}" --json "$OUT/check-smollm2.json"
        run check-smollm2-quantized "$BIN" gpu-check --quantized --model "$GGUF" \
            --fixture fixtures/llamacpp_smollm2.json "${HF[@]}" --json "$OUT/check-smollm2-quantized.json"
        run check-smollm2-kv-fp8 "$BIN" gpu-check --kv-fp8 --model "$GGUF" \
            --fixture fixtures/llamacpp_smollm2.json --json "$OUT/check-smollm2-kv-fp8.json"
    fi
fi
if has linear; then
    run linear-8b "$BIN" gpu-check --linear-bench configs/llama-3.1-8b.json --json "$OUT/linear-8b.json"
fi
if has bench; then
    run bench-8b "$BIN" engine-bench "${DUMMY[@]}" --batch 1,8,32,64 --context 512 --decode-tokens 64 \
        --prefill 2048,8192 --kv-slots 200000 --json "$OUT/bench-8b.json"
    run bench-8b-long "$BIN" engine-bench "${DUMMY[@]}" --batch 1,8 --context 8192 --decode-tokens 48 \
        --prefill 0 --kv-slots 200000 --json "$OUT/bench-8b-long.json"
    # A/B of one change at a time against the defaults above (batch 1, 4 and 8, short and long
    # contexts): cuBLAS instead of the GEMV kernel for one-row steps, the CUDA-core attention
    # kernels, fewer decode splits, decode without CUDA graphs, 64-key decode stages; then
    # where a step's time goes (--cuda-profile: a sync per section, so its sections add up to
    # more than an unprofiled step; profiled steps run launch by launch).
    AB=(--batch 1,4,8 --context 512,8192 --decode-tokens 40 --prefill 0 --kv-slots 200000)
    run ab-cublas "$BIN" engine-bench "${DUMMY[@]}" "${AB[@]}" --cuda-gemv off --json "$OUT/ab-cublas.json"
    run ab-cudacore "$BIN" engine-bench "${DUMMY[@]}" "${AB[@]}" --cuda-attention cuda-core \
        --prefill 2048,8192 --json "$OUT/ab-cudacore.json"
    run ab-splits1024 "$BIN" engine-bench "${DUMMY[@]}" "${AB[@]}" --cuda-decode-target-warps 1024 \
        --json "$OUT/ab-splits1024.json"
    run ab-nographs "$BIN" engine-bench "${DUMMY[@]}" "${AB[@]}" --cuda-graphs off \
        --json "$OUT/ab-nographs.json"
    run ab-stage64 "$BIN" engine-bench "${DUMMY[@]}" "${AB[@]}" --cuda-decode-stage-keys 64 \
        --json "$OUT/ab-stage64.json"
    run profile-8b "$BIN" engine-bench "${DUMMY[@]}" --cuda-profile --batch 1,64 --context 512 \
        --decode-tokens 24 --prefill 0 --kv-slots 200000
fi
if has bench-gguf && [ -f "$GGUF" ]; then
    for w in bf16 quantized; do
        run "bench-smollm2-$w" "$BIN" engine-bench --device cuda --model "$GGUF" --gguf-weights $w \
            --batch 1,8,64 --context 512 --decode-tokens 64 --prefill 2048 --json "$OUT/bench-smollm2-$w.json"
    done
fi
if has reference; then
    TOK=(); [ -n "${ARBOR_TOKENIZER:-}" ] && TOK=(--tokenizer "$ARBOR_TOKENIZER")
    SPAWN=()
    for a in "${DUMMY[@]}" "${TOK[@]}" --kv-slots 200000; do SPAWN+=("--spawn-arg=$a"); done
    run reference-8b "$BIN" bench --spawn "${SPAWN[@]}" --workload reference --repeats "${ARBOR_REF_REPEATS:-2}" \
        --out "$OUT/reference-8b.json" --html "$OUT/reference-8b.html"
fi
if has quick; then
    run bench-8b "$BIN" engine-bench "${DUMMY[@]}" --batch 1,8 --context 512 --decode-tokens 32 \
        --prefill 2048 --kv-slots 100000 --json "$OUT/bench-8b.json"
fi
exit $status
