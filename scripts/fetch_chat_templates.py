#!/usr/bin/env python3
"""Fetches published chat templates of reasoning models into models/templates/ (not committed).

The templates are the ones published with DeepSeek-R1 and Qwen3 as llama.cpp keeps them under
models/templates/. No model hub is reachable here, so they come from PyPI: llama-cpp-python's
source distribution vendors llama.cpp, templates included. The archive is pinned by version and
SHA-256; only the named templates are extracted.

    python3 scripts/fetch_chat_templates.py [--dest models/templates]

Prints the directory. Honours PIP_INDEX_URL (a PyPI mirror's simple index).
"""

import argparse
import hashlib
import html.parser
import os
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
ARCHIVE = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TEMPLATES = {
    # name here: path inside the archive
    "deepseek-r1.jinja": "vendor/llama.cpp/models/templates/deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja",
    "qwen3.jinja": "vendor/llama.cpp/models/templates/Qwen-Qwen3-0.6B.jinja",
}


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = {}

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href", "")
            name = urllib.parse.unquote(href.split("#")[0].rsplit("/", 1)[-1])
            self.links[name] = href


def archive_url():
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page_url = f"{index}/{PACKAGE}/"
    with urllib.request.urlopen(page_url, timeout=60) as r:
        page = r.read().decode()
    links = Links()
    links.feed(page)
    if ARCHIVE not in links.links:
        sys.exit(f"{ARCHIVE} is not listed at {page_url}")
    return urllib.parse.urljoin(page_url, links.links[ARCHIVE])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=os.path.join(os.environ.get("ARBOR_MODELS_DIR", "models"), "templates"))
    args = ap.parse_args()
    if all(os.path.exists(os.path.join(args.dest, n)) for n in TEMPLATES):
        print(args.dest)
        return
    os.makedirs(args.dest, exist_ok=True)
    url = archive_url()
    print(f"fetching {ARCHIVE} from {url.split('#')[0]} for its chat templates ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, ARCHIVE)
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=300) as r, open(path, "wb") as f:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != SHA256:
            sys.exit(f"{ARCHIVE}: SHA-256 {digest.hexdigest()}, expected {SHA256}")
        prefix = f"llama_cpp_python-{VERSION}/"
        with tarfile.open(path) as tar:
            for name, member in TEMPLATES.items():
                src = tar.extractfile(prefix + member)
                if src is None:
                    sys.exit(f"{member} is not a file in {ARCHIVE}")
                with open(os.path.join(args.dest, name), "wb") as out:
                    out.write(src.read())
    print(args.dest)


if __name__ == "__main__":
    main()
