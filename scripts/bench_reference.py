"""The reference multi-turn workload (workloads/reference-multiturn.json) on Arbor and on
llama.cpp's OpenAI server, same machine, same GGUF, same run.

Four requests in order: a ~6,800-token system context with a question (fresh), the same context
with two other questions (cached), and a small-context question; 150-token greedy answers.
llama.cpp is started with its prompt cache on (`--cache true --cache_type ram`, shared/peers);
Arbor runs the cases in one process (crates/arbor-engine/examples/reference_workload.rs) with
its radix cache. Prints a Markdown table: TTFT, duration and decode speed per case.

Usage:
  cargo build --release -p arbor-engine --example reference_workload
  python3 scripts/bench_reference.py --llama-python /path/to/venv/bin/python
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from llamacpp_server import LlamaCppServer, count_tokens, stream_timing

ROOT = Path(__file__).resolve().parent.parent


def count(base, text):
    return count_tokens(base, text)


def large_context(base, w):
    block = w["base_content"] + "\n\nTechnical details:\n" + "\n".join("- " + d for d in w["technical_details"])
    text = block
    while count(base, text) < w["target_prompt_tokens"]:
        text = text + "\n\n" + block
    return text


def llama_cpp_case(base, messages, max_tokens):
    return stream_timing(f"{base}/v1/chat/completions",
                         {"messages": messages, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", required=True)
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--example", default=str(ROOT / "target/release/examples/reference_workload"))
    args = ap.parse_args()
    w = json.loads((ROOT / "workloads/reference-multiturn.json").read_text())

    with LlamaCppServer(args.llama_python, args.model, ["--cache", "true", "--cache_type", "ram"]) as base:
        ctx = large_context(base, w)
        llama = {}
        for case in w["test_cases"]:
            msgs = ([{"role": "system", "content": ctx}] if case["system"] == "large_context" else [])
            msgs.append({"role": "user", "content": case["user"]})
            llama[case["name"]] = llama_cpp_case(base, msgs, w["max_tokens"])
            print("llama.cpp", case["name"], llama[case["name"]], file=sys.stderr, flush=True)

    out = subprocess.run([args.example, args.model, "radix"], capture_output=True, text=True, check=True).stdout
    arbor = {}
    for line in out.splitlines():
        r = json.loads(line)
        arbor[r["test"]] = r
        print("arbor", r, file=sys.stderr, flush=True)

    print("| test | engine | prompt tokens | cached | TTFT (s) | duration (s) | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for case in w["test_cases"]:
        n = case["name"]
        a, l = arbor[n], llama[n]
        print(f"| {n} | llama.cpp | | | {l['ttft_s']:.3f} | {l['duration_s']:.2f} | {l['decode_tok_s']:.1f} |")
        print(f"| {n} | arbor | {a['prompt_tokens']} | {a['cached_tokens']} | {a['ttft_s']:.3f} | {a['duration_s']:.2f} | {a['decode_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
