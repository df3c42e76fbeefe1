#!/usr/bin/env bash
# Device call 6: structured output on the GPU (masks merged into the GPU sampler's bans).
set -u
R=$1; mkdir -p $R
xz -d -c gpu/arbor.xz > /tmp/arbor; chmod +x /tmp/arbor
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=warn,arbor=info
/tmp/arbor gpu-check --sampler 50000 --json $R/check-sampler.json > $R/check-sampler.log 2>&1; echo "sampler rc=$?"
python3 -c "import json,sys; d=json.load(open('$R/check-sampler.json')); print('failed', d['failed'], 'deterministic', d['deterministic'], 'greedy', d['greedy'], 'masked', d.get('masked_greedy'))" || true
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --tokenizer gpu/smollm2-tok --max-batch-tokens 8192 --kv-slots 200000 --prefill 0 --context 512 --decode-tokens 48 --constrained)
for round in 1 2; do
  /tmp/arbor "${D[@]}" --batch 1,32 --json $R/constrained-$round.json > /dev/null 2> $R/constrained-$round.log
  grep "^decode\|rror" $R/constrained-$round.log | sed "s/^/r$round: /"
done
# A random-weight model through the server: its replies follow the schema only if the GPU
# sampler applies the masks.
/tmp/arbor serve --device cuda --load-format dummy --model configs/llama-3.1-8b.json --tokenizer gpu/smollm2-tok --kv-slots 200000 --port 8100 --served-model-name m --tool-call-parser hermes > $R/server.log 2>&1 &
pid=$!
for i in $(seq 1 180); do curl -sf localhost:8100/health > /dev/null && break; sleep 0.5; done
python3 - > $R/server-check.log 2>&1 <<'PY'
import json, urllib.request
def post(body):
    req = urllib.request.Request("http://127.0.0.1:8100/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
          "age": {"type": "integer", "minimum": 0, "maximum": 99}, "role": {"enum": ["a", "b"]},
          "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
          "required": ["name", "age", "role", "tags"], "additionalProperties": False}
ok = 0
for seed in range(16):
    r = post({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
              "temperature": 1.0, "seed": seed, "n": 2,
              "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}})
    for c in r["choices"]:
        v = json.loads(c["message"]["content"])
        assert c["finish_reason"] == "stop", c
        assert set(v) == {"name", "age", "role", "tags"} and len(v["name"]) <= 12 and 0 <= v["age"] <= 99
        assert v["role"] in ("a", "b") and len(v["tags"]) <= 3 and all(isinstance(t, bool) for t in v["tags"])
        ok += 1
print("schema replies valid:", ok, "of 32")
r = post({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 1.0,
          "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                     "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}}}],
          "tool_choice": "required", "parallel_tool_calls": False})
c = r["choices"][0]
print("forced call:", c["finish_reason"], c["message"]["tool_calls"])
PY
echo "server check rc=$?"; cat $R/server-check.log | tail -4
kill $pid; wait $pid 2>/dev/null
cd $R && tar czf /tmp/r.tgz . && mkdir -p $OUT && cp /tmp/r.tgz $OUT/
