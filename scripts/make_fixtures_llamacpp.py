"""Reference fixtures from llama.cpp (PyPI llama-cpp-python) on the default GGUF.

Writes fixtures/llamacpp_smollm2.json with, for the default model:
  - tokenizations of tricky strings (special-token text parsed, no BOS);
  - greedy continuations (32 tokens) of chat prompts, with the top-20 logits at the first
    generated position and the top-5 at every position (to tell a near-tie from a bug);
  - next-token logits of short token sequences (top 20), where llama.cpp's arithmetic and
    Arbor's coincide operation for operation (see docs/CORRECTNESS.md).

Usage (about 10 minutes to compile llama.cpp on 2 cores):
  python3 -m venv V && V/bin/pip install 'llama-cpp-python==0.3.36' jinja2
  V/bin/python scripts/make_fixtures_llamacpp.py models/SmolLM2-135M-Instruct.Q4_1.gguf
The prompts are rendered with the GGUF's own chat template by jinja2 under transformers'
settings (trim_blocks, lstrip_blocks), so llama.cpp and Arbor see the same text.
"""
import json
import sys
from pathlib import Path

import jinja2
import numpy as np
from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).parent))
from fixture_inputs import CHAT_PROMPTS, RAW_PROMPTS, TRICKY_STRINGS  # noqa: E402

N_GEN = 32
# Short inputs on which llama.cpp and Arbor agree bit for bit (no SiLU or softmax input falls
# where ggml's vectorised expf and libm's expf round differently).
SHORT_SEQUENCES = [[504], [198], [6980], [1], [1, 4093], [504, 3725], [504, 3725, 60]]


def render(template, messages):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="<|im_start|>", eos_token="<|im_end|>")


def top(logits, k):
    idx = np.argsort(-logits, kind="stable")[:k]
    return [[int(i), float(logits[i])] for i in idx]


def main(model_path):
    llm = Llama(model_path=model_path, n_ctx=2048, n_threads=2, n_batch=512, logits_all=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    out = {"model": Path(model_path).name, "generator": "llama-cpp-python " + __import__("llama_cpp").__version__,
           "tokenize": [], "greedy": [], "short": []}
    for ids in SHORT_SEQUENCES:
        llm.reset()
        llm.eval(ids)
        out["short"].append({"ids": ids, "top20": top(np.array(llm.scores[len(ids) - 1], dtype=np.float32), 20)})
    for s in TRICKY_STRINGS:
        ids = llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
        out["tokenize"].append({"text": s, "ids": ids})
    prompts = [("chat", render(template, m)) for m in CHAT_PROMPTS] + [("raw", p) for p in RAW_PROMPTS]
    for kind, text in prompts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        gen, steps = [], []
        first_top20 = None
        for i in range(N_GEN):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            if first_top20 is None:
                first_top20 = top(logits, 20)
            t = int(np.argmax(logits))
            steps.append(top(logits, 5))
            gen.append(t)
            if t == llm.token_eos():
                break
            llm.eval([t])
        out["greedy"].append({"kind": kind, "text": text, "prompt_ids": ids, "generated": gen,
                              "first_top20": first_top20, "step_top5": steps})
        print(kind, len(ids), repr(llm.detokenize(gen).decode("utf-8", "replace"))[:80], flush=True)
    dst = Path(__file__).resolve().parent.parent / "fixtures" / "llamacpp_smollm2.json"
    dst.write_text(json.dumps(out, ensure_ascii=False, indent=1))
    print("wrote", dst)


if __name__ == "__main__":
    main(sys.argv[1])
