#!/usr/bin/env bash
# A short call for the per-(token, KV head) scaled FP8 kernels of commit 2846fc0 (binary built
# from 6340f6d): kernel checks, one engine-bench round of each cache. No model checks (the
# default model needs three calls).
set -u
cd "$(dirname "$0")/../../.."
xz -dkf gpu/arbor.xz && chmod +x gpu/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
B=gpu/arbor
R=$OUT/s; mkdir -p $R
t0=$SECONDS
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
print([(r['test'], r.get('batch'), r.get('context', r.get('tokens')), round(r.get('step_ms', r.get('seconds', 0)*1e3),3), round(r.get('tokens_per_s',0),1)) for r in d['results']])" $1 2>&1 | tail -1; }
for kv in auto fp8; do
  $B "${D[@]}" --kv-cache-dtype $kv --prefill 0 --batch 1,64 --context 512,2048 --json $R/short-$kv.json > $R/short-$kv.log 2>&1
  echo "short $kv rc=$? $((SECONDS-t0))s"; summ $R/short-$kv.json
done
tar czf $OUT/s.tgz -C $OUT s
