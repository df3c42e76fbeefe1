#!/usr/bin/env bash
# Call B (one H200, after call A on the same machine): overlapped steps through `arbor serve`
# (8B shape, dummy bf16 weights, SmolLM2's tokenizer from fixtures/tiny-llama), overlap on
# against off in the same call:
# - 64 multi-turn conversations (3 turns, 2,000-token system prompt, 128-token answers) at
#   concurrency 64, and at 256 with overlap on;
# - the reference workload (cached 7k-token request against the small one), 3 repeats.
set -u
cd "$(dirname "$0")/../../.."
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
[ -x gpu/arbor ] || { xz -dkf gpu/arbor.xz && chmod +x gpu/arbor; }
B=gpu/arbor
R=$OUT/b; mkdir -p $R
t0=$SECONDS
S=()
for a in --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 \
    --tokenizer fixtures/tiny-llama --kv-slots 300000; do S+=("--spawn-arg=$a"); done
mt() {  # mt OVERLAP CONVERSATIONS
  $B bench --spawn "${S[@]}" --spawn-arg=--overlap --spawn-arg=$1 --workload multi-turn --turns 3 --system-tokens 2000 --max-tokens 128 --conversations $2 --concurrency $2 --out $R/mt$2-$1.json > $R/mt$2-$1.log 2>&1
  echo "multi-turn $2 overlap $1 rc=$? $((SECONDS-t0))s"; grep -E "TTFT s|TPOT s|output tok/s" $R/mt$2-$1.log
}
mt on 64
mt off 64
mt on 64
mt off 64
ref() {
  $B bench --spawn "${S[@]}" --spawn-arg=--overlap --spawn-arg=$1 --workload reference --repeats 3 --out $R/ref-$1.json > $R/ref-$1.log 2>&1
  echo "ref overlap $1 rc=$? $((SECONDS-t0))s"; grep -E "^(Test|LARGE|SMALL)" $R/ref-$1.log | tail -5
}
ref on
ref off
mt on 256
gzip -f $R/*.json
tar czf $OUT/b.tgz -C $OUT b
