"""Soak test: many concurrent multi-turn conversations against `arbor serve` on loopback, for a
fixed time, with clients hanging up mid-stream and malformed requests mixed in.

Each of `--conversations` clients runs conversations turn after turn (the whole history resent
each turn, as chat clients do, reset after a few turns) until `--duration` seconds have passed.
Of all turns, about 20% hang up after a few streamed chunks and 10% are malformed (bad JSON,
wrong types, out-of-range values, raw garbage). Afterwards: no failure among well-formed
requests, every malformed request refused with a 4xx, every KV slot accounted for (nothing held
by requests, free + cached = total), the same greedy answer as before the load, the server's
peak resident memory, and exit code 0 on SIGTERM.

    ARBOR_BIN=target/release/arbor python tests/e2e/soak_conversations.py --duration 600 --json OUT
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
from soak import MODEL, greedy_probe, raw_request  # noqa: E402

SYSTEM = "You are a helpful assistant for a hiking club. Answer briefly and concretely. " * 6
QUESTIONS = ["Which trail is best in spring?", "What should I pack?", "How long is the loop?",
             "Is it safe for children?", "Where can we park?", "What about dogs?", "Any water on the way?"]
MALFORMED_JSON = [
    {"messages": "not a list"},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    {"messages": [{"role": "user", "content": "hi"}], "n": 100000},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 5000]},
    {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {str(i): 1 for i in range(400)}},
    {"messages": []},
]


async def run(args):
    binary = os.environ.get("ARBOR_BIN", "target/debug/arbor")
    with ArborServer(binary, "--served-model-name", MODEL, "--kv-slots", str(args.kv_slots),
                     "--max-queue", "512") as server:
        host, port = server.base_url.removeprefix("http://").split(":")
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                                    timeout=300)
        reference = await greedy_probe(client)
        idle_rss = server.rss_mib()
        peak_rss = idle_rss
        tally = {"turns_served": 0, "hung_up": 0, "malformed_refused": 0, "failures_well_formed": 0,
                 "conversations": 0, "output_tokens": 0}
        problems = []
        deadline = time.time() + args.duration

        async def malformed(rng):
            if rng.random() < 0.5:
                payload = rng.choice([
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\n\r\n{not json",
                    b"\x16\x03\x01\x02\x00\x01\x00garbage, not HTTP\r\n\r\n",
                ])
                status = await raw_request(host, port, payload)
                ok = not status or status.split(" ")[1].startswith("4")
            else:
                try:
                    await client.chat.completions.create(model=MODEL, **rng.choice(MALFORMED_JSON))
                    ok = False
                except openai.BadRequestError:
                    ok = True
            if ok:
                tally["malformed_refused"] += 1
            else:
                problems.append("a malformed request was not refused with a 4xx")

        async def conversation_client(c):
            rng = random.Random(args.seed * 1000 + c)
            while time.time() < deadline:
                tally["conversations"] += 1
                messages = [{"role": "system", "content": SYSTEM}]
                for _turn in range(rng.randint(2, 5)):
                    if time.time() >= deadline:
                        return
                    roll = rng.random()
                    if roll < 0.10:
                        await malformed(rng)
                        continue
                    messages.append({"role": "user", "content": rng.choice(QUESTIONS)})
                    hang_up = roll < 0.30
                    try:
                        stream = await client.chat.completions.create(
                            model=MODEL, messages=messages, stream=True, temperature=0.7,
                            seed=rng.randint(0, 1 << 30), max_tokens=rng.randint(16, 48),
                            stream_options={"include_usage": True})
                        text, chunks, finish, usage = [], 0, None, None
                        async for chunk in stream:
                            chunks += 1
                            if hang_up and chunks >= 3:
                                break
                            usage = chunk.usage or usage
                            for ch in chunk.choices:
                                finish = ch.finish_reason or finish
                                text.append(ch.delta.content or "")
                        if hang_up:
                            await stream.close()
                            tally["hung_up"] += 1
                            messages.pop()
                            continue
                        if finish not in ("stop", "length") or usage is None:
                            raise RuntimeError(f"finish={finish} usage={usage}")
                        tally["turns_served"] += 1
                        tally["output_tokens"] += usage.completion_tokens
                        messages.append({"role": "assistant", "content": "".join(text)})
                    except Exception as e:  # noqa: BLE001 - counted and reported
                        tally["failures_well_formed"] += 1
                        problems.append(f"client {c}: {type(e).__name__}: {e}")
                        break

        async def watch_memory():
            nonlocal peak_rss
            while time.time() < deadline + 5:
                peak_rss = max(peak_rss, server.rss_mib())
                await asyncio.sleep(0.25)

        started = time.time()
        watcher = asyncio.create_task(watch_memory())
        await asyncio.wait_for(asyncio.gather(*(conversation_client(c) for c in range(args.conversations))),
                               args.duration + 600)
        elapsed = time.time() - started
        watcher.cancel()

        m, settle_problems = server.settle(timeout=60)
        problems.extend(settle_problems)
        slots = {k: m[f"arbor_kv_slots_{k}"] for k in ("total", "free", "cached", "used")}
        again = await greedy_probe(client)
        if again != reference:
            problems.append(f"answer changed after the load: {reference!r} -> {again!r}")
        final_rss = server.rss_mib()
        code = server.stop()
        if code != 0:
            problems.append(f"exit code {code} on SIGTERM")
        summary = {
            "duration_s": round(elapsed, 1), "concurrent_conversations": args.conversations, **tally,
            "output_tok_per_s": round(tally["output_tokens"] / elapsed, 1),
            "cancelled": m['arbor_requests_total{outcome="cancelled"}'],
            "errors": m['arbor_requests_total{outcome="error"}'],
            "kv_slots": slots,
            "prefix_cache_hit_ratio": round(m["arbor_prefix_cache_hit_tokens_total"]
                                            / max(1, m["arbor_prefix_cache_queried_tokens_total"]), 3),
            "rss_mib": {"idle": round(idle_rss, 1), "peak": round(peak_rss, 1), "after": round(final_rss, 1)},
            "same_greedy_answer": again == reference,
        }
        print(json.dumps(summary))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
        if tally["turns_served"] == 0 or tally["hung_up"] == 0 or tally["malformed_refused"] == 0:
            problems.append(f"the load did not exercise every kind of client: {tally}")
        if problems:
            print("SOAK FAILED:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
            print(server.logs()[-4000:], file=sys.stderr)
            return 1
        print("soak ok")
        return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--duration", type=float, default=30, help="seconds of load")
    p.add_argument("--kv-slots", type=int, default=6000, help="small enough that the cache evicts")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json")
    sys.exit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
