#!/usr/bin/env bash
# Call A (one H200): overlapped steps (`--overlap`), checked and measured.
# - the GPU sampler against the CPU sampler (its launch and collect are now two calls);
# - the tiny fixtures on the GPU against the CPU path and transformers, which also compares
#   seeded tokens of every prompt at once with steps overlapped and one at a time;
# - engine-bench on Llama-3.1-8B's shape (dummy bf16 weights), overlap on against off in two
#   alternating rounds: decode at batch 1, 64 and 256 over 512-token contexts, batch 64 over
#   2,048 tokens.
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
$B gpu-check --sampler 50000 --json $R/sampler.json > $R/sampler.log 2>&1; echo "sampler rc=$? $((SECONDS-t0))s"; tail -2 $R/sampler.log
for m in tiny-llama tiny-qwen2; do
  $B gpu-check --model fixtures/$m --transformers fixtures/tiny_logits.json --json $R/check-$m.json > $R/check-$m.log 2>&1
  echo "check $m rc=$? $((SECONDS-t0))s"
  python3 -c "
import json,sys; d=json.load(open(sys.argv[1])); print('worst rel', round(d['worst_relative_logit_error'],4), 'top1', d['same_top1'], '/', d['prompts'], 'graphs', d['decode_graphs'], 'failures', d['failures'])" $R/check-$m.json 2>&1 | tail -1
done
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 400000 --decode-tokens 48 --prefill 0)
summ() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print([(r.get('batch'), r.get('context'), round(r['step_ms'],3), round(r['forward_ms'],3), round(r['tokens_per_s'],1), round(r.get('fraction_of_roofline',0),3)) for r in d['results']])" $1 2>&1 | tail -1; }
for round in 1 2; do for ov in on off; do
  $B "${D[@]}" --overlap $ov --batch 1,64,256 --context 512 --json $R/short-$ov-$round.json > $R/short-$ov-$round.log 2>&1
  echo "short overlap $ov round $round rc=$? $((SECONDS-t0))s"; summ $R/short-$ov-$round.json
  $B "${D[@]}" --overlap $ov --batch 64 --context 2048 --json $R/long-$ov-$round.json > $R/long-$ov-$round.log 2>&1
  echo "long overlap $ov round $round rc=$? $((SECONDS-t0))s"; summ $R/long-$ov-$round.json
done; done
tar czf $OUT/a.tgz -C $OUT a
