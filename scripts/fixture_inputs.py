"""Inputs shared by the fixture scripts: prompts, tricky strings, conversations.

The reference outputs are written by make_fixtures_llamacpp.py (llama.cpp via llama-cpp-python)
and make_fixtures_transformers.py (transformers); Arbor's tests read only the JSON they write.
"""

# Chat prompts for greedy continuations: varied topics, lengths and formats.
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash map is in two sentences."}],
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "List three primary colors."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish and German."}],
    [{"role": "user", "content": "What is 17 * 23? Show your work."}],
    [{"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],
    [{"role": "user", "content": "Summarize the plot of Romeo and Juliet in one paragraph."}],
    [{"role": "user", "content": "Give me a JSON object with keys name and age for a fictional person."}],
]

# Raw (template-free) prompts: exercises the plain-completion path.
RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
]

TRICKY_STRINGS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "multiple\n\nnewlines\n\n\nhere",
    "tabs\tand\t\tmore\ttabs",
    "Numbers: 1234567890 3.14159 -42 1e10",
    "naïve café résumé Ångström",
    "日本語のテキストと中文字符",
    "Emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside",
    "<|im_start|><|im_end|>",
    "URL: https://example.com/path?q=1&r=two#frag",
    "         many spaces",
    "\n",
    "a",
    "ALL CAPS AND lower case MiXeD",
    "don't won't it's we're they've I'd",
    "$$$ %%% ^^^ &&& *** (((",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What's 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "You speak like a pirate."},
     {"role": "user", "content": "Multi\nline\n\ncontent with  spaces "}],
    [{"role": "user", "content": "Unicode: 日本 😀 café"}],
]
