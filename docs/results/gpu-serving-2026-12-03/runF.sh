#!/usr/bin/env bash
# Call F (one H200): issue 13's measurements on this tree (overlapped steps, the one-wave decode
# split rule), with the issue's own commands: engine-bench by batch (plus 128 and 256) and
# prefill; 64 multi-turn conversations at 64 and 256 at 256 through `arbor serve`; the
# reference workload, bf16 and FP8 caches.
set -u
cd "$(dirname "$0")/../../.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/f; mkdir -p $R
t0=$SECONDS
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print([(r['test'], r.get('batch'), r.get('context', r.get('tokens')), round(r.get('step_ms', r.get('seconds', 0)*1e3),3), round(r.get('tokens_per_s',0),1), round(r.get('fraction_of_roofline',0),3)) for r in d['results']])" $1 2>&1 | tail -1; }
$B engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --batch 1,8,32,64,128,256 --context 512 --decode-tokens 64 --prefill 2048,8192 --kv-slots 200000 --json $R/engine.json > $R/engine.log 2>&1
echo "engine rc=$? $((SECONDS-t0))s"; summ $R/engine.json
S=()
for a in --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 \
    --tokenizer fixtures/tiny-llama --kv-slots 300000; do S+=("--spawn-arg=$a"); done
for kv in auto fp8; do
  $B bench --spawn "${S[@]}" --spawn-arg=--kv-cache-dtype --spawn-arg=$kv --workload reference --repeats 3 --out $R/ref-$kv.json > $R/ref-$kv.log 2>&1
  echo "ref $kv rc=$? $((SECONDS-t0))s"; grep -E "^(Test|LARGE|SMALL)" $R/ref-$kv.log | tail -5
  $B bench --spawn "${S[@]}" --spawn-arg=--kv-cache-dtype --spawn-arg=$kv --workload multi-turn --turns 3 --system-tokens 2000 --max-tokens 128 --conversations 64 --concurrency 64 --out $R/mt64-$kv.json > $R/mt64-$kv.log 2>&1
  echo "multi-turn 64 $kv rc=$? $((SECONDS-t0))s"; grep -E "TTFT s|TPOT s|output tok/s" $R/mt64-$kv.log
done
$B bench --spawn "${S[@]}" --workload multi-turn --turns 3 --system-tokens 2000 --max-tokens 128 --conversations 256 --concurrency 256 --out $R/mt256-auto.json > $R/mt256-auto.log 2>&1
echo "multi-turn 256 auto rc=$? $((SECONDS-t0))s"; grep -E "TTFT s|TPOT s|output tok/s" $R/mt256-auto.log
rm -f $R/*.html; gzip -f $R/*.json
tar czf $OUT/f.tgz -C $OUT f
