"""CPU engine benchmark: Arbor against llama.cpp's OpenAI server on the same GGUF, same run.

Measures, for prompts of about 512 and 4,096 tokens (built from the reference workload's
context text, so the token counts are real text):
  - prefill tokens/s: prompt tokens / time to the first token;
  - decode tokens/s: (generated - 1) / (time of the last token - time of the first token),
    128 tokens generated greedily.
Runs alternate between the engines (llama.cpp, Arbor, llama.cpp, ...) so that machine noise
hits both alike; the medians and their ratio are printed as a Markdown table.

Each prompt starts with a run number, so neither engine can reuse KV from an earlier run.
Arbor is timed by `arbor generate` itself (it prints prompt and decode speed); llama.cpp by
streaming /v1/completions from its server on loopback (HTTP adds well under 1% at these sizes).

Usage:
  python3 scripts/bench_cpu.py --arbor target/release/arbor \
      --llama-python /path/to/venv/bin/python --model models/SmolLM2-135M-Instruct.Q4_1.gguf
where the venv has `llama-cpp-python[server]==0.3.36` (see shared/peers/README.md).

Two Arbor builds against each other instead (before/after a change), alternated the same way:
  python3 scripts/bench_cpu.py --arbor NEW_BIN --baseline OLD_BIN
Prompts are then cut by characters (about 4 per token); the table shows the real token counts
each run reported.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llamacpp_server import LlamaCppServer, count_tokens, stream_timing

ROOT = Path(__file__).resolve().parent.parent


def context_text():
    w = json.loads((ROOT / "workloads" / "reference-multiturn.json").read_text())
    block = w["base_content"] + "\n\nTechnical details:\n" + "\n".join("- " + d for d in w["technical_details"])
    return block


def tokens_of(base, text):
    return count_tokens(base, text)


def prompt_of(target_tokens, base, run):
    text = context_text()
    out = f"Run {run}.\n"
    while tokens_of(base, out) < target_tokens:
        out += text + "\n\n"
    # Trim line by line to land just under the target.
    lines = out.split("\n")
    while tokens_of(base, "\n".join(lines)) > target_tokens:
        lines.pop()
    return "\n".join(lines)


def llama_cpp_run(base, prompt, n_gen):
    r = stream_timing(f"{base}/v1/completions",
                      {"prompt": prompt, "max_tokens": n_gen, "min_tokens": n_gen, "temperature": 0})
    n_prompt = tokens_of(base, prompt)
    return {"prompt_tokens": n_prompt, "prefill_tps": n_prompt / r["ttft_s"],
            "decode_tps": r["decode_tok_s"], "generated": r["generated"]}


ARBOR_LINE = re.compile(r"prompt: (\d+) tokens \((\d+) cached\) in ([\d.]+)s \(([\d.]+) tok/s\); generated: (\d+) tokens, decode ([\d.]+) tok/s")


def arbor_run(arbor, model, prompt, n_gen):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(prompt)
    p = subprocess.run([arbor, "generate", "--model", model, "--raw", "--prompt-file", f.name,
                        "--max-tokens", str(n_gen), "--ignore-eos", "--kv-slots", "8192"],
                       capture_output=True, text=True, check=True)
    m = ARBOR_LINE.search(p.stderr)
    if not m:
        sys.exit(f"unexpected arbor output: {p.stderr}")
    return {"prompt_tokens": int(m[1]), "prefill_tps": float(m[4]), "decode_tps": float(m[6]), "generated": int(m[5])}


def prompt_by_chars(target_tokens, run):
    text = context_text()
    out = f"Run {run}.\n"
    while len(out) < 4 * target_tokens:
        out += text + "\n\n"
    return out[: 4 * target_tokens]


def ab(args):
    """The same prompts through two Arbor binaries, alternated; medians and their ratio."""
    engines = {"before": args.baseline, "after": args.arbor}
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        res = {k: [] for k in engines}
        for run in range(args.runs):
            prompt = prompt_by_chars(size, run)
            # Each build goes first in every other run, so that an order effect (caches, clock
            # boost after a pause) does not favour one of them.
            order = list(engines.items())
            if run % 2:
                order.reverse()
            for name, binary in order:
                res[name].append(arbor_run(binary, args.model, prompt, args.gen))
            print(size, run, {k: v[-1] for k, v in res.items()}, file=sys.stderr, flush=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("prompt_tokens", "prefill_tps", "decode_tps")}
               for k, v in res.items()}
        rows.append((size, med))
    print("| prompt | build | prompt tokens | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    for size, med in rows:
        for name in engines:
            m = med[name]
            print(f"| ~{size} | {name} | {m['prompt_tokens']:.0f} | {m['prefill_tps']:.1f} | {m['decode_tps']:.1f} |")
        a, b = med["after"], med["before"]
        print(f"| ~{size} | after / before | | {a['prefill_tps'] / b['prefill_tps']:.3f} | {a['decode_tps'] / b['decode_tps']:.3f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arbor", default=str(ROOT / "target/release/arbor"))
    ap.add_argument("--llama-python", help="python of a venv with llama-cpp-python[server]")
    ap.add_argument("--baseline", help="another arbor binary to compare with, instead of llama.cpp")
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--sizes", default="512,4096")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    args = ap.parse_args()
    if args.baseline:
        return ab(args)
    if not args.llama_python:
        ap.error("give --llama-python (llama.cpp as the peer) or --baseline (another arbor build)")

    with LlamaCppServer(args.llama_python, args.model) as base:
        rows = []
        for size in [int(s) for s in args.sizes.split(",")]:
            res = {"llama.cpp": [], "arbor": []}
            for run in range(args.runs):
                prompt = prompt_of(size, base, run)
                res["llama.cpp"].append(llama_cpp_run(base, prompt, args.gen))
                res["arbor"].append(arbor_run(args.arbor, args.model, prompt, args.gen))
                print(size, run, {k: v[-1] for k, v in res.items()}, file=sys.stderr, flush=True)
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("prompt_tokens", "prefill_tps", "decode_tps")}
                   for k, v in res.items()}
            rows.append((size, med))
        print("| prompt | engine | prompt tokens | prefill tok/s | decode tok/s |")
        print("|---|---|---|---|---|")
        for size, med in rows:
            for eng in ("llama.cpp", "arbor"):
                m = med[eng]
                print(f"| ~{size} | {eng} | {m['prompt_tokens']:.0f} | {m['prefill_tps']:.1f} | {m['decode_tps']:.1f} |")
            a, l = med["arbor"], med["llama.cpp"]
            print(f"| ~{size} | arbor / llama.cpp | | {a['prefill_tps'] / l['prefill_tps']:.2f}x | {a['decode_tps'] / l['decode_tps']:.2f}x |")


if __name__ == "__main__":
    main()
