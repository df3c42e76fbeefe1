"""Structured output of `arbor serve` through the real `openai` client: `parse` with a Pydantic
model, tools forced with tool_choice, and a property test: over 100 generated JSON schemas
(objects, arrays, enums, bounded numbers, nesting, optional fields), every constrained reply
of the default model parses and validates against its schema (the `jsonschema` package, not
the library that constrained it). The same prompts without constraints are counted too.

Run by scripts/test.sh: ARBOR_BIN=target/debug/arbor python -m unittest tests/e2e/test_structured.py
"""

import json
import os
import random
import sys
import unittest
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import jsonschema
import openai
from pydantic import BaseModel, Field

sys.path.insert(0, os.path.dirname(__file__))
from arbor_server import ArborServer  # noqa: E402

BIN = os.environ.get("ARBOR_BIN", "target/debug/arbor")
MODEL = "smollm2"
SERVER = None


def setUpModule():
    global SERVER
    SERVER = ArborServer(BIN, "--served-model-name", MODEL, "--kv-slots", "32768",
                         "--tool-call-parser", "hermes").__enter__()


def tearDownModule():
    code = SERVER.stop()
    assert code == 0, f"arbor serve exited with {code}:\n{SERVER.logs()}"


def client():
    return openai.OpenAI(base_url=SERVER.base_url + "/v1", api_key="none", max_retries=0)


class Address(BaseModel):
    city: str = Field(max_length=20)
    country_code: str = Field(min_length=2, max_length=2)


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    address: Address
    nickname: Optional[str] = Field(default=None, max_length=12)


def gen_schema(rng, depth=0):
    """A random JSON schema whose every instance is short (strings, arrays, nesting bounded)."""
    kinds = ["string", "integer", "number", "boolean", "enum", "array"]
    if depth < 2:
        kinds += ["object", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        s = {"type": "string", "maxLength": rng.randint(1, 16)}
        if rng.random() < 0.3:
            s["minLength"] = rng.randint(1, s["maxLength"])
        return s
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        lo = rng.uniform(-100, 100)
        return {"type": "number", "minimum": round(lo, 2), "maximum": round(lo + rng.uniform(0.5, 50), 2)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        pool = ["red", "green", "blue", "north", "south", "yes", "no", 1, 2, 3, True, None]
        return {"enum": rng.sample(pool, rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": gen_schema(rng, depth + 1), "maxItems": rng.randint(1, 3),
                **({"minItems": 1} if rng.random() < 0.5 else {})}
    names = rng.sample(["id", "name", "kind", "score", "tags", "owner", "size", "flag", "note", "level"],
                       rng.randint(1, 4))
    props = {n: gen_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def top_schema(rng):
    s = gen_schema(rng)
    if s.get("type") != "object":
        s = {"type": "object", "properties": {"value": s}, "required": ["value"], "additionalProperties": False}
    return s


class Structured(unittest.TestCase):
    def test_parse_with_a_pydantic_model(self):
        r = client().chat.completions.parse(
            model=MODEL, response_format=Person, temperature=0.7, seed=3, max_tokens=300,
            messages=[{"role": "user", "content": "Invent a person who lives in France."}])
        p = r.choices[0].message.parsed
        self.assertIsInstance(p, Person)
        self.assertIn(p.role, ("admin", "user", "guest"))
        self.assertEqual(len(p.address.country_code), 2)

    def test_tool_choice_forces_a_call_of_the_named_tool(self):
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                             "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
                 {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]
        for stream in (False, True):
            args = dict(model=MODEL, tools=tools, max_tokens=200, temperature=0,
                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                        messages=[{"role": "user", "content": "Weather in Oslo?"}])
            if stream:
                calls, finish = {}, None
                for ch in client().chat.completions.create(stream=True, **args):
                    for d in ch.choices[0].delta.tool_calls or []:
                        calls.setdefault(d.index, {"name": "", "arguments": ""})
                        calls[d.index]["name"] += d.function.name or ""
                        calls[d.index]["arguments"] += d.function.arguments or ""
                    finish = ch.choices[0].finish_reason or finish
                got = list(calls.values())
            else:
                r = client().chat.completions.create(**args)
                finish = r.choices[0].finish_reason
                got = [{"name": c.function.name, "arguments": c.function.arguments}
                       for c in r.choices[0].message.tool_calls]
            self.assertEqual(finish, "tool_calls")
            self.assertEqual(len(got), 1)
            self.assertEqual(got[0]["name"], "get_weather")
            a = json.loads(got[0]["arguments"])
            self.assertIn(a["unit"], ("C", "F"))

    def test_every_constrained_reply_validates_over_100_generated_schemas(self):
        rng = random.Random(20261201)
        schemas = [top_schema(rng) for _ in range(100)]
        text = json.dumps(schemas)
        for kind in ('"array"', '"number"', '"integer"', '"enum"', '"minLength"'):
            self.assertIn(kind, text)
        self.assertTrue(any(len(s["required"]) < len(s["properties"]) for s in schemas), "optional fields")

        def ask(i, constrained):
            s = schemas[i]
            kw = dict(model=MODEL, temperature=0.8, seed=i, max_tokens=600,
                      messages=[{"role": "user", "content": "Reply with JSON matching this schema: " + json.dumps(s)}])
            if constrained:
                kw["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": f"s{i}", "schema": s, "strict": True}}
            else:
                kw["max_tokens"] = 200
            c = client().chat.completions.create(**kw).choices[0]
            return c.finish_reason, c.message.content

        def valid(i, text):
            try:
                jsonschema.validate(json.loads(text), schemas[i])
                return True
            except Exception:  # noqa: BLE001 - any failure is "not valid"
                return False

        with ThreadPoolExecutor(8) as pool:
            constrained = list(pool.map(lambda i: ask(i, True), range(100)))
        # A reply the model ended is valid, always. One cut off by max_tokens cannot be (a
        # schema without bounds on a number's digits lets a sampled model write digits until
        # it runs out); those are counted, and must stay rare.
        invalid = [f"schema {i} {json.dumps(schemas[i])}: {t!r}"
                   for i, (f, t) in enumerate(constrained) if f == "stop" and not valid(i, t)]
        self.assertEqual(invalid, [], "\n".join(invalid[:5]))
        cut = [i for i, (f, _) in enumerate(constrained) if f != "stop"]
        self.assertLessEqual(len(cut), 3, [constrained[i] for i in cut])
        line = f"constrained: {100 - len(cut)}/100 ended by the model, all valid; {len(cut)} cut off at max_tokens"
        if os.environ.get("ARBOR_STRUCTURED_COMPARE"):
            with ThreadPoolExecutor(8) as pool:
                free = list(pool.map(lambda i: ask(i, False), range(100)))
            line += f"; unconstrained: {sum(valid(i, t) for i, (_, t) in enumerate(free))}/100 valid"
        print("\n" + line, file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
