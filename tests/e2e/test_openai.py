"""End-to-end tests of `arbor serve` on the default model through the real `openai` client.

Run by scripts/test.sh: ARBOR_BIN=target/debug/arbor python -m unittest tests/e2e/test_openai.py
"""

import json
import os
import sys
import unittest
import urllib.error
import urllib.request

import openai

sys.path.insert(0, os.path.dirname(__file__))
from arbor_server import ArborServer  # noqa: E402

BIN = os.environ.get("ARBOR_BIN", "target/debug/arbor")
MODEL = "smollm2"
SERVER = None


def setUpModule():
    global SERVER
    SERVER = ArborServer(BIN, "--served-model-name", MODEL, "--kv-slots", "32768",
                         "--max-request-bytes", "200000").__enter__()


def tearDownModule():
    code = SERVER.stop()
    assert code == 0, f"arbor serve exited with {code} on SIGTERM:\n{SERVER.logs()}"


def client(**kw):
    return openai.OpenAI(base_url=SERVER.base_url + "/v1", api_key="none", max_retries=0, **kw)


def raw_post(path, data, headers=None):
    """(status, parsed JSON body) for a request the openai client would not send."""
    req = urllib.request.Request(SERVER.base_url + path, data=data, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ask(content, **kw):
    args = dict(model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=24)
    args.update(kw)
    return client().chat.completions.create(**args)


class Chat(unittest.TestCase):
    def test_chat_and_cached_tokens_on_a_repeated_prefix(self):
        system = "You are a meticulous assistant. " * 20
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is 2+2?"}]
        first = client().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
        self.assertEqual(first.object, "chat.completion")
        self.assertEqual(first.choices[0].message.role, "assistant")
        self.assertTrue(first.choices[0].message.content)
        self.assertIn(first.choices[0].finish_reason, ("stop", "length"))
        u = first.usage
        self.assertEqual(u.total_tokens, u.prompt_tokens + u.completion_tokens)
        self.assertEqual(u.prompt_tokens_details.cached_tokens, 0)
        # The next turn resends the conversation: its whole history comes from the cache.
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And 3+3?"}]
        second = client().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
        cached = second.usage.prompt_tokens_details.cached_tokens
        self.assertGreaterEqual(cached, u.prompt_tokens, "the first turn's prompt is reused")
        self.assertLess(cached, second.usage.prompt_tokens)

    def test_streaming_matches_non_streaming(self):
        whole = ask("Describe a sunrise in one sentence.")
        stream = client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a sunrise in one sentence."}],
            temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        self.assertEqual(text, whole.choices[0].message.content)
        self.assertEqual(finish, whole.choices[0].finish_reason)
        self.assertEqual(usage.completion_tokens, whole.usage.completion_tokens)
        self.assertEqual(usage.prompt_tokens, whole.usage.prompt_tokens)

    def test_n_choices_share_the_prompt(self):
        question = "Suggest a name for a cat that likes to sleep in the sun all afternoon."
        hits = SERVER.metrics()["arbor_prefix_cache_hit_tokens_total"]
        r = ask(question, n=3, temperature=1.0, seed=3, max_tokens=12)
        self.assertEqual(sorted(c.index for c in r.choices), [0, 1, 2])
        one = ask(question, max_tokens=1)
        self.assertEqual(r.usage.prompt_tokens, one.usage.prompt_tokens, "the prompt counts once")
        self.assertLessEqual(r.usage.completion_tokens, 36)
        self.assertGreaterEqual(r.usage.completion_tokens, 3)
        # Choices 2 and 3 (and the single request after) reuse the first choice's prompt KV.
        reused = SERVER.metrics()["arbor_prefix_cache_hit_tokens_total"] - hits
        self.assertGreaterEqual(reused, 3 * (one.usage.prompt_tokens - 1))
        again = ask(question, n=3, temperature=1.0, seed=3, max_tokens=12)
        self.assertEqual([c.message.content for c in again.choices], [c.message.content for c in r.choices],
                         "seeded choices replay")

    def test_stop_string(self):
        full = ask("List the days of the week, comma separated.", max_tokens=40).choices[0].message.content
        self.assertGreater(len(full), 10, full)
        stop = full[len(full) // 2:len(full) // 2 + 3]
        cut = ask("List the days of the week, comma separated.", max_tokens=40, stop=[stop])
        self.assertEqual(cut.choices[0].message.content, full[:full.index(stop)])
        self.assertEqual(cut.choices[0].finish_reason, "stop")

    def test_logprobs(self):
        r = ask("Say hello.", logprobs=True, top_logprobs=3, max_tokens=8)
        content = r.choices[0].logprobs.content
        self.assertGreater(len(content), 0)
        self.assertEqual("".join(t.token for t in content), r.choices[0].message.content)
        for t in content:
            self.assertLessEqual(t.logprob, 0.0)
            self.assertEqual(len(t.top_logprobs), 3)
            tops = [x.logprob for x in t.top_logprobs]
            self.assertEqual(tops, sorted(tops, reverse=True))
            self.assertAlmostEqual(t.logprob, tops[0], places=5)  # greedy picks the top token
            self.assertEqual(bytes(t.bytes).decode("utf-8", "replace"), t.token)


class Completions(unittest.TestCase):
    def test_completion_and_stream(self):
        c = client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
        self.assertEqual(c.object, "text_completion")
        text = c.choices[0].text
        self.assertTrue(text)
        streamed = "".join(ch.choices[0].text for ch in client().completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True)
            if ch.choices)
        self.assertEqual(streamed, text)
        self.assertEqual(c.usage.prompt_tokens_details.cached_tokens if c.usage.prompt_tokens_details else 0, 0)

    def test_token_prompts_and_logprobs(self):
        toks = json.loads(urllib.request.urlopen(urllib.request.Request(
            SERVER.base_url + "/tokenize", data=json.dumps({"prompt": "Once upon a time"}).encode(),
            method="POST")).read())["tokens"]
        by_ids = client().completions.create(model=MODEL, prompt=toks, max_tokens=8, temperature=0, logprobs=2)
        by_text = client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
        self.assertEqual(by_ids.choices[0].text, by_text.choices[0].text)
        lp = by_ids.choices[0].logprobs
        self.assertEqual(len(lp.tokens), 8)
        self.assertEqual(len(lp.top_logprobs[0]), 2)


class Errors(unittest.TestCase):
    def assertApiError(self, exc_type, status, fn, param=None):
        with self.assertRaises(exc_type) as cm:
            fn()
        e = cm.exception
        self.assertEqual(e.status_code, status)
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body)
        self.assertTrue(err.get("message"), e.body)
        if param is not None:
            self.assertEqual(err.get("param"), param, e.body)

    def test_client_errors(self):
        self.assertApiError(openai.NotFoundError, 404, lambda: client().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]), "model")
        self.assertApiError(openai.BadRequestError, 400, lambda: ask("hi", temperature=5), "temperature")
        self.assertApiError(openai.BadRequestError, 400, lambda: ask("hi", max_tokens=100000), "max_tokens")
        self.assertApiError(openai.BadRequestError, 400, lambda: client().chat.completions.create(
            model=MODEL, messages=[]), "messages")
        self.assertApiError(openai.BadRequestError, 400, lambda: ask("hi", n=0), "n")
        self.assertApiError(openai.BadRequestError, 400, lambda: ask("hi", top_p=1.5), "top_p")
        self.assertApiError(openai.BadRequestError, 400, lambda: ask("hi", logprobs=True, top_logprobs=99),
                            "top_logprobs")
        self.assertApiError(openai.BadRequestError, 400, lambda: client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]))
        self.assertApiError(openai.BadRequestError, 400, lambda: client().completions.create(
            model=MODEL, prompt=[1, 2, 10**9]), "prompt")
        # Too long for the context, with the numbers.
        with self.assertRaises(openai.BadRequestError) as cm:
            client().completions.create(model=MODEL, prompt="hello " * 5000, max_tokens=4000)
        self.assertIn("8192", str(cm.exception))

    def test_raw_errors(self):
        status, body = raw_post("/v1/chat/completions", b"{not json")
        self.assertEqual(status, 400)
        self.assertEqual(body["error"]["type"], "invalid_request_error")
        status, body = raw_post("/v1/chat/completions", json.dumps({"messages": [{"role": 1}]}).encode())
        self.assertEqual((status, body["error"]["param"]), (400, "messages[0].role"))
        status, body = raw_post("/v1/completions", json.dumps({"prompt": "x" * 300000}).encode())
        self.assertEqual(status, 413)
        status, body = raw_post("/v1/embeddings", b"{}")
        self.assertEqual(status, 404)
        self.assertIn("error", body)

    def test_still_serving_and_nothing_leaked(self):
        self.assertTrue(ask("Say yes.", max_tokens=3).choices[0].message.content)
        m = SERVER.metrics()
        self.assertEqual(m["arbor_kv_slots_used"], 0)
        self.assertEqual(m["arbor_kv_slots_free"] + m["arbor_kv_slots_cached"], m["arbor_kv_slots_total"])


class Models(unittest.TestCase):
    def test_models(self):
        models = client().models.list()
        self.assertEqual([m.id for m in models.data], [MODEL])


class Tenants(unittest.TestCase):
    def test_api_keys_isolate_the_cache(self):
        with ArborServer(BIN, "--served-model-name", MODEL, "--kv-slots", "16384",
                         "--api-key", "alpha", "--api-key", "beta") as s:
            def c(key):
                return openai.OpenAI(base_url=s.base_url + "/v1", api_key=key, max_retries=0)
            msgs = [{"role": "user", "content": "Explain photosynthesis to a child in two sentences."}]
            with self.assertRaises(openai.AuthenticationError):
                c("wrong").chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
            a1 = c("alpha").chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
            a2 = c("alpha").chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
            b1 = c("beta").chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
            self.assertEqual(a1.usage.prompt_tokens_details.cached_tokens, 0)
            self.assertGreater(a2.usage.prompt_tokens_details.cached_tokens, 0)
            self.assertEqual(b1.usage.prompt_tokens_details.cached_tokens, 0)
            self.assertEqual(s.stop(), 0)


class Reasoning(unittest.TestCase):
    def test_reasoning_content_whole_and_streamed(self):
        # The default model never closes a think block: under DeepSeek-R1's rules (replies start
        # inside reasoning) its whole reply is reasoning_content, and content is null.
        plain = ask("Name a color.", max_tokens=8).choices[0].message.content
        with ArborServer(BIN, "--served-model-name", MODEL, "--kv-slots", "16384",
                         "--reasoning-parser", "deepseek-r1") as s:
            c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="none", max_retries=0)
            args = dict(model=MODEL, messages=[{"role": "user", "content": "Name a color."}],
                        temperature=0, max_tokens=8)
            r = c.chat.completions.create(**args)
            self.assertEqual(r.choices[0].message.reasoning_content, plain)
            self.assertIsNone(r.choices[0].message.content)
            self.assertEqual(r.usage.completion_tokens_details.reasoning_tokens, r.usage.completion_tokens)
            parts = [ch.choices[0].delta for ch in
                     c.chat.completions.create(stream=True, **args) if ch.choices]
            self.assertEqual("".join(getattr(d, "reasoning_content", None) or "" for d in parts), plain)
            self.assertEqual("".join(d.content or "" for d in parts), "")
            self.assertEqual(s.stop(), 0)


if __name__ == "__main__":
    unittest.main()
