import subprocess, sys
from llama_cpp import Llama
m = sys.argv[1]
prompts = ["The history of the Roman Empire", "def fibonacci(n):", "Water boils at a temperature of", "The three primary colors are", "In machine learning, gradient descent"]
llm = Llama(model_path=m, n_ctx=512, n_threads=2, verbose=False)
same = 0
for p in prompts:
    ref = llm.create_completion(p, max_tokens=32, temperature=0.0)["choices"][0]["text"]
    out = subprocess.run([sys.argv[2] if len(sys.argv) > 2 else "target/release/arbor", "generate", "--model", m, "--raw", "--max-tokens", "32", "--temperature", "0", "--ignore-eos", "-p", p], capture_output=True, text=True).stdout
    common = 0
    while common < min(len(ref), len(out)) and ref[common] == out[common]:
        common += 1
    same += ref == out
    print(repr(p), "common chars", common, "of", len(ref), "| llama.cpp:", repr(ref[:60]), "| arbor:", repr(out[:60]))
print("identical", same, "of", len(prompts))
