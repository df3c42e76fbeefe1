#!/usr/bin/env bash
# Call D (one H200): the FP8 KV cache with one scale per (slot, KV head) for K and for V
# (gpu/arbor.xz), against the unscaled E4M3 cache of the previous commit (gpu/arbor-unscaled.xz):
# - the kernel checks (every tensor-core case on FP8 pools against an f64 reference over the
#   same scaled E4M3 values, beside the bf16 cases);
# - engine-bench with the FP8 cache, scaled against unscaled, two alternating rounds.
# (The tiny fixtures' heads, 8 wide, have no tensor-core kernels, so no FP8 cache: the
# default model's checks are runE.sh.)
set -u
cd "$(dirname "$0")/../../../.."
for b in arbor arbor-unscaled; do xz -dkf gpu/$b.xz && chmod +x gpu/$b; done
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn
R=$OUT/d; mkdir -p $R
t0=$SECONDS
gpu/arbor gpu-check --kernels --json $R/kernels.json > $R/kernels.log 2>&1; echo "kernels rc=$? $((SECONDS-t0))s"
python3 - $R/kernels.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("failed", d["failed"])
for dt in ("Bf16", "Fp8E4m3"):
    cs = [c for c in d["cases"] if c.get("kv_cache_dtype") == dt]
    print(dt, len(cs), "cases, worst relative", max(c["max_relative_error"] for c in cs) if cs else None,
          "not ok", sum(not c["ok"] for c in cs))
PY
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 300000 --decode-tokens 32 --kv-cache-dtype fp8)
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print([(r['test'], r.get('batch'), r.get('context', r.get('tokens')), round(r.get('step_ms', r.get('seconds', 0)*1e3),3), round(r.get('tokens_per_s',0),1)) for r in d['results']])" $1 2>&1 | tail -1; }
for round in 1 2; do for b in arbor arbor-unscaled; do
  gpu/$b "${D[@]}" --prefill 0 --batch 1,64 --context 512,2048 --json $R/short-$b-$round.json > $R/short-$b-$round.log 2>&1
  echo "short $b round $round rc=$? $((SECONDS-t0))s"; summ $R/short-$b-$round.json
  gpu/$b "${D[@]}" --prefill 8192 --batch 8 --context 8192 --json $R/long-$b-$round.json > $R/long-$b-$round.log 2>&1
  echo "long $b round $round rc=$? $((SECONDS-t0))s"; summ $R/long-$b-$round.json
done; done
tar czf $OUT/d.tgz -C $OUT d
