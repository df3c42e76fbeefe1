#!/usr/bin/env bash
# Call A (one H200): the FP8 KV cache.
# - kernel checks: the attention kernels on FP8 pools against an f64 reference over the same
#   E4M3 values, beside the bf16 cases;
# - engine-bench on Llama-3.1-8B's shape (dummy bf16 weights), bf16 cache against FP8 in two
#   alternating rounds: decode at batch 1 and 64 over 512- and 2,048-token contexts, batch 1
#   and 8 over 8,192 tokens, and the prefill of 8,192 tokens;
# - then runC.sh's serving runs (reference workload, 64 conversations, default pool sizes).
set -u
cd "$(dirname "$0")/../../.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/a; mkdir -p $R
t0=$SECONDS
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm --format=csv > $R/gpu.txt
$B gpu-check --kernels --json $R/kernels.json > $R/kernels.log 2>&1; echo "kernels rc=$? $((SECONDS-t0))s"
python3 - $R/kernels.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("failed", d["failed"])
for dt in ("Bf16", "Fp8E4m3"):
    cs = [c for c in d["cases"] if c.get("kv_cache_dtype") == dt]
    print(dt, len(cs), "cases, worst relative", max(c["max_relative_error"] for c in cs) if cs else None,
          "not ok", sum(not c["ok"] for c in cs))
PY
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 300000 --decode-tokens 32)
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print([(r['test'], r.get('batch'), r.get('context', r.get('tokens')), round(r.get('step_ms', r.get('seconds', 0)*1e3),3), round(r.get('tokens_per_s',0),1), round(r.get('fraction_of_roofline',0),3)) for r in d['results']])" $1 2>&1 | tail -1; }
for round in 1 2; do for kv in auto fp8; do
  $B "${D[@]}" --kv-cache-dtype $kv --prefill 0 --batch 1,64 --context 512,2048 --json $R/short-$kv-$round.json > $R/short-$kv-$round.log 2>&1
  echo "short $kv round $round rc=$? $((SECONDS-t0))s"; summ $R/short-$kv-$round.json
  $B "${D[@]}" --kv-cache-dtype $kv --prefill 8192 --batch 1,8 --context 8192 --json $R/long-$kv-$round.json > $R/long-$kv-$round.log 2>&1
  echo "long $kv round $round rc=$? $((SECONDS-t0))s"; summ $R/long-$kv-$round.json
done; done
tar czf $OUT/a.tgz -C $OUT a
# The serving runs need no model file: run them here (runC.sh's header says why).
SKIP_MODEL=1 bash "$(dirname "$0")/runC.sh"
