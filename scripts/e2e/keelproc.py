"""Shared by the e2e checks: starts the keel binary on ephemeral ports and
reads its bound addresses from the startup log line (so no check guesses a
free port), and records check outcomes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time


class Checks:
    """Prints each check as it runs; `finish` exits non-zero if any failed."""

    def __init__(self, name):
        self.name = name
        self.failures = []

    def __call__(self, condition, what):
        print(("ok   " if condition else "FAIL ") + what)
        if not condition:
            self.failures.append(what)

    def finish(self):
        if self.failures:
            print(f"{self.name}: {len(self.failures)} check(s) failed")
            sys.exit(1)
        print(f"{self.name}: all checks passed")


class Keel:
    def __init__(self, binary, env=None, args=None):
        self.binary = binary
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL")}
        full_env.update({
            "KEEL__GRPC__ADDR": "127.0.0.1:0",
            "KEEL__HTTP__ADDR": "127.0.0.1:0",
            "KEEL__ADMIN__ADDR": "127.0.0.1:0",
            "KEEL__LOG__FORMAT": "json",
            "KEEL__SHUTDOWN__DRAIN_DELAY": "0s",
        })
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [binary, *(args or []), "serve"],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = []
        self.addrs = {}
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("message") == "keel serving":
                    for key in ("grpc.addr", "http.addr", "admin.addr"):
                        if key in record:
                            self.addrs[key.split(".")[0]] = record[key]
                    ready.set()
            ready.set()

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()
        if not ready.wait(30) or "grpc" not in self.addrs:
            self.proc.kill()
            raise RuntimeError("keel did not start: " + "".join(self.lines) + self.proc.stderr.read())

    @property
    def grpc(self):
        return self.addrs["grpc"]

    def logs(self):
        return list(self.lines)

    def json_logs(self):
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def signal(self, sig=signal.SIGTERM):
        # The same as `kill -TERM <pid>`.
        self.proc.send_signal(sig)

    def stop(self, timeout=30):
        """SIGTERM, then the exit code and the seconds it took."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.pump.join(5)
        return code, time.monotonic() - started


def free_port():
    """A free loopback port, for a process that must get the same port
    again (a restarted server) or that takes no port 0 (Prometheus)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url):
    """The body of a GET, as text."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def ensure_prometheus():
    """Installs Debian's prometheus package (server and promtool) unless both
    are on PATH."""
    import shutil

    if shutil.which("promtool") and shutil.which("prometheus"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
