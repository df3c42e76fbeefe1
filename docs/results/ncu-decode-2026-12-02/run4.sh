#!/usr/bin/env bash
# Call 4: what issue 13 asks to report besides: batch 128, prefill of 2k and 8k tokens, batch 1
# at 8k tokens, and the reference workload (cached 7k against small) through arbor serve,
# with the merge change and without it.
set -u
cd "$(dirname "$0")/.."
for b in arbor arbor-before; do xz -dkf gpu/$b.xz && chmod +x gpu/$b; done
SP=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null || true)
[ -n "$SP" ] && [ -d "$SP/nvidia" ] && export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ARBOR_LOG=${ARBOR_LOG:-warn,arbor_engine=info,arbor=info}
R=$OUT/r4; mkdir -p $R
t0=$SECONDS
D=(engine-bench --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 --kv-slots 200000 --decode-tokens 32)
for b in arbor-before arbor; do
  gpu/$b "${D[@]}" --batch 1,128 --context 512 --prefill 2048,8192 > $R/bench-$b.log 2>&1; echo "$b rc=$? $((SECONDS-t0))s"
  grep -E "^(decode|prefill)" $R/bench-$b.log | sed 's/ (.*per sequence)//'
  gpu/$b "${D[@]}" --batch 1 --context 8192 --prefill 0 > $R/b1x8k-$b.log 2>&1
  grep -E "^decode" $R/b1x8k-$b.log | sed 's/ (.*per sequence)//'
done
ref() {  # ref NAME BINARY
  local S=()
  for a in --device cuda --load-format dummy --model configs/llama-3.1-8b.json --max-batch-tokens 8192 \
      --tokenizer fixtures/tiny-llama --kv-slots 200000; do S+=("--spawn-arg=$a"); done
  gpu/$2 bench --spawn "${S[@]}" --workload reference --repeats 3 --out $R/$1.json > $R/$1.log 2>&1
  echo "$1 rc=$? $((SECONDS-t0))s"; grep -iE "large|small|overall" $R/$1.log | tail -8
}
ref ref-after arbor
ref ref-before arbor-before
tar czf $OUT/r4.tgz -C $OUT r4
