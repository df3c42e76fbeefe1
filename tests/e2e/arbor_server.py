"""Starts and stops `arbor serve` for the end-to-end tests (a free port, logs to a file)."""

import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request


class ArborServer:
    """`with ArborServer(binary, *flags) as s:` gives s.base_url ("http://127.0.0.1:PORT")."""

    def __init__(self, binary, *flags, startup_timeout=120):
        self.binary = binary
        self.flags = list(flags)
        self.startup_timeout = startup_timeout
        self.proc = None
        self.log = None
        self.base_url = None
        self.exit_code = None

    def __enter__(self):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="arbor-serve-", suffix=".log", delete=False)
        env = dict(os.environ, ARBOR_LOG=os.environ.get("ARBOR_LOG", "warn"))
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--port", "0", *self.flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"arbor serve exited at start:\n{self.logs()}")
            m = re.search(r"on (http://[0-9.:]+)/v1", self.logs())
            if m:
                self.base_url = m.group(1)
                if self._healthy():
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"arbor serve did not start in {self.startup_timeout}s:\n{self.logs()}")

    def _healthy(self):
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def logs(self):
        with open(self.log.name) as f:
            return f.read()

    def metrics(self):
        """The unlabelled and labelled samples of /metrics as {name: value}."""
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_warmups(self, timeout=60):
        """Waits until no history warm-up is queued or running."""
        deadline = time.time() + timeout
        while self.metrics().get("arbor_history_warmups", 0) > 0:
            if time.time() > deadline:
                raise RuntimeError(f"history warm-ups still queued {timeout} s on")
            time.sleep(0.05)

    def settle(self, timeout=60):
        """Waits until nothing runs or waits; returns (metrics, problems): slots held by
        requests, or free + cached != total, are problems."""
        deadline = time.time() + timeout
        problems = []
        while True:
            m = self.metrics()
            # History warm-ups run after replies and hold slots while they run.
            if m["arbor_requests_running"] == 0 and m["arbor_queue_length"] == 0 and m.get("arbor_history_warmups", 0) == 0:
                break
            if time.time() > deadline:
                problems.append(f"requests still in flight {timeout} s after the load: {m}")
                break
            time.sleep(0.2)
        m = self.metrics()
        total, free, cached, used = (m[f"arbor_kv_slots_{k}"] for k in ("total", "free", "cached", "used"))
        if used != 0 or free + cached != total:
            problems.append(f"KV slots unaccounted: total {total}, free {free}, cached {cached}, used {used}")
        return m, problems

    def rss_mib(self):
        """The server's resident memory now, in MiB (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, timeout=60):
        """SIGTERM, then wait; returns the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode if self.proc else None
        return self.exit_code

    def __exit__(self, *exc):
        self.stop()
        return False
