#!/usr/bin/env python3
"""Tokens each turn of a conversation recomputes when the chat template rewrites history.

Serves the default model's weights with a reasoning model's published chat template
(DeepSeek-R1's, Qwen3's: fetched by scripts/fetch_chat_templates.py) and holds a multi-turn
conversation through the OpenAI API, the way a client does: each reply goes back as its
`content` (reasoning not sent back, as OpenAI's clients do). Replies are shaped like a
reasoning model's (a think block, then an answer) by a regular-expression constraint, since
the small default model does not reason by itself. Per turn it records the prompt's tokens,
those found in the cache, and where the prompt left the cache (`usage.prompt_cache_miss`),
with history warm-ups on (the default) and off (`--no-history-warmup`), in one run, and each
turn's time to first token (replies are streamed).

    python3 scripts/template_turns.py --arbor target/release/arbor [--turns 5] [--json out.json]

The floor a turn can reach is its new message: the prompt's tokens from where it first differs
from the same conversation with another newest message.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))
from arbor_server import ArborServer  # noqa: E402

SYSTEM = (
    "You are a careful assistant for a team of software engineers. Answer in plain English, "
    "briefly, and say when you are unsure. The team runs inference servers for chat "
    "assistants, coding agents and retrieval-augmented generation in production. "
) * 4
QUESTIONS = [
    "What is a prefix cache?",
    "Why do chat templates matter for it?",
    "What does a reasoning model add to the picture?",
    "How would you measure the effect?",
    "Summarize the discussion in one sentence.",
    "What should we try next?",
    "Which numbers would convince you?",
    "Anything else?",
]
# A think block then an answer, in the shape each template's replies take.
WORDS = "[a-z]{1,9}( [a-z]{1,9}){%d,%d}\\."
TEMPLATES = {
    # DeepSeek-R1's template opens the think block in the prompt.
    "deepseek-r1": ("deepseek-r1", WORDS % (30, 60) + "\n</think>\n\n" + WORDS % (8, 20)),
    # Qwen3's leaves it to the reply.
    "qwen3": ("qwen3", "<think>\n" + WORDS % (30, 60) + "\n</think>\n\n" + WORDS % (8, 20)),
}


def post(base, path, body):
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def chat(base, body):
    """A streamed chat completion: (the reply's message, finish_reason, usage, seconds to the
    first generated token)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    req = urllib.request.Request(
        base + "/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    started = time.perf_counter()
    ttft = None
    msg = {"content": "", "reasoning_content": "", "tool_calls": []}
    finish = usage = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                d = c.get("delta", {})
                got = d.get("content") or d.get("reasoning_content") or d.get("tool_calls")
                if got and ttft is None:
                    ttft = time.perf_counter() - started
                msg["content"] += d.get("content") or ""
                msg["reasoning_content"] += d.get("reasoning_content") or ""
                for call in d.get("tool_calls") or []:
                    msg["tool_calls"].append({k: call[k] for k in ("id", "type", "function")})
                finish = c.get("finish_reason") or finish
    return msg, finish, usage, ttft


def floor_tokens(base, messages):
    """The fewest tokens any cache leaves this turn to compute: the prompt's tokens from where
    it starts to differ from the same conversation with another newest message."""
    prompt = post(base, "/tokenize", {"messages": messages, "add_generation_prompt": True})["tokens"]
    other = messages[:-1] + [dict(messages[-1], content="1.\n" + messages[-1]["content"][::-1])]
    other = post(base, "/tokenize", {"messages": other, "add_generation_prompt": True})["tokens"]
    shared = 0
    while shared < min(len(prompt), len(other)) and prompt[shared] == other[shared]:
        shared += 1
    return len(prompt) - shared


def row(turn, u, finish, ttft, floor):
    """One turn's figures from its usage."""
    cached = u["prompt_tokens_details"]["cached_tokens"]
    return {
        "turn": turn,
        "prompt_tokens": u["prompt_tokens"],
        "cached_tokens": cached,
        "recomputed": u["prompt_tokens"] - cached,
        "floor": floor,
        "reasoning_tokens": (u.get("completion_tokens_details") or {}).get("reasoning_tokens"),
        "completion_tokens": u["completion_tokens"],
        "finish_reason": finish,
        "miss": u.get("prompt_cache_miss"),
        "ttft": round(ttft, 4),
    }


def run(arbor, template_dir, name, warm, turns, pause):
    template, regex = TEMPLATES[name]
    flags = [
        "--chat-template", os.path.join(template_dir, f"{template}.jinja"),
        "--reasoning-parser", name,
    ]
    if not warm:
        flags.append("--no-history-warmup")
    rows = []
    with ArborServer(arbor, *flags) as s:
        messages = [{"role": "system", "content": SYSTEM}]
        for turn in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            msg, finish, u, ttft = chat(s.base_url, {
                "messages": messages, "max_tokens": 1500, "temperature": 0,
                "structured_outputs": {"regex": regex},
            })
            rows.append(row(turn + 1, u, finish, ttft, floor_tokens(s.base_url, messages)))
            messages.append({"role": "assistant", "content": msg["content"]})
            # The user reads and types (or the tool runs); the warm-up, if on, runs meanwhile
            # (waited for, so that a slow machine measures the same thing).
            time.sleep(pause)
            s.wait_warmups()
        warmed = s.metrics().get("arbor_history_warmup_tokens_total", 0)
    return rows, warmed


TOOLS = [{
    "type": "function",
    "function": {
        "name": "search",
        "description": "Searches the team's notes.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}]
THINK = "<think>\n" + WORDS % (30, 60) + "\n</think>\n\n"
CALL = THINK + '<tool_call>\n\\{"name": "search", "arguments": \\{"query": "[a-z]{1,9}( [a-z]{1,9}){1,5}"\\}\\}\n</tool_call>'
ANSWER = THINK + WORDS % (8, 20)
# An agent's loop on Qwen3's template: a question, two tool calls with their results, an
# answer; then the next question. The client sends each reply's reasoning back, as Qwen3's
# template expects inside a tool loop (it drops it once the next question comes).
AGENT_STEPS = [("user", CALL), ("tool", CALL), ("tool", ANSWER), ("user", CALL), ("tool", ANSWER)]


def run_agent(arbor, template_dir, warm, pause):
    flags = [
        "--chat-template", os.path.join(template_dir, "qwen3.jinja"),
        "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes",
    ]
    if not warm:
        flags.append("--no-history-warmup")
    rows = []
    with ArborServer(arbor, *flags) as s:
        messages = [{"role": "system", "content": SYSTEM}]
        last_call = None
        for step, (role, regex) in enumerate(AGENT_STEPS):
            if role == "user":
                messages.append({"role": "user", "content": QUESTIONS[step % len(QUESTIONS)]})
            else:
                messages.append({"role": "tool", "tool_call_id": last_call["id"],
                                 "content": "Notes: " + QUESTIONS[(step + 3) % len(QUESTIONS)] * 3})
            msg, finish, u, ttft = chat(s.base_url, {
                "messages": messages, "tools": TOOLS, "max_tokens": 1500, "temperature": 0,
                "structured_outputs": {"regex": regex},
            })
            rows.append(row(step + 1, u, finish, ttft, floor_tokens(s.base_url, messages)))
            back = {"role": "assistant", "content": msg["content"],
                    "reasoning_content": msg["reasoning_content"]}
            if msg.get("tool_calls"):
                back["tool_calls"] = msg["tool_calls"]
                last_call = msg["tool_calls"][0]
            messages.append(back)
            time.sleep(pause)
            s.wait_warmups()
        warmed = s.metrics().get("arbor_history_warmup_tokens_total", 0)
    return rows, warmed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arbor", default="target/release/arbor")
    ap.add_argument("--templates", help="directory of deepseek-r1.jinja and qwen3.jinja (fetched if absent)")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between a reply and the next turn")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    templates = args.templates or subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "fetch_chat_templates.py")],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    results = {}
    for name in [*TEMPLATES, "qwen3-agent"]:
        for warm in (False, True):
            if name == "qwen3-agent":
                rows, warmed = run_agent(args.arbor, templates, warm, args.pause)
            else:
                rows, warmed = run(args.arbor, templates, name, warm, args.turns, args.pause)
            key = f"{name} warm-up {'on' if warm else 'off'}"
            results[key] = {"turns": rows, "warmup_tokens": warmed}
            print(f"\n{key} (warm-up tokens computed: {int(warmed)})")
            print("turn  prompt  cached  recomputed  floor  ttft_ms  reply(reasoning)  miss at message: before | after")
            for r in rows:
                m = r["miss"] or {}
                where = f"{m.get('at_message')}: {m.get('text_before', '')!r} | {m.get('text_after', '')!r}" if m else "-"
                print(f"{r['turn']:>4}  {r['prompt_tokens']:>6}  {r['cached_tokens']:>6}  {r['recomputed']:>10}  "
                      f"{r['floor']:>5}  {1000 * r['ttft']:>7.0f}  {r['completion_tokens']:>5}({r['reasoning_tokens']})  {where}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
