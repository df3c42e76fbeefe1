#!/usr/bin/env bash
# Call 3: serving through arbor serve (multi-turn, 3 turns, 2,000 system tokens, 128-token
# answers) with the merge change against the binary before it, concurrency 64 and 256.
set -u
cd "$(dirname "$0")/.."
for b in arbor arbor-before; do xz -dkf gpu/$b.xz && chmod +x gpu/$b; done
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
R=$OUT/r3; mkdir -p $R
t0=$SECONDS
serve() {  # serve NAME BINARY CONVERSATIONS CONCURRENCY
  local S=()
  # fixtures/tiny-llama holds SmolLM2's tokenizer and chat template (scripts/make_fixtures_transformers.py).
  for a in --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 \
      --tokenizer fixtures/tiny-llama --kv-slots 200000; do S+=("--spawn-arg=$a"); done
  gpu/$2 bench --spawn "${S[@]}" --workload multi-turn --turns 3 --system-tokens 2000 --max-tokens 128 \
    --conversations $3 --concurrency $4 --out $R/$1.json > $R/$1.log 2>&1
  echo "$1 rc=$? $((SECONDS-t0))s"; grep -iE "tok/s|tpot|ttft" $R/$1.log | tail -8
}
serve c64-after arbor 64 64
serve c64-before arbor-before 64 64
serve c64-after-2 arbor 64 64
serve c256-after arbor 256 256
tar czf $OUT/r3.tgz -C $OUT r3
