"""Calling other services, checked against the built binary with two keel
processes: A calls B (`clients.peer`, required for readiness) with the
config of the README's "Calling other services" section, its endpoint
pointed at B. A's /readyz follows B down and back up on its own, A's
/metrics shows the health checks it made, `keel config` redacts client
tokens, bad client values exit 78 naming the key, and A's shutdown closes
the channel by name."""

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from keelproc import Checks, Keel, free_port

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keel"
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")
# How long A may take to notice B going or coming back: its checks are
# cached for 1s and bounded by 500ms, so a few seconds is generous.
NOTICE_SECONDS = 5

check = Checks("clients acceptance")


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return None, str(error)


def wait_for(what, condition, seconds):
    """Polls `condition` (returning (ok, detail)) until it holds; the time it took, or None."""
    started = time.monotonic()
    detail = ""
    while time.monotonic() - started < seconds:
        ok, detail = condition()
        if ok:
            return time.monotonic() - started
        time.sleep(0.1)
    print(f"     {what}: still not true after {seconds}s: {detail}")
    return None


def readme_config():
    """The ```yaml block of the README's "Calling other services" section."""
    with open(README) as f:
        text = f.read()
    section = re.search(r"^## Calling other services\n(.*?)(?=^## )", text, re.S | re.M)
    if not section:
        return None
    block = re.search(r"```yaml\n(.*?)```", section.group(1), re.S)
    return block.group(1) if block else None


def main():
    port = free_port()
    b_env = {"KEEL__GRPC__ADDR": f"127.0.0.1:{port}"}
    b = Keel(BINARY, b_env)
    config = readme_config()
    check(config is not None and "peer:" in config, "the README has the clients config of its guide")
    scratch = tempfile.mkdtemp(prefix="keel-clients-")
    path = os.path.join(scratch, "a.yaml")
    with open(path, "w") as f:
        f.write((config or "").replace("localhost:9100", f"127.0.0.1:{port}"))
    a = Keel(BINARY, {"KEEL__CLIENTS__PEER__TOKEN": "peer-token-s3cret"}, args=["--config", path])
    readyz = f"http://{a.addrs['admin']}/readyz"
    try:
        took = wait_for("A ready", lambda: (get(readyz)[0] == 200, get(readyz)), 10)
        check(took is not None, "A's /readyz is 200 while B serves")

        code, _ = b.stop()
        check(code == 0, f"B stopped cleanly ({code})")

        def down():
            status, body = get(readyz)
            return status == 503 and "peer" in body, (status, body)

        took = wait_for("A unready", down, NOTICE_SECONDS)
        check(took is not None, f"A's /readyz turns 503 naming peer within {NOTICE_SECONDS}s of B stopping"
              + (f" ({took:.1f}s)" if took is not None else ""))
        status, body = get(readyz + "?verbose")
        check("[-]clients.peer failed" in body, f"the verbose /readyz names the check: {body.strip()!r}")

        b = Keel(BINARY, b_env)
        took = wait_for("A ready again", lambda: (get(readyz)[0] == 200, get(readyz)), 10)
        check(took is not None, "A's /readyz recovers on its own once B is back"
              + (f" ({took:.1f}s)" if took is not None else ""))

        _, metrics = get(f"http://{a.addrs['admin']}/metrics")
        series = [line for line in metrics.splitlines()
                  if line.startswith("grpc_client_handled_total{") and 'grpc_client_target="peer"' in line
                  and 'grpc_method="Check"' in line]
        value = lambda code: sum(float(line.rsplit(" ", 1)[1]) for line in series if f'grpc_code="{code}"' in line)
        check(value("OK") >= 2, f"grpc_client_handled_total counts A's OK health checks to B ({value('OK')})")
        check(value("Unavailable") + value("DeadlineExceeded") >= 1,
              "grpc_client_handled_total counts the failed checks while B was down")
        check(any('grpc_client_target="gateway"' in line for line in metrics.splitlines()
                  if line.startswith("grpc_client_started_total{")), "the gateway's own series say target gateway")
        check("peer-token-s3cret" not in "".join(a.logs()), "the client token is never logged")
        failed = [line for line in a.json_logs()
                  if line.get("message") == "client call failed" and line.get("client") == "peer"]
        check(bool(failed) and all(line.get("grpc.code") and line.get("grpc.message") for line in failed),
              f"A logs its failed calls to B, with code and reason: {failed[:1]}")
    finally:
        a_code, _ = a.stop()
        b.stop()
    check(a_code == 0, f"A exits 0 ({a_code})")
    closed = [line for line in a.json_logs()
              if line.get("message") == "shutdown: client channel closed" and line.get("client") == "peer"]
    check(len(closed) == 1, "A's shutdown closes the peer channel and logs it")

    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL")}
    env["KEEL_CONFIG_DIR"] = scratch
    shown = subprocess.run([BINARY, "config"], capture_output=True, text=True, timeout=20,
                           env={**env, "KEEL__CLIENTS__PEER__ENDPOINT": "http://peer:9000",
                                "KEEL__CLIENTS__PEER__TOKEN": "peer-token-s3cret"})
    check(shown.returncode == 0 and "peer-token-s3cret" not in shown.stdout and "<redacted>" in shown.stdout,
          "keel config redacts client tokens")
    for extra, key in [
        ({"KEEL__CLIENTS__PEER__ENDPOINT": "ftp://peer:9000"}, "clients.peer.endpoint"),
        ({"KEEL__CLIENTS__PEER__ENDPOINT": "http://peer:9000", "KEEL__CLIENTS__PEER__TIMEOUT": "soon"},
         "clients.peer.timeout"),
        ({"KEEL__CLIENTS__PEER__ENDPOINT": "http://peer:9000", "KEEL__CLIENTS__PEER__RETRY__MAX_ATTEMPTS": "0"},
         "clients.peer.retry.max_attempts"),
    ]:
        out = subprocess.run([BINARY, "config"], env={**env, **extra}, capture_output=True, text=True, timeout=20)
        check(out.returncode == 78 and key in out.stderr, f"bad {key} exits 78 naming it: {out.stderr.strip()}")
    check.finish()


if __name__ == "__main__":
    main()
