"""Reference fixtures from transformers.

Writes:
  fixtures/chat_templates.json  the GGUF's chat template rendered by transformers'
                                apply_chat_template, with and without the generation prompt;
  fixtures/tiny-llama/, fixtures/tiny-qwen2/
                                tiny randomly initialised models saved by transformers
                                (safetensors; the Qwen2 one sharded) with the SmolLM2 tokenizer;
  fixtures/tiny_logits.json     transformers' logits for token sequences on both tiny models.

Usage:
  python3 -m venv V && V/bin/pip install torch transformers safetensors gguf
  V/bin/python scripts/make_fixtures_transformers.py models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from fixture_inputs import CONVERSATIONS, TRICKY_STRINGS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
# Vocabulary entries whose logits are recorded at every position (plus each position's argmax).
PROBE_IDS = list(range(0, 49152, 769))


def main(gguf_path):
    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    chats = []
    for conv in CONVERSATIONS:
        for gen in (True, False):
            chats.append({"messages": conv, "add_generation_prompt": gen,
                          "rendered": tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)})
    hf_tok = [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in TRICKY_STRINGS]
    (ROOT / "chat_templates.json").write_text(json.dumps(
        {"generator": f"transformers {transformers.__version__}", "template": tok.chat_template,
         "renderings": chats, "hf_tokenize": hf_tok}, ensure_ascii=False, indent=1))

    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), max_position_embeddings=2048, rms_norm_eps=1e-5,
                  initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    models = {
        "tiny-llama": LlamaForCausalLM(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            **common)),
        "tiny-qwen2": Qwen2ForCausalLM(Qwen2Config(
            hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, tie_word_embeddings=False, rope_theta=10000.0, **common)),
    }
    seqs = [tok.encode(t, add_special_tokens=False) for t in
            ["The quick brown fox jumps over the lazy dog.",
             "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
             "def f(x):\n    return x * 2\n" * 4]]
    logits_out = {"generator": f"transformers {transformers.__version__}, torch {torch.__version__}",
                  "probe_ids": PROBE_IDS, "models": {}}
    for name, model in models.items():
        model = model.to(torch.bfloat16).eval()
        d = ROOT / name
        shard = "300KB" if name == "tiny-qwen2" else "50MB"
        model.save_pretrained(d, safe_serialization=True, max_shard_size=shard)
        tok.save_pretrained(d)
        # The reference runs in float32 on the saved bf16 weights, as Arbor's CPU path does.
        ref = type(model).from_pretrained(d, torch_dtype=torch.float32).eval()
        cases = []
        with torch.no_grad():
            for ids in seqs:
                logits = ref(torch.tensor([ids])).logits[0]
                cases.append({"ids": ids,
                              "probe_logits": logits[:, PROBE_IDS].tolist(),
                              "argmax": logits.argmax(-1).tolist(),
                              "max_logit": logits.max(-1).values.tolist()})
        logits_out["models"][name] = cases
        print(name, "saved", sorted(p.name for p in d.iterdir()))
    (ROOT / "tiny_logits.json").write_text(json.dumps(logits_out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
