"""Soak test of `arbor serve` on loopback, bounded in count and time.

Many concurrent streaming clients, some hanging up mid-stream, malformed requests (bad JSON,
wrong types, raw garbage on the socket) mixed in, and a KV pool small enough that the cache
must evict. Afterwards every KV slot must be accounted for (from /metrics: nothing held by
requests, free + cached = total), and the server must still answer exactly as before.

    ARBOR_BIN=target/debug/arbor python tests/e2e/soak.py [--requests 60] [--concurrency 16]
"""

import argparse
import asyncio
import json
import os
import random
import sys
import time

import openai

sys.path.insert(0, os.path.dirname(__file__))
from arbor_server import ArborServer  # noqa: E402

MODEL = "smollm2"
TOPICS = ["the sea", "a mountain", "a city at night", "an old library", "a desert road", "the first snow"]
SYSTEM = "You are a poet who answers in short lines. " * 8

MALFORMED = [
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\n\r\n{not json",
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 30\r\n\r\n{\"messages\": [{\"role\": 7}]}  ",
    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 28\r\n\r\n{\"prompt\": \"a\", \"n\": 10000}",
    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"prompt\": \"truncated bo",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage that is not HTTP at all\r\n\r\n",
    b"GET /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n",
]


PROBE = dict(model=MODEL, prompt="The three primary colors are", max_tokens=20, temperature=0)


async def greedy_probe(client):
    """The greedy answer to a fixed prompt: the same before and after a load, or state leaked."""
    return (await client.completions.create(**PROBE)).choices[0].text


async def raw_request(host, port, payload, timeout=15):
    """Sends raw bytes; returns the status line (or '' if the server closed the connection)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        if payload.endswith(b"bo"):
            writer.write_eof()  # a body shorter than its content-length
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.decode(errors="replace").strip()
    finally:
        writer.close()


async def run(args):
    binary = os.environ.get("ARBOR_BIN", "target/debug/arbor")
    with ArborServer(binary, "--served-model-name", MODEL, "--kv-slots", str(args.kv_slots),
                     "--max-queue", "512") as server:
        host, port = server.base_url.removeprefix("http://").split(":")
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                                    timeout=120)
        reference = await greedy_probe(client)

        rng = random.Random(args.seed)
        sem = asyncio.Semaphore(args.concurrency)
        tally = {"completed": 0, "disconnected": 0, "malformed": 0, "n2": 0}
        problems = []

        async def streaming_chat(i, hang_up):
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"Write about {rng.choice(TOPICS)} (#{i % 7})."}]
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages, stream=True, temperature=0.8, seed=i,
                max_tokens=300 if hang_up else rng.randint(8, 48),
                extra_body={"ignore_eos": True} if hang_up else {},
                stream_options={"include_usage": True})
            chunks, finish, usage = 0, None, None
            async for chunk in stream:
                chunks += 1
                if hang_up and chunks >= 3:
                    break
                usage = chunk.usage or usage
                for c in chunk.choices:
                    finish = c.finish_reason or finish
            if hang_up:
                await stream.close()
                tally["disconnected"] += 1
            else:
                if finish not in ("stop", "length") or usage is None:
                    problems.append(f"request {i}: finish={finish} usage={usage}")
                tally["completed"] += 1

        async def shared_prefix_n2(i):
            r = await client.completions.create(
                model=MODEL, prompt=SYSTEM + f"Line {i % 5}:", n=2, max_tokens=10, temperature=1.0, seed=i)
            if len(r.choices) != 2 or r.usage.completion_tokens < 2:
                problems.append(f"request {i}: {r}")
            tally["n2"] += 1

        async def malformed(i):
            status = await raw_request(host, port, MALFORMED[i % len(MALFORMED)])
            # A status line of 4xx, or a closed connection for what is not HTTP: never 5xx.
            if status and not status.split(" ")[1].startswith("4"):
                problems.append(f"malformed {i}: {status}")
            tally["malformed"] += 1

        async def one(i):
            async with sem:
                kind = i % 6
                try:
                    if kind in (0, 1, 2):
                        await streaming_chat(i, hang_up=False)
                    elif kind == 3:
                        await streaming_chat(i, hang_up=True)
                    elif kind == 4:
                        await malformed(i)
                    else:
                        await shared_prefix_n2(i)
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    problems.append(f"request {i} ({kind}): {type(e).__name__}: {e}")

        started = time.time()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(args.requests))), args.time_limit)
        elapsed = time.time() - started

        # Cancelled requests release their slots at the next engine step: wait for quiet.
        m, settle_problems = server.settle(timeout=30)
        problems.extend(settle_problems)
        total, free, cached, used = (m[f"arbor_kv_slots_{k}"] for k in ("total", "free", "cached", "used"))
        cancelled = m['arbor_requests_total{outcome="cancelled"}']
        if cancelled < tally["disconnected"]:
            problems.append(f"{tally['disconnected']} clients hung up but only {cancelled} requests were cancelled")
        again = await greedy_probe(client)
        if again != reference:
            problems.append(f"answer changed after the load: {reference!r} -> {again!r}")
        code = server.stop()
        if code != 0:
            problems.append(f"exit code {code} on SIGTERM")

        print(json.dumps({"elapsed_s": round(elapsed, 1), **tally, "cancelled": cancelled,
                          "kv_slots": {"total": total, "free": free, "cached": cached, "used": used},
                          "cache_hit_tokens": m["arbor_prefix_cache_hit_tokens_total"],
                          "queried_tokens": m["arbor_prefix_cache_queried_tokens_total"]}))
        if problems:
            print("SOAK FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
            print(server.logs()[-4000:], file=sys.stderr)
            return 1
        print("soak ok")
        return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--kv-slots", type=int, default=1500, help="small, so that the cache must evict")
    p.add_argument("--time-limit", type=float, default=300)
    p.add_argument("--seed", type=int, default=1)
    sys.exit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
