#!/usr/bin/env bash
# Call 3: serving through arbor serve, decode graphs on and off, concurrency 64 and 256.
set -u
cd "$(dirname "$0")/.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
xz -dkf gpu/smollm2-tok/tokenizer.json.xz
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
B=gpu/arbor
R=$OUT/r3; mkdir -p $R
t0=$SECONDS
serve() {  # serve NAME GRAPHS CONVERSATIONS CONCURRENCY
  local S=()
  for a in --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 \
      --tokenizer gpu/smollm2-tok --kv-slots 200000 --cuda-graphs $2; do S+=("--spawn-arg=$a"); done
  $B bench --spawn "${S[@]}" --workload multi-turn --turns 3 --system-tokens 2000 --max-tokens 128 \
    --conversations $3 --concurrency $4 --out $R/$1.json > $R/$1.log 2>&1
  echo "$1 rc=$? $((SECONDS-t0))s"; grep -iE "tok/s|tpot|ttft" $R/$1.log | tail -8
}
serve c64-on on 64 64
serve c64-off off 64 64
serve c64-on-2 on 64 64
serve c256-on on 256 256
tar czf $OUT/r3.tgz -C $OUT r3
