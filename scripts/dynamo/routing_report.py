#!/usr/bin/env python3
"""Per-turn cache hit ratio and time to first token from `arbor bench` result files.

    python3 scripts/dynamo/routing_report.py RESULT.json [RESULT.json ...]

For each target of each file, and each turn number: the cache hit ratio (prompt tokens served
from cache / prompt tokens), the median time to first token, and, from the second turn on,
how many turns landed where the conversation's previous turn ran. A turn counts as landed when
the cache held at least its previous turn's whole prompt (the previous turn's prompt is a
prefix of this one, and only the worker that ran it holds it all: the system prompt alone,
which all conversations share, is shorter). Failed requests are counted and shown.
"""

import json
import statistics
import sys
from collections import defaultdict


def report(path):
    with open(path) as f:
        results = json.load(f)
    by_target = defaultdict(list)
    for r in results["records"]:
        by_target[r["target"]].append(r)
    lines = []
    for target, records in by_target.items():
        ok = [r for r in records if not r.get("error")]
        failed = len(records) - len(ok)
        prev = {}
        for r in sorted(ok, key=lambda r: (r["repeat"], r["session"], r.get("branch") or -1, r["turn"])):
            prev[(r["repeat"], r["session"], r.get("branch"), r["turn"])] = r
        turns = sorted({r["turn"] for r in ok})
        total_p = sum(r.get("prompt_tokens") or 0 for r in ok)
        total_c = sum(r.get("cached_tokens") or 0 for r in ok)
        has_cached = all(r.get("cached_tokens") is not None for r in ok)
        head = f"{results['workload']} / {target}: {len(ok)} requests"
        if failed:
            errors = sorted({(r.get("error") or "")[:80] for r in records if r.get("error")})
            head += f", {failed} failed ({'; '.join(errors)})"
        if has_cached and total_p:
            head += f", hit ratio {100 * total_c / total_p:.1f}%"
        lines.append(head)
        lines.append("  turn  requests  hit ratio  TTFT p50 (ms)  landed on the holder")
        for t in turns:
            rs = [r for r in ok if r["turn"] == t]
            p = sum(r.get("prompt_tokens") or 0 for r in rs)
            c = sum(r.get("cached_tokens") or 0 for r in rs)
            ttfts = [r["ttft"] for r in rs if r.get("ttft") is not None]
            ttft = f"{1000 * statistics.median(ttfts):.0f}" if ttfts else "-"
            landed = "-"
            if t > 1 and has_cached:
                pairs = [
                    (r, prev.get((r["repeat"], r["session"], r.get("branch"), t - 1)))
                    for r in rs
                ]
                pairs = [(r, q) for r, q in pairs if q and q.get("prompt_tokens")]
                hits = sum(1 for r, q in pairs if r["cached_tokens"] >= q["prompt_tokens"])
                landed = f"{hits}/{len(pairs)}"
            ratio = f"{100 * c / p:.1f}%" if has_cached and p else "-"
            lines.append(f"  {t:>4}  {len(rs):>8}  {ratio:>9}  {ttft:>13}  {landed:>20}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n\n".join(report(p) for p in sys.argv[1:]))
