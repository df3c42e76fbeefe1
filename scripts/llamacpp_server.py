"""llama.cpp's OpenAI server (PyPI llama-cpp-python[server]) as a benchmark peer on loopback.

Shared by bench_cpu.py and bench_reference.py. Start flags follow shared/peers/README.md: both
cores for prompt and generation (it defaults to one thread), no logits for every prompt
position.
"""
import json
import socket
import subprocess
import time
import urllib.request


def post(url, body, timeout=900):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


class LlamaCppServer:
    """`with LlamaCppServer(python, model, ["--cache", "true"]) as base: ...` yields the base URL."""

    def __init__(self, python, model, extra_args=()):
        self.python, self.model, self.extra_args = python, model, list(extra_args)

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [self.python, "-m", "llama_cpp.server", "--model", self.model, "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "8192", "--n_threads", "2", "--n_threads_batch", "2",
             "--logits_all", "false", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{self.base}/v1/models", timeout=1)
                return self.base
            except OSError:
                time.sleep(1)
        raise RuntimeError("llama.cpp's server did not start within 2 minutes")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def count_tokens(base, text):
    with post(f"{base}/extras/tokenize/count", {"input": text}) as r:
        return json.loads(r.read())["count"]


def stream_timing(url, body):
    """Streams a completion; returns time to the first content, to the last, and pieces seen
    (llama.cpp's streams carry no usage: one piece is one token)."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with post(url, {**body, "stream": True}) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("text") or choice.get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    return {"ttft_s": first - t0, "duration_s": last - t0, "generated": n,
            "decode_tok_s": (n - 1) / (last - first) if n > 1 else float("nan")}
