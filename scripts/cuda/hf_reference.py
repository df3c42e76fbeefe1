#!/usr/bin/env python3
"""transformers/PyTorch reference for the GPU path, run on the GPU machine itself.

Builds transformers' LlamaForCausalLM from a GGUF Llama-architecture model (weights
dequantized by the `gguf` package: the same values Arbor's GPU path dequantizes to bf16; Q and
K un-permuted back to Hugging Face's rotate-half layout), runs every greedy prompt of a
llama.cpp fixture, and writes the last-position logits and 32 greedy tokens per prompt:

    python3 scripts/cuda/hf_reference.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --fixture fixtures/llamacpp_smollm2.json --dtype bfloat16 --out OUT/hf-bf16.json

`arbor gpu-check --hf-reference OUT/hf-bf16.json` compares Arbor's GPU path with it. With
`--baseline OTHER.json` (a run in another dtype) it also reports how far transformers itself
moves between the two dtypes: the noise floor for the comparison. Greedy decoding is a plain
argmax loop with a KV cache that does not stop at end-of-sequence (as Arbor's check does).
The GPU machine has no `gguf` package: scripts/cuda/gpu_checks.sh puts a wheel carried from
here on PYTHONPATH (the conversion is done here rather than by transformers' own GGUF loader,
which also wants `accelerate`).
"""
import argparse
import json
import os
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.parts[f.data[0]]
    return v.tolist()[0] if len(v) == 1 else v.tolist()


def load_gguf_llama(path, dtype, device):
    """LlamaForCausalLM with the GGUF file's weights (dequantized to float32, then `dtype`)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(path)
    arch = bytes(field(r, "general.architecture")).decode()
    if arch != "llama":
        raise SystemExit(f"{path}: architecture {arch}, this script handles llama")
    g = lambda k, d=None: field(r, f"llama.{k}", d)
    heads, kv_heads = g("attention.head_count"), g("attention.head_count_kv")
    tensors = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = w.reshape(list(reversed([int(x) for x in t.shape])))
    hidden = g("embedding_length")
    cfg = LlamaConfig(
        vocab_size=tensors["token_embd.weight"].shape[0], hidden_size=hidden,
        intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=g("context_length"), rms_norm_eps=g("attention.layer_norm_rms_epsilon"),
        rope_theta=g("rope.freq_base", 10000.0), tie_word_embeddings="output.weight" not in tensors,
        attention_bias=False, mlp_bias=False)

    def unpermute(w, n_head):
        # llama.cpp's converter interleaved the rotary halves of Q and K; undo it.
        return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {"model.embed_tokens.weight": tensors["token_embd.weight"],
          "model.norm.weight": tensors["output_norm.weight"]}
    if "output.weight" in tensors:
        sd["lm_head.weight"] = tensors["output.weight"]
    for name, w in tensors.items():
        if not name.startswith("blk."):
            continue
        _, i, kind, _ = name.split(".")
        if kind == "attn_q":
            w = unpermute(w, heads)
        elif kind == "attn_k":
            w = unpermute(w, kv_heads)
        sd[f"model.layers.{i}.{names[kind]}.weight"] = w
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"weights do not match: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).to(device).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    model = load_gguf_llama(a.gguf, dtype, a.device)
    fixture = json.load(open(a.fixture))
    cases = []
    with torch.no_grad():
        for g in fixture["greedy"]:
            ids = torch.tensor([g["prompt_ids"]], device=a.device)
            out = model(ids, use_cache=True)
            last = out.logits[0, -1].float()
            tokens, past = [], out.past_key_values
            nxt = int(torch.argmax(last))
            for _ in range(a.tokens):
                tokens.append(nxt)
                out = model(torch.tensor([[nxt]], device=a.device), past_key_values=past,
                            use_cache=True)
                past = out.past_key_values
                nxt = int(torch.argmax(out.logits[0, -1]))
            cases.append({"prompt_ids": g["prompt_ids"],
                          "last_logits": [round(x, 4) for x in last.cpu().tolist()],
                          "greedy": tokens})
    result = {"model": os.path.basename(a.gguf), "dtype": a.dtype, "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
              "torch": torch.__version__, "transformers": transformers.__version__, "cases": cases}
    if a.baseline:
        base = json.load(open(a.baseline))
        rows = []
        for c, b in zip(cases, base["cases"]):
            x, y = torch.tensor(c["last_logits"]), torch.tensor(b["last_logits"])
            common = next((i for i, (p, q) in enumerate(zip(c["greedy"], b["greedy"])) if p != q),
                          len(c["greedy"]))
            rows.append({"max_abs_diff": float((x - y).abs().max()),
                         "relative": float((x - y).abs().max() / y.abs().max()),
                         "same_top1": int(x.argmax()) == int(y.argmax()),
                         "greedy_common_prefix": common})
        result["against_baseline"] = {
            "baseline_dtype": base["dtype"], "rows": rows,
            "worst_relative": max(r["relative"] for r in rows),
            "same_top1": sum(r["same_top1"] for r in rows),
            "greedy_identical": sum(r["greedy_common_prefix"] == a.tokens for r in rows)}
        print(json.dumps(result["against_baseline"], indent=1), file=sys.stderr)
    json.dump(result, open(a.out, "w"))


if __name__ == "__main__":
    main()
