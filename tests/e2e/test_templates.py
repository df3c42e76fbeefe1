"""The cache across turns under published reasoning-model chat templates (DeepSeek-R1's and
Qwen3's, fetched by scripts/fetch_chat_templates.py, which scripts/test.sh runs first), on the
default model's weights: each turn, with history warm-ups, computes no more than its new
message (plus the one token a warm-up holds back); without them, the turns after a reply
recompute the reply as rendered, and an agent's next question after a tool loop recomputes the
whole loop. The measurement itself is scripts/template_turns.py; this asserts its outcome, and
the OpenAI client's view of the same replies.

    ARBOR_BIN=target/debug/arbor python -m unittest tests/e2e/test_templates.py
"""

import os
import sys
import unittest

import openai

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
import template_turns  # noqa: E402
from arbor_server import ArborServer  # noqa: E402

BIN = os.environ.get("ARBOR_BIN", "target/debug/arbor")
TEMPLATES = os.path.join(os.environ.get("ARBOR_MODELS_DIR", "models"), "templates")


def setUpModule():
    for name in ("deepseek-r1.jinja", "qwen3.jinja"):
        path = os.path.join(TEMPLATES, name)
        if not os.path.exists(path):
            raise RuntimeError(f"{path} missing: run python3 scripts/fetch_chat_templates.py")


class TemplateTurns(unittest.TestCase):
    def check(self, on, off, skip_first=1):
        for r in on[skip_first:]:
            self.assertLessEqual(r["recomputed"], r["floor"] + 1, r)
        # Without warm-ups the same conversation recomputes more on every later turn.
        for a, b in zip(on[skip_first:], off[skip_first:]):
            self.assertEqual(a["prompt_tokens"], b["prompt_tokens"])
            self.assertGreater(b["recomputed"], a["recomputed"] + 5, (a, b))
        for r in on + off:
            self.assertIn(r["finish_reason"], ("stop", "tool_calls"), r)
            self.assertGreater(r["reasoning_tokens"], 0, r)

    def test_chat_turns_under_deepseek_r1_and_qwen3(self):
        for name in ("deepseek-r1", "qwen3"):
            with self.subTest(template=name):
                on, _ = template_turns.run(BIN, TEMPLATES, name, True, 3, 0.1)
                off, _ = template_turns.run(BIN, TEMPLATES, name, False, 3, 0.1)
                self.check(on, off)

    def test_an_agents_next_question_after_a_tool_loop(self):
        on, warmed = template_turns.run_agent(BIN, TEMPLATES, True, 0.1)
        off, _ = template_turns.run_agent(BIN, TEMPLATES, False, 0.1)
        self.assertGreater(warmed, 0)
        self.check(on, off)
        # The question after the loop: Qwen3's template drops the loop's reasoning, so without
        # a warm-up the whole loop is computed again.
        self.assertGreater(off[3]["recomputed"], 5 * on[3]["recomputed"], (on[3], off[3]))
        self.assertEqual(on[3]["miss"]["at_message"], 7, on[3])

    def test_reasoning_and_tool_calls_through_the_openai_client(self):
        template = os.path.join(TEMPLATES, "qwen3.jinja")
        with ArborServer(BIN, "--chat-template", template) as s:
            c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="none", max_retries=0)
            r = c.chat.completions.create(
                model=c.models.list().data[0].id, messages=[{"role": "user", "content": "Find notes on caches."}],
                tools=template_turns.TOOLS, max_tokens=600, temperature=0,
                extra_body={"structured_outputs": {"regex": template_turns.CALL}},
            )
            m = r.choices[0].message
            self.assertEqual(r.choices[0].finish_reason, "tool_calls")
            self.assertTrue(m.reasoning_content)
            self.assertEqual(m.tool_calls[0].function.name, "search")
            self.assertGreater(r.usage.completion_tokens_details.reasoning_tokens, 0)


if __name__ == "__main__":
    unittest.main()
