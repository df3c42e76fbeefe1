"""Hostile requests against `arbor serve` on loopback: each must get a prompt, clear answer
(400/413/503 in OpenAI's error shape, or a normal response where the request is legal) while
the server's resident memory stays within a bound of its idle level, and the server must go on
serving the same greedy answer afterwards.

    ARBOR_BIN=target/debug/arbor python tests/e2e/hostile.py [--json OUT] [--rss-bound-mib 300]

The first case is the one that used to end in the kernel's OOM killer: 128 prompts x n = 128
with a 4 MB stop string.
"""

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from arbor_server import ArborServer  # noqa: E402

MB = 1 << 20


def cases():
    ids = list(range(1000, 9000))
    yield "issue: 128 prompts x n=128, 4 MB stop string", "/v1/completions", {
        "prompt": ["Once upon a time"] * 128, "n": 128, "max_tokens": 1, "stop": ["x" * (4 * MB)]}
    yield "128 prompts x n=128 (16,384 sequences)", "/v1/completions", {
        "prompt": ["Once upon a time"] * 128, "n": 128, "max_tokens": 1}
    yield "17 stop strings", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "stop": [f"s{i}" for i in range(17)], "max_tokens": 1}
    yield "a 300-byte stop string", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "stop": "y" * 300, "max_tokens": 1}
    yield "200,000 stop_token_ids", "/v1/completions", {
        "prompt": "hi", "stop_token_ids": list(range(200_000)), "max_tokens": 1}
    yield "200,000 logit_bias entries", "/v1/completions", {
        "prompt": "hi", "logit_bias": {str(i): 1 for i in range(200_000)}, "max_tokens": 1}
    yield "128 prompts of 8,000 token ids (1M prompt tokens)", "/v1/completions", {
        "prompt": [ids] * 128, "max_tokens": 1}
    yield "a 12 MB text prompt", "/v1/completions", {
        "prompt": "All work and no play makes Jack a dull boy. " * (12 * MB // 44), "max_tokens": 1}
    yield "20,000 chat messages", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hello there"}] * 20_000, "max_tokens": 1}
    yield "n=128 on a 1,000-token prompt (legal: 128 choices share one prefill)", "/v1/completions", {
        "prompt": ids[:1000], "n": 128, "max_tokens": 1}
    yield "JSON nested 100,000 deep", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    yield "a 17 MB body (over --max-request-bytes)", "/v1/completions", b'{"prompt": "' + b"a" * (17 * MB) + b'"}'
    yield "max_tokens 2^40", "/v1/completions", {"prompt": "hi", "max_tokens": 1 << 40}
    yield "min_tokens above max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 9}


def post(host, port, path, body, timeout=300):
    """One POST on a fresh connection. A server may answer (413) and close before the whole
    body is sent: the answer is still read after the broken pipe."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\nconnection: close\r\n\r\n").encode()
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        try:
            sock.sendall(head + data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read().decode(errors="replace"), len(data)
    finally:
        sock.close()


class RssSampler:
    """Samples the server's resident memory every 10 ms; `peak` is the highest seen."""

    def __init__(self, server):
        self.server, self.peak, self.running = server, 0.0, True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while self.running:
            try:
                self.peak = max(self.peak, self.server.rss_mib())
            except OSError:
                return
            time.sleep(0.01)

    def stop(self):
        self.running = False
        self.thread.join()
        return self.peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--kv-slots", type=int, default=20_000)
    p.add_argument("--rss-bound-mib", type=float, default=300, help="peak over idle allowed")
    args = p.parse_args()
    binary = os.environ.get("ARBOR_BIN", "target/debug/arbor")
    problems, rows = [], []
    with ArborServer(binary, "--served-model-name", "m", "--kv-slots", str(args.kv_slots)) as server:
        host, port = server.base_url.removeprefix("http://").split(":")
        probe = {"prompt": "The three primary colors are", "max_tokens": 16, "temperature": 0}
        status, text, _ = post(host, port, "/v1/completions", probe)
        reference = json.loads(text)["choices"][0]["text"]
        time.sleep(0.5)
        idle = server.rss_mib()
        sampler = RssSampler(server)
        for name, path, body in cases():
            started = time.time()
            status, text, size = post(host, port, path, body)
            seconds = time.time() - started
            try:
                err = json.loads(text).get("error")
            except ValueError:
                err = None
                problems.append(f"{name}: answer is not JSON: {text[:200]!r}")
            what = (f"{err.get('param')}: {err.get('message')}" if err else "served")[:300]
            rows.append({"case": name, "body_bytes": size, "status": status, "seconds": round(seconds, 3),
                         "answer": what, "rss_mib_after": round(server.rss_mib(), 1)})
            print(f"{status} {seconds:7.3f}s {name}: {what[:140]}", flush=True)
            if status >= 500:
                problems.append(f"{name}: {status} {text[:200]}")
            if status == 200 and "legal" not in name:
                problems.append(f"{name}: served, expected a refusal")
        peak = sampler.stop()
        status, text, _ = post(host, port, "/v1/completions", probe)
        if json.loads(text)["choices"][0]["text"] != reference:
            problems.append("the greedy answer changed after the hostile requests")
        problems.extend(server.settle()[1])
        if peak - idle > args.rss_bound_mib:
            problems.append(f"peak RSS {peak:.0f} MiB is {peak - idle:.0f} MiB over idle ({idle:.0f} MiB)")
        code = server.stop()
        if code != 0:
            problems.append(f"exit code {code} on SIGTERM")
    summary = {"idle_rss_mib": round(idle, 1), "peak_rss_mib": round(peak, 1), "cases": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "cases"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if problems:
        print("HOSTILE FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("hostile ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
