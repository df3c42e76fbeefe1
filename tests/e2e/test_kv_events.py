"""KV events of `arbor serve --kv-events-endpoint`, received the way vLLM's consumers receive
them: a pyzmq SUB socket, and msgspec decoding into structs declared as vLLM declares its
`KVEventBatch` (array_like, tagged events), which rejects any field of the wrong type or
position.

Run by scripts/test.sh: ARBOR_BIN=target/debug/arbor python -m unittest tests/e2e/test_kv_events.py
"""

import os
import re
import sys
import time
import unittest
from typing import Any

import msgspec
import openai
import zmq

sys.path.insert(0, os.path.dirname(__file__))
from arbor_server import ArborServer  # noqa: E402

BIN = os.environ.get("ARBOR_BIN", "target/debug/arbor")
MODEL = "smollm2"
PAGE = 16


# The wire format, as vLLM's vllm/distributed/kv_events.py declares it (array_like variant,
# which NVIDIA Dynamo's router decodes).
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def replay(ctx, endpoint, start):
    """vLLM's replay protocol: the first sequence number wanted, then batches until -1."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(endpoint)
    sock.send_multipart([b"", start.to_bytes(8, "big")])
    out = []
    while True:
        _, seq, payload = sock.recv_multipart()
        seq = int.from_bytes(seq, "big", signed=True)
        if seq == -1:
            sock.close(linger=0)
            return out
        out.append((seq, payload))


class KvEvents(unittest.TestCase):
    def test_a_vllm_subscriber_follows_the_cache_per_namespace(self):
        with ArborServer(BIN, "--served-model-name", MODEL, "--kv-slots", "2048",
                         "--api-key", "alice,bob", "--metrics-public",
                         "--kv-events-endpoint", "tcp://127.0.0.1:0",
                         "--kv-events-replay-endpoint", "tcp://127.0.0.1:0",
                         "--kv-events-topic", "arbor") as s:
            m = re.search(r"KV events on (tcp://[0-9.:]+), replay on (tcp://[0-9.:]+) \((\d+)-token pages\)",
                          s.logs())
            self.assertIsNotNone(m, s.logs())
            pub, rep, page = m.group(1), m.group(2), int(m.group(3))
            self.assertEqual(page, PAGE)
            ctx = zmq.Context()
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"arbor")
            sub.setsockopt(zmq.RCVTIMEO, 1000)
            sub.connect(pub)
            time.sleep(0.3)

            # Two tenants send the same long prompt, over and over with new endings, through a
            # pool too small to keep it all: the same tokens land in two namespaces.
            system = "You are a careful assistant who answers in one short sentence. " * 12
            for turn in range(6):
                for key in ("alice", "bob"):
                    c = openai.OpenAI(base_url=s.base_url + "/v1", api_key=key, max_retries=0)
                    c.chat.completions.create(
                        model=MODEL, max_tokens=4, temperature=0,
                        messages=[{"role": "system", "content": system},
                                  {"role": "user", "content": f"Question {turn} from {key}: " + "why? " * (40 * turn)}])
            s.settle()

            live = []
            while True:
                try:
                    topic, seq, payload = sub.recv_multipart()
                except zmq.Again:
                    break
                self.assertEqual(topic, b"arbor")
                live.append((int.from_bytes(seq, "big"), payload))
            self.assertGreater(len(live), 5)
            self.assertEqual([q for q, _ in live], list(range(live[0][0], live[0][0] + len(live))))
            everything = replay(ctx, rep, 0)
            self.assertEqual(everything[0][0], 0)
            self.assertEqual(dict(everything)[live[-1][0]], live[-1][1])

            blocks = {}  # hash -> (parent, namespace key)
            stored = removed = 0
            batches = [DECODER.decode(p) for _, p in everything]
            self.assertIsInstance(batches[0].events[0], AllBlocksCleared)
            for b in batches:
                self.assertEqual(b.data_parallel_rank, 0)
                for ev in b.events:
                    if isinstance(ev, BlockStored):
                        self.assertEqual(ev.block_size, PAGE)
                        self.assertEqual(len(ev.token_ids), PAGE * len(ev.block_hashes))
                        self.assertEqual(ev.medium, "GPU")
                        self.assertTrue(ev.parent_block_hash is None or ev.parent_block_hash in blocks)
                        self.assertEqual(len(ev.extra_keys), len(ev.block_hashes))
                        parent = ev.parent_block_hash
                        for h, k in zip(ev.block_hashes, ev.extra_keys):
                            self.assertNotIn(h, blocks)
                            blocks[h] = (parent, k[0])
                            parent = h
                            stored += 1
                    elif isinstance(ev, BlockRemoved):
                        for h in ev.block_hashes:
                            self.assertIn(h, blocks)
                            del blocks[h]
                            removed += 1
                    else:
                        blocks.clear()
            self.assertGreater(removed, 0, "the pool was small enough to evict")
            # Both tenants' pages, under two namespace keys, and never the API keys themselves.
            keys = {k for _, k in blocks.values()}
            self.assertEqual(len(keys), 2, keys)
            self.assertTrue(all(k.startswith("arbor-ns:") and "alice" not in k and "bob" not in k for k in keys))
            # What is held fits the pool: whole pages of at most the 2048 slots.
            self.assertLessEqual(len(blocks) * PAGE, 2048)
            self.assertGreater(len(blocks), 10)
            sub.close(linger=0)
            ctx.term()
            self.assertEqual(s.stop(), 0)


if __name__ == "__main__":
    unittest.main()
