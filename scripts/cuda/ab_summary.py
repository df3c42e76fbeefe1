"""Medians of scripts/cuda/ab_engine.sh's runs, before vs after, as a Markdown table.

    python3 scripts/cuda/ab_summary.py OUT_DIR
"""
import json
import statistics
import sys
from pathlib import Path


def metrics(path):
    out = {}
    for r in json.loads(path.read_text())["results"]:
        if r["test"] == "decode":
            out[f"decode batch {r['batch']} (tok/s)"] = r["tokens_per_s"]
        else:
            out[f"prefill {r['tokens']} (tok/s)"] = r["tokens_per_s"]
    return out


def main():
    folder = Path(sys.argv[1])
    runs = {"before": [], "after": []}
    for which in runs:
        for p in sorted(folder.glob(f"{which}-*.json")):
            runs[which].append(metrics(p))
    if not runs["before"] or not runs["after"]:
        sys.exit(f"{folder}: no before-*.json / after-*.json runs")
    print("| measure | before (median) | after (median) | after / before | runs |")
    print("|---|---|---|---|---|")
    for key in runs["before"][0]:
        b = statistics.median(m[key] for m in runs["before"])
        a = statistics.median(m[key] for m in runs["after"])
        spread = [round(m[key]) for m in runs["before"]], [round(m[key]) for m in runs["after"]]
        print(f"| {key} | {b:,.0f} | {a:,.0f} | {a / b:.3f} | {spread[0]} vs {spread[1]} |")


if __name__ == "__main__":
    main()
