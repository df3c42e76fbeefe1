#!/usr/bin/env bash
# On the GPU machine: the engine alone, two builds of arbor in the same run, alternated so
# that the machine's drift hits both alike (issue 12's "speed unchanged" check).
#
#   scripts/cuda/ab_engine.sh BEFORE_BIN AFTER_BIN OUT_DIR [ROUNDS]
#
# Each round runs `engine-bench` of the dummy 8B shape (bf16): decode at batch 1 and 32 over a
# 512-token context, and an 8k-token prefill, once per binary; OUT_DIR/ab.json collects every
# run and scripts/cuda/ab_summary.py prints the medians and their ratios.
set -euo pipefail
BEFORE=${1:?usage: ab_engine.sh BEFORE_BIN AFTER_BIN OUT_DIR [ROUNDS]}
AFTER=${2:?}
OUT=${3:?}
ROUNDS=${4:-3}
mkdir -p "$OUT"
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
if [ -n "$SP" ] && [ -d "$SP/nvidia" ]; then
    export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
fi
ARGS=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json
    --max-batch-tokens 8192 --batch 1,32 --context 512 --decode-tokens 64 --prefill 8192
    --kv-slots 100000)
for r in $(seq 1 "$ROUNDS"); do
    for which in before after; do
        bin=$BEFORE; [ "$which" = after ] && bin=$AFTER
        echo "== round $r: $which" >&2
        "$bin" "${ARGS[@]}" --json "$OUT/$which-$r.json" 2> "$OUT/$which-$r.log" > /dev/null
    done
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
