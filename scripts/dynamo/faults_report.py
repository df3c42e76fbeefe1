#!/usr/bin/env python3
"""What happened around a killed and restarted worker (scripts/dynamo/faults.sh writes the input).

    python3 scripts/dynamo/faults_report.py OUT_DIR START KILLED RESTARTED

OUT_DIR holds faults.json and after-restart.json (arbor bench's records; the second
bench's times count from its own start) and workerN.log (the workers' JSON-lines
logs, with a "request" and a "finished" line per request at debug level). START, KILLED and
RESTARTED are Unix times (the bench's start, the SIGKILL, the restart).
"""

import datetime
import glob
import json
import os
import sys


def unix(iso):
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def worker_requests(path):
    """(time, message, fields) of the worker's own request lines."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("target") == "arbor_dynamo" and rec.get("message") in ("request", "finished"):
                out.append((unix(rec["time"]), rec["message"], rec))
    return out


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    out, start, killed, restarted = sys.argv[1], *map(float, sys.argv[2:])
    rel = lambda t: t - start
    records = []
    for name in ("faults.json", "after-restart.json"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as f:
                records += json.load(f)["records"]
    failed = [r for r in records if r.get("error")]
    print(f"worker 2 killed at {rel(killed):.1f} s, restarted at {rel(restarted):.1f} s")
    print(f"bench: {len(records)} requests, {len(records) - len(failed)} completed, {len(failed)} failed")
    for r in failed:
        end = r["sent_at"] + r["e2e"]
        print(f"  failed: sent at {r['sent_at']:.1f} s, ended at {end:.1f} s: {r['error'][:160]}")
    phases = [("before the kill", start, killed), ("worker 2 down", killed, restarted),
              ("after the restart", restarted, float("inf"))]
    for path in sorted(glob.glob(os.path.join(out, "worker*.log"))):
        name = os.path.basename(path)[: -len(".log")]
        lines = worker_requests(path)
        print(f"{name}:")
        for label, a, b in phases:
            started = [t for t, m, _ in lines if m == "request" and a <= t < b]
            done = [(t, rec) for t, m, rec in lines if m == "finished" and a <= t < b]
            cached = sum(int(rec.get("cached_tokens", 0)) for _, rec in done)
            line = f"  {label}: {len(started)} requests started, {len(done)} finished"
            if done:
                line += f", {cached} prompt tokens from its cache"
            if started and label == "after the restart":
                line += f"; first request {min(started) - restarted:.1f} s after the restart"
            print(line)
        unfinished = len([1 for _, m, _ in lines if m == "request"]) - len(
            [1 for _, m, _ in lines if m == "finished"])
        if unfinished:
            print(f"  {unfinished} requests started without a finished line (cut by the kill)")


if __name__ == "__main__":
    main()
