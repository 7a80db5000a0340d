"""Acceptance of the metrics with Prometheus' own tools: `promtool check
metrics` on a live /metrics, and a real Prometheus server scraping the admin
port. Installs Debian's prometheus package when it is missing."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keelproc import Checks, Keel, ensure_prometheus, free_port, http_get as get

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keel"
check = Checks("prometheus acceptance")


def exercise(keel, n):
    """n OK GetUser calls and one miss, through a plain gRPC client."""
    channel = grpc.insecure_channel(keel.grpc)
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    http = f"http://{keel.addrs['http']}"
    body = json.dumps({"user_id": "p1", "display_name": "P", "email": "p@example.com"}).encode()
    request = urllib.request.Request(f"{http}/v1/users", data=body, method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()
    for _ in range(n):
        urllib.request.urlopen(f"{http}/v1/users/p1", timeout=10).read()
    try:
        urllib.request.urlopen(f"{http}/v1/users/missing", timeout=10)
    except urllib.error.HTTPError:
        pass


def metric_value(text, name, labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def main():
    ensure_prometheus()
    keel = Keel(BINARY)
    admin = keel.addrs["admin"]
    scratch = tempfile.mkdtemp(prefix="keel-prom-")
    prometheus = None
    try:
        labels = {"grpc_service": "user.v1.UserService", "grpc_method": "GetUser", "grpc_type": "unary"}
        before = get(f"http://{admin}/metrics")
        check(metric_value(before, "grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 0,
              "GetUser OK series exists at 0 before any call")
        check(metric_value(before, "grpc_server_handled_total",
                           {"grpc_method": "DeleteUser", "grpc_code": "NotFound"}) == 0,
              "DeleteUser series exist before any call")
        n = 5
        exercise(keel, n)
        text = get(f"http://{admin}/metrics")
        ok = metric_value(text, "grpc_server_handled_total", {**labels, "grpc_code": "OK"})
        missed = metric_value(text, "grpc_server_handled_total", {**labels, "grpc_code": "NotFound"})
        check(ok == n and missed == 1, f"handled OK rose by {ok} (want {n}), NotFound by {missed} (want 1)")

        path = os.path.join(scratch, "metrics.txt")
        with open(path, "w") as f:
            f.write(text)
        with open(path) as f:
            lint = subprocess.run(["promtool", "check", "metrics"], stdin=f, capture_output=True, text=True)
        check(lint.returncode == 0, f"promtool check metrics is clean: {(lint.stdout + lint.stderr).strip() or 'no findings'}")

        port = free_port()
        config = os.path.join(scratch, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: keel\n    static_configs:\n"
                    f"      - targets: ['{admin}']\n")
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={scratch}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def query(expr):
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                return json.loads(get(url))["data"]["result"]
            except Exception:
                return []

        deadline = time.monotonic() + 30
        up = handled = []
        while time.monotonic() < deadline:
            up = query('up{job="keel"}')
            handled = query('grpc_server_handled_total{grpc_method="GetUser",grpc_code="OK"}')
            if up and up[0]["value"][1] == "1" and handled:
                break
            time.sleep(0.5)
        check(bool(up) and up[0]["value"][1] == "1", f"Prometheus scrapes the admin port with up == 1 ({up})")
        check(bool(handled) and float(handled[0]["value"][1]) == n,
              f"grpc_server_handled_total arrived in Prometheus ({handled})")
    finally:
        if prometheus:
            prometheus.terminate()
            prometheus.wait(10)
        keel.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    check.finish()


if __name__ == "__main__":
    main()
