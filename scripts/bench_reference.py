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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=900):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def count(base, text):
    with post(f"{base}/extras/tokenize/count", {"input": text}) as r:
        return json.loads(r.read())["count"]


def large_context(base, w):
    block = w["base_content"] + "\n\nTechnical details:\n" + "\n".join("- " + d for d in w["technical_details"])
    text = block
    while count(base, text) < w["target_prompt_tokens"]:
        text = text + "\n\n" + block
    return text


def llama_cpp_case(base, messages, max_tokens):
    t0 = time.perf_counter()
    first = last = None
    n = 0
    body = {"messages": messages, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0, "stream": True}
    with post(f"{base}/v1/chat/completions", body) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {})
            if delta.get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    return {"ttft_s": first - t0, "duration_s": last - t0, "response_tokens": n,
            "decode_tok_s": (n - 1) / (last - first)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", required=True)
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--example", default=str(ROOT / "target/release/examples/reference_workload"))
    args = ap.parse_args()
    w = json.loads((ROOT / "workloads/reference-multiturn.json").read_text())

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([args.llama_python, "-m", "llama_cpp.server", "--model", args.model, "--host",
                               "127.0.0.1", "--port", str(port), "--n_ctx", "8192", "--n_threads", "2",
                               "--n_threads_batch", "2", "--logits_all", "false", "--cache", "true",
                               "--cache_type", "ram"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(1)
        ctx = large_context(base, w)
        llama = {}
        for case in w["test_cases"]:
            msgs = ([{"role": "system", "content": ctx}] if case["system"] == "large_context" else [])
            msgs.append({"role": "user", "content": case["user"]})
            llama[case["name"]] = llama_cpp_case(base, msgs, w["max_tokens"])
            print("llama.cpp", case["name"], llama[case["name"]], file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait()

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
