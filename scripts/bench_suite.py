#!/usr/bin/env python3
"""The benchmark suite behind `scripts/bench`: keel (release, every layer on)
against the bare tonic server and the bare axum->tonic REST hop of
`benches/bare/`, round by round, with the results as a markdown table.

Each round runs every scenario against both targets, in alternating order
(bare first in even rounds, keel first in odd ones) so drift in the
machine's load falls on both. A ratio is keel / bare within one round; the
table shows the median over rounds of those paired ratios, and the medians
of the raw figures beside them.

The saturation rows (gRPC GetUser, REST GET, ListUsers) come from a
phase of their own in each round: keel and bare are both started, and
loaded in turn, several short runs each (--pairs, alternating which goes
first). A round's ratio is the median of its pairs' ratios. On a 2-core machine the same binary's saturation
throughput swings by a quarter from one run to the next (which connection
lands on which worker, and what else the host runs), so one 10-second run
per target per round minutes apart, as before, moved the 3-round median
by more than the margin the targets leave.

Only the standard library: the load comes from h2load, wrk and the Rust
`bench-client`; this script starts processes, reads /proc and does sums.
"""

import argparse
import http.client
import json
import os
import platform
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
USER_ID = "u000000"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Ports far from keel's defaults, so a keel run by hand does not collide.
KEEL_GRPC, KEEL_HTTP, KEEL_ADMIN = 29000, 29080, 29081
BARE_GRPC, BARE_REST = 29100, 29180


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def cpu_seconds(pid):
    """utime + stime of a process, from /proc/<pid>/stat (fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def poll(what, check, timeout=30.0, interval=0.002):
    """Calls `check` until it returns a true value; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def tcp_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port, path, headers=None, timeout=2.0):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def http_ok(port, path):
    try:
        return http_get(port, path)[0] == 200
    except OSError:
        return False


class Server:
    """One started process, its readiness probe and its shutdown."""

    def __init__(self, name, argv, env, ready, log_path):
        self.name = name
        self.started = time.monotonic()
        # Appending: the two bare processes share one file.
        with open(log_path, "ab") as stdout:
            self.process = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            poll(f"{name} to be ready", lambda: self.process.poll() is None and ready() or self.exited())
        except Exception:
            self.kill()
            raise
        if self.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {self.process.returncode} before it was ready")
        self.ready_seconds = time.monotonic() - self.started

    def exited(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode} (see its log)")
        return False

    @property
    def pid(self):
        return self.process.pid

    def stop(self):
        """SIGTERM, then the time until the process has exited."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        return time.monotonic() - start

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Target:
    """keel, or the bare pair: how to start it, where to send load, and
    which processes its CPU is counted over."""

    def __init__(self, name, bins, work):
        self.name = name
        self.bins = bins
        self.work = work
        self.servers = []

    @property
    def keel(self):
        return self.name == "keel"

    @property
    def grpc_port(self):
        return KEEL_GRPC if self.keel else BARE_GRPC

    @property
    def rest_port(self):
        return KEEL_HTTP if self.keel else BARE_REST

    def start(self, phase, rest=True):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL") and k != "RUST_LOG"}
        if self.keel:
            env.update(
                KEEL_ENV="production",
                KEEL_CONFIG_DIR=str(ROOT / "config"),
                KEEL__AUTH__TOKENS=TOKEN,
                KEEL__GRPC__ADDR=f"127.0.0.1:{KEEL_GRPC}",
                KEEL__HTTP__ADDR=f"127.0.0.1:{KEEL_HTTP}",
                KEEL__ADMIN__ADDR=f"127.0.0.1:{KEEL_ADMIN}",
                # Teardown between runs should not wait the production 5s;
                # the lifecycle scenario measures shutdown with it at 0 too.
                KEEL__SHUTDOWN__DRAIN_DELAY="0s",
            )
            # stdout to a file, as a container runtime's log pipe takes it.
            stdout = self.work / f"keel-stdout-{phase}.log"
            stdout.write_bytes(b"")
            self.servers = [
                Server("keel", [self.bins / "keel", "serve"], env, lambda: http_ok(KEEL_ADMIN, "/readyz"), stdout)
            ]
        else:
            stdout = self.work / f"bare-stdout-{phase}.log"
            stdout.write_bytes(b"")
            grpc = Server(
                "bare-grpc", [self.bins / "bare-grpc", f"127.0.0.1:{BARE_GRPC}"], env,
                lambda: tcp_open(BARE_GRPC), stdout,
            )
            self.servers = [grpc]
            if rest:
                self.servers.append(
                    Server(
                        "bare-rest",
                        [self.bins / "bare-rest", f"127.0.0.1:{BARE_REST}", f"http://127.0.0.1:{BARE_GRPC}"],
                        env, lambda: tcp_open(BARE_REST), stdout,
                    )
                )
        return self

    @property
    def grpc_pid(self):
        return self.servers[0].pid

    def cpu(self, rest=False):
        """CPU seconds of the process(es) a scenario runs through: for the
        bare REST hop, both the axum process and the tonic one."""
        servers = self.servers if rest else self.servers[:1]
        return sum(cpu_seconds(s.pid) for s in servers)

    def stop(self):
        times = [s.stop() for s in self.servers]
        self.servers = []
        return times[0]

    def kill(self):
        for s in self.servers:
            s.kill()
        self.servers = []

    def handled(self, method):
        """keel's grpc_server_handled_total of one method, by code; {} for
        bare, which counts nothing."""
        if not self.keel:
            return {}
        _, body = http_get(KEEL_ADMIN, "/metrics")
        codes = {}
        for line in body.decode().splitlines():
            if line.startswith("grpc_server_handled_total{") and f'grpc_method="{method}"' in line:
                code = re.search(r'grpc_code="([^"]+)"', line).group(1)
                codes[code] = codes.get(code, 0) + float(line.rsplit(" ", 1)[1])
        return codes


def codes_between(before, after):
    """Calls by code (OK left out) that ended between two scrapes."""
    deltas = {code: int(after.get(code, 0) - before.get(code, 0)) for code in after if code != "OK"}
    return {code: n for code, n in deltas.items() if n}


def errors_between(before, after):
    """Failed calls between two scrapes. Canceled is left out: it is the
    load tool closing its connections with calls in flight when a run
    ends (wrk does), not a server failure; it is kept in the raw results."""
    return sum(n for code, n in codes_between(before, after).items() if code != "Canceled")


def client(bins, target, *args):
    argv = [bins / "bench-client", "--addr", f"http://127.0.0.1:{target.grpc_port}", "--token", TOKEN, *map(str, args)]
    return argv


def run_client(bins, target, *args, timeout=300):
    out = subprocess.run(client(bins, target, *args), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench-client {args[0]} failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- load tools


def grpc_frame(user_id):
    message = b"\x0a" + bytes([len(user_id)]) + user_id.encode()
    return b"\x00" + len(message).to_bytes(4, "big") + message


def percentiles(log_file):
    durations = []
    with open(log_file) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1].strip() == "200":
                durations.append(int(parts[2]))
    if not durations:
        return None, None
    durations.sort()
    pick = lambda q: durations[min(len(durations) - 1, int(q * len(durations)))] / 1000.0
    return pick(0.50), pick(0.99)


def h2load(url, seconds, work, clients, streams, rps=None, h1=False, body=None, warmup=1):
    argv = ["h2load", "-D", str(seconds), "-c", str(clients), "-m", str(streams),
            "-H", f"authorization: Bearer {TOKEN}"]
    if warmup:
        argv += ["--warm-up-time", str(warmup)]
    if h1:
        argv.append("--h1")
    if body is not None:
        argv += ["-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body)]
    log_file = work / "h2load-latency.tsv"
    if rps:
        argv += ["--rps", str(max(1, rps // clients)), "--log-file", str(log_file)]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + warmup + 60)
    text = out.stdout
    match = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", text)
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
    status = re.search(r"status codes: (\d+) 2xx", text)
    if not match or not done:
        raise RuntimeError(f"cannot read h2load's output: {text[-800:]} {out.stderr[-400:]}")
    result = {
        "rps": float(match.group(1)),
        "done": int(done.group(2)),
        "client_failed": int(done.group(4)) + int(done.group(5)),
        "http_2xx": int(status.group(1)) if status else 0,
    }
    if rps:
        result["p50_ms"], result["p99_ms"] = percentiles(log_file)
        log_file.unlink(missing_ok=True)
    return result


def wrk(url, seconds, connections=64, threads=2):
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency",
            "-H", f"Authorization: Bearer {TOKEN}", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    text = out.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not rps:
        raise RuntimeError(f"cannot read wrk's output: {text[-800:]} {out.stderr[-400:]}")
    requests = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)

    def latency(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return None
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    return {
        "rps": float(rps.group(1)),
        "requests": int(requests.group(1)) if requests else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
        "sat_p50_ms": latency("50"),
        "sat_p99_ms": latency("99"),
    }


# ---------------------------------------------------------------- scenarios


def host_steal():
    """(steal, total) CPU ticks of the whole machine from /proc/stat: the
    time the hypervisor ran something else while this VM wanted the CPU.
    A run with much steal is a noisy run, whatever the target."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user).
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before, after):
    """The share of the machine's CPU time stolen between two host_steal()
    readings, in percent."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else None


def measure_cpu(target, rest, action):
    """Runs `action` and returns (its result, CPU seconds the target used)."""
    before = target.cpu(rest)
    result = action()
    return result, target.cpu(rest) - before


def saturation_pairs(targets, args, bins, work):
    """The saturation runs of scenarios 1, 2 and 3a, on both targets started
    side by side with users seeded: `args.pairs` pairs of short runs, each
    pair loading bare and keel in turn (the first of the pair alternating)
    with a gRPC GetUser run, a REST GET run and a ListUsers run. An idle
    server costs next to nothing, so each run has the machine to itself.
    Returns each target's figures (medians over the pairs, errors summed)
    and the round's ratios (medians of the pairs' keel / bare)."""
    body = work / "get_user.bin"
    runs = {name: [] for name in targets}
    # keel's non-OK calls by code, per scenario, summed over its runs.
    codes = {"grpc": {}, "rest": {}, "list": {}}

    def counted(target, scenario, method, action):
        """Runs `action`; on keel, adds the non-OK calls of `method` that
        ended meanwhile to `codes[scenario]`."""
        before = target.handled(method)
        result = action()
        for code, n in codes_between(before, target.handled(method)).items():
            codes[scenario][code] = codes[scenario].get(code, 0) + n
        return result

    for target in targets.values():
        # The bare hop opens its channel on the first call.
        wrk(f"http://127.0.0.1:{target.rest_port}/v1/users/{USER_ID}", 1)
    for i in range(args.pairs):
        for name in (["bare", "keel"] if i % 2 == 0 else ["keel", "bare"]):
            target = targets[name]
            grpc_url = f"http://127.0.0.1:{target.grpc_port}/user.v1.UserService/GetUser"
            rest_url = f"http://127.0.0.1:{target.rest_port}/v1/users/{USER_ID}"
            # No warm-up (seeding warmed the server), so the CPU delta and
            # the request count cover the same run.
            stolen = host_steal()
            sat, cpu = counted(target, "grpc", "GetUser", lambda: measure_cpu(
                target, False, lambda: h2load(grpc_url, args.pair_seconds, work, 4, 64, body=body, warmup=0)
            ))
            stolen = steal_share(stolen, host_steal())
            rest, rest_cpu = counted(target, "rest", "GetUser", lambda: measure_cpu(
                target, True, lambda: wrk(rest_url, args.pair_seconds)
            ))
            listed, list_cpu = counted(target, "list", "ListUsers", lambda: measure_cpu(
                target, False, lambda: run_client(bins, target, "list", "--seconds", args.list_seconds)
            ))
            runs[name].append({
                "grpc_rps": sat["rps"],
                "grpc_cpu_us": cpu / max(1, sat["done"]) * 1e6,
                "grpc_client_failed": sat["client_failed"],
                "grpc_steal_pct": stolen,
                "rest_rps": rest["rps"],
                "rest_cpu_us": rest_cpu / max(1, rest["requests"]) * 1e6,
                "rest_sat_p50_ms": rest["sat_p50_ms"],
                "rest_sat_p99_ms": rest["sat_p99_ms"],
                "rest_grpc": rest["rps"] / sat["rps"] if sat["rps"] else float("nan"),
                "rest_non2xx": rest["non2xx"],
                "rest_socket_errors": rest["socket_errors"],
                "list_msgs_per_s": listed["messages"] / listed["seconds"],
                "list_cpu_us": list_cpu / max(1, listed["messages"]) * 1e6,
                "list_errors": listed["errors"],
            })
    keys = ["grpc_rps", "grpc_cpu_us", "grpc_steal_pct", "rest_rps", "rest_cpu_us", "rest_sat_p50_ms", "rest_sat_p99_ms",
            "rest_grpc", "list_msgs_per_s", "list_cpu_us"]
    figures = {}
    for name, per_run in runs.items():
        figures[name] = {key: median([run[key] for run in per_run if run[key] is not None]) for key in keys}
        figures[name]["grpc_client_failed"] = sum(run["grpc_client_failed"] for run in per_run)
        figures[name]["rest_errors"] = sum(run["rest_non2xx"] for run in per_run)
        figures[name]["rest_socket_errors"] = sum(run["rest_socket_errors"] for run in per_run)
        figures[name]["list_errors"] = sum(run["list_errors"] for run in per_run)
        figures[name]["pairs"] = per_run
    # The bare servers keep no counts (`handled` is empty for them), and
    # h2load cannot see grpc-status.
    failed = {scenario: errors_between({}, by_code) for scenario, by_code in codes.items()}
    figures["keel"]["grpc_errors"] = failed["grpc"]
    figures["keel"]["rest_errors"] += failed["rest"]
    figures["keel"]["list_errors"] += failed["list"]
    figures["keel"].update(grpc_codes=codes["grpc"], rest_codes=codes["rest"])
    figures["bare"]["grpc_errors"] = None
    ratios = {
        key: median([k[key] / b[key] for k, b in zip(runs["keel"], runs["bare"]) if k[key] is not None and b[key]])
        for key in keys
    }
    return figures, ratios


def load_scenarios(target, args, work):
    """The fixed-rate latency runs of scenarios 1 and 2, and scenario 6, on
    a started target with users seeded; the saturation runs are in
    `saturation_pairs`."""
    r = {}
    body = work / "get_user.bin"
    grpc_url = f"http://127.0.0.1:{target.grpc_port}/user.v1.UserService/GetUser"
    rest_url = f"http://127.0.0.1:{target.rest_port}/v1/users/{USER_ID}"

    # 1. gRPC unary at a fixed rate, for latency.
    fixed = h2load(grpc_url, args.seconds, work, 4, 64, rps=args.grpc_rate, body=body)
    r["grpc_p50_ms"], r["grpc_p99_ms"] = fixed["p50_ms"], fixed["p99_ms"]
    r["grpc_fixed_rps"] = fixed["rps"]

    # 2. REST GET at a fixed rate, for latency.
    fixed = h2load(rest_url, args.seconds, work, 16, 1, rps=args.rest_rate, h1=True)
    r["rest_p50_ms"], r["rest_p99_ms"] = fixed["p50_ms"], fixed["p99_ms"]
    r["rest_fixed_rps"] = fixed["rps"]

    # 6. A REST GET while 1,100 REST watch streams are open (the bare hop
    # has no watch route: keel only).
    if target.keel:
        started, took = rest_get_under_watch(target, args.watch_streams)
        r["watch_streams_started"] = started
        r["get_under_watch_ms"] = took * 1000 if took is not None else float("inf")
    return r


def log_volume(path, keep, round_no):
    """How much keel wrote to one stdout file (one access line per call,
    plus the lifecycle lines), as (lines, bytes). The file is large (about
    300 MB per phase and round), so it is removed unless --keep-logs; the
    lines of calls that did not end OK are kept in keel-non-ok-calls.log
    either way."""
    lines = size = 0
    with open(path, "rb") as f, open(path.parent / "keel-non-ok-calls.log", "ab") as failed:
        for line in f:
            size += len(line)
            lines += 1
            if b'"rpc finished"' in line and b'"grpc.code":"OK"' not in line:
                failed.write(f"round {round_no}: ".encode() + line)
    if not keep:
        path.unlink()
    return lines, size


def log_figures(*volumes):
    """The log rows of the table, over the (lines, bytes) of several files."""
    lines, size = sum(v[0] for v in volumes), sum(v[1] for v in volumes)
    return {"log_lines": lines, "log_bytes_per_line": size / max(1, lines), "log_mb": size / 2**20}


def rest_get_under_watch(target, streams, timeout=5.0):
    """Scenario 6 (keel only): opens `streams` REST `/v1/users:watch`
    streams, each on its own HTTP/1.1 connection, and times one REST GET
    while they stay open. Returns (streams whose headers came back, the
    GET's seconds or None when it did not answer within `timeout`)."""
    request = (f"GET /v1/users:watch HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode()
    selector = selectors.DefaultSelector()
    sockets = []
    try:
        for _ in range(streams):
            sock = socket.create_connection(("127.0.0.1", target.rest_port), timeout=5)
            sock.sendall(request)
            sock.setblocking(False)
            sockets.append(sock)
            selector.register(sock, selectors.EVENT_READ, bytearray())
        # Headers of every stream that the gateway started, within a bound:
        # a stream stuck behind a connection limit never sends them.
        started = 0
        deadline = time.monotonic() + timeout
        while started < streams and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                data = key.fileobj.recv(65536)
                key.data.extend(data)
                if not data or b"\r\n\r\n" in key.data:
                    started += 1
                    selector.unregister(key.fileobj)
        begin = time.monotonic()
        try:
            status, _ = http_get(target.rest_port, f"/v1/users/{USER_ID}", {"Authorization": f"Bearer {TOKEN}"}, timeout)
            took = time.monotonic() - begin if status == 200 else None
        except OSError:
            took = None
        return started, took
    finally:
        selector.close()
        for sock in sockets:
            sock.close()


def wait_fds(pid, baseline):
    """Until the server has let go of the connections just closed."""
    poll("the server to close its connections", lambda: open_fds(pid) <= baseline + 2, timeout=15, interval=0.05)


def hold(bins, target, connections, streams):
    """RSS while `bench-client hold` keeps connections/streams open, and
    after they close."""
    pid = target.grpc_pid
    baseline = open_fds(pid)
    proc = subprocess.Popen(client(bins, target, "hold", "--connections", connections, "--streams", streams),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith('{"ready": true'):
        proc.kill()
        raise RuntimeError(f"bench-client hold did not get ready: {line!r}")
    held = rss_bytes(pid)
    proc.stdin.close()
    proc.wait(timeout=30)
    wait_fds(pid, baseline)
    return held, rss_bytes(pid)


def memory_scenarios(target, args, bins):
    """Scenarios 3b, 4 and 5 on a freshly started target."""
    r = {"startup_ms": target.servers[0].ready_seconds * 1000, "rss_idle_mb": rss_bytes(target.grpc_pid) / 2**20}
    held, after = hold(bins, target, 1000, 0)
    r["rss_conns_mb"], r["rss_conns_after_mb"] = held / 2**20, after / 2**20
    held, after = hold(bins, target, 10, 1000)
    r["rss_streams_mb"], r["rss_streams_after_mb"] = held / 2**20, after / 2**20

    # 3b. WatchUsers fan-out at a fixed update rate; peak RSS sampled.
    pid = target.grpc_pid
    baseline = open_fds(pid)
    before = target.cpu()
    proc = subprocess.Popen(client(bins, target, "watch", "--subscribers", 1000, "--connections", 10,
                                   "--updates", args.watch_updates, "--rate", args.watch_rate),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_bytes(pid))
        time.sleep(0.05)  # a sampling period, not a wait for readiness
    cpu = target.cpu() - before
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench-client watch failed: {err.strip()}")
    watched = json.loads(out.strip().splitlines()[-1])
    r["watch_events_per_s"] = watched["delivered"] / max(watched["seconds"], 1e-9)
    r["watch_delivered_ratio"] = watched["delivered"] / max(1, watched["expected"])
    r["watch_cpu_us"] = cpu / max(1, watched["delivered"]) * 1e6
    r["watch_rss_mb"] = peak / 2**20
    r["watch_cut_off"] = watched["ended_early"]
    wait_fds(pid, baseline)

    # 3c. The same fan-out with the largest updates the field limits allow,
    # and one of the 1,000 watchers not reading: peak RSS must stay bounded
    # in bytes (streams.watch_buffer_bytes per subscriber), and the stalled
    # one is cut off rather than buffered without end.
    proc = subprocess.Popen(client(bins, target, "watch", "--subscribers", 999, "--stalled", 1, "--large",
                                   "--connections", 10, "--updates", args.stalled_updates,
                                   "--rate", args.watch_rate),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_bytes(pid))
        time.sleep(0.05)  # a sampling period, not a wait for readiness
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench-client watch --stalled failed: {err.strip()}")
    stalled = json.loads(out.strip().splitlines()[-1])
    r["stalled_rss_mb"] = peak / 2**20
    r["stalled_delivered_ratio"] = stalled["delivered"] / max(1, stalled["expected"])
    r["stalled_received"] = stalled["stalled_received"]
    r["stalled_end"] = ",".join(stalled["stalled_ends"])
    log(f"{target.name}: stalled watcher received {stalled['stalled_received']} of "
        f"{args.stalled_updates} updates and ended {r['stalled_end']}; peak RSS {r['stalled_rss_mb']:.1f} MB")
    wait_fds(pid, baseline)
    r["rss_final_mb"] = rss_bytes(pid) / 2**20

    # 5. Idle shutdown: SIGTERM -> exit (keel with drain_delay 0).
    r["shutdown_ms"] = (target.stop() or float("nan")) * 1000
    return r


# ---------------------------------------------------------------- report

ROWS = [
    # (key, scenario, unit, better, target)
    ("grpc_rps", "1 gRPC GetUser, h2load c4 m64 (--pairs runs per round)", "req/s", "higher", "≥ 0.90×"),
    ("grpc_cpu_us", "1 gRPC GetUser", "CPU-µs/req", "lower", "≤ 1.15×"),
    ("grpc_steal_pct", "1 … host CPU steal during those runs (/proc/stat; high = a noisy run)", "% of CPU", "lower", ""),
    ("grpc_fixed_rps", "1 gRPC GetUser, fixed-rate run: achieved (--grpc-rate, default 20,000)", "req/s", "higher", ""),
    ("grpc_p50_ms", "1 gRPC GetUser @ fixed rate", "p50 ms", "lower", ""),
    ("grpc_p99_ms", "1 gRPC GetUser @ fixed rate", "p99 ms", "lower", ""),
    ("grpc_errors", "1 gRPC GetUser (server-side non-OK, Canceled aside)", "calls, all rounds", "lower", "0"),
    ("log_bytes_per_line", "1, 2, 3, 6 keel stdout (access log), per line", "bytes", "lower", ""),
    ("log_mb", "1, 2, 3, 6 keel stdout written per round", "MB", "lower", ""),
    ("rest_rps", "2 REST GET /v1/users/{id}, wrk c64 (--pairs runs per round)", "req/s", "higher", "≥ 1.3×"),
    ("rest_cpu_us", "2 REST GET (bare: both processes)", "CPU-µs/req", "lower", ""),
    ("rest_fixed_rps", "2 REST GET, fixed-rate run: achieved (--rest-rate, default 5,000)", "req/s", "higher", ""),
    ("rest_p50_ms", "2 REST GET @ fixed rate", "p50 ms", "lower", ""),
    ("rest_p99_ms", "2 REST GET @ fixed rate", "p99 ms", "lower", ""),
    ("rest_errors", "2 REST GET (non-2xx + server-side non-OK)", "calls, all rounds", "lower", "0"),
    ("rest_grpc", "2 REST/gRPC req/s", "ratio", "higher", ""),
    ("list_msgs_per_s", "3 ListUsers, 10,000 users (--pairs runs per round)", "msgs/s", "higher", "≥ 0.90×"),
    ("list_cpu_us", "3 ListUsers", "CPU-µs/msg", "lower", ""),
    ("watch_events_per_s", "3 WatchUsers fan-out, 1,000 subscribers", "events/s", "higher", ""),
    ("watch_delivered_ratio", "3 WatchUsers delivered / expected", "ratio", "higher", "1.00"),
    ("watch_cpu_us", "3 WatchUsers", "CPU-µs/event", "lower", ""),
    ("watch_rss_mb", "3 WatchUsers peak RSS", "MB", "lower", ""),
    ("stalled_rss_mb", "3 WatchUsers, 1,000 subscribers, one not reading, 4.6 kB updates: peak RSS", "MB", "lower", "≤ 160 MB"),
    ("stalled_delivered_ratio", "3 … the 999 reading subscribers: delivered / expected", "ratio", "higher", "1.00"),
    ("stalled_received", "3 … updates the stalled subscriber could still read afterwards (then cut off)", "updates", "lower", "< all (bounded)"),
    ("rss_idle_mb", "4 idle RSS (bare: gRPC process)", "MB", "lower", "≤ 10 MB"),
    ("rss_conns_mb", "4 RSS, 1,000 idle connections", "MB", "lower", ""),
    ("rss_conns_after_mb", "4 RSS after they close", "MB", "lower", ""),
    ("rss_streams_mb", "4 RSS, 1,000 open WatchUsers streams", "MB", "lower", ""),
    ("rss_streams_after_mb", "4 RSS after they close", "MB", "lower", ""),
    ("rss_final_mb", "4 RSS at the end (after the fan-out)", "MB", "lower", ""),
    ("startup_ms", "5 start to ready", "ms", "lower", "≤ 100 ms"),
    ("shutdown_ms", "5 idle shutdown, SIGTERM → exit", "ms", "lower", "≤ 500 ms"),
    ("watch_streams_started", "6 REST /v1/users:watch streams opened (--watch-streams, default 1,100)", "streams", "higher", "1,100"),
    ("get_under_watch_ms", "6 REST GET while they are open", "ms", "lower", "< 1,000 ms"),
]


def fmt(value):
    if value is None or value != value:
        return "—"
    if value == float("inf"):
        return "no answer"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def median(values):
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else None


def round_ratio(result, key, keel, bare):
    """A round's keel / bare for `key`: its own paired ratio when it has one
    (the median of its pairs), else the ratio of its two figures; None
    when a figure is missing, zero or NaN."""
    if key in result.get("ratios", {}):
        return result["ratios"][key]
    if keel is None or bare in (None, 0) or keel != keel or bare != bare:
        return None
    return keel / bare


def table(rounds):
    lines = [
        "| scenario | unit | bare (median) | keel (median) | keel / bare: median of paired ratios (each round) | target |",
        "|---|---|---|---|---|---|",
    ]
    for key, scenario, unit, _, goal in ROWS:
        bare = [r["bare"].get(key) for r in rounds]
        keel = [r["keel"].get(key) for r in rounds]
        if key.endswith("errors"):
            # One failed call matters whichever round it was in: the sum.
            total = lambda xs: "not counted" if any(x is None for x in xs) else str(sum(xs))
            lines.append(f"| {scenario} | {unit} | {total(bare)} | {total(keel)} | — | {goal} |")
            continue
        ratios = [x for x in map(lambda r, k, b: round_ratio(r, key, k, b), rounds, keel, bare) if x is not None]
        ratio = median(ratios)
        if ratio is None or key.endswith("errors"):
            ratio_text = "—"
        else:
            ratio_text = f"**{ratio:.2f}×** ({' / '.join(f'{x:.2f}' for x in ratios)})"
        lines.append(f"| {scenario} | {unit} | {fmt(median(bare))} | {fmt(median(keel))} | {ratio_text} | {goal} |")
    return "\n".join(lines)


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
        "commit": commit.stdout.strip(),
    }


# ---------------------------------------------------------------- main


def rerender(path):
    """Prints the table of an earlier run's results.json again."""
    results = json.loads(path.read_text())
    print(table(results["rounds"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bins", type=Path, help="directory with keel, bare-grpc, bare-rest, bench-client")
    parser.add_argument("--table-from", type=Path, help="print the table of an earlier run's results.json and exit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="length of each load run")
    parser.add_argument("--pairs", type=int, default=6,
                        help="pairs of saturation runs (gRPC GetUser, REST GET, ListUsers) per round, bare and keel in turn")
    parser.add_argument("--pair-seconds", type=int, default=3, help="length of each gRPC and REST saturation run of a pair")
    parser.add_argument("--list-seconds", type=int, default=2, help="length of each ListUsers run of a pair")
    parser.add_argument("--grpc-rate", type=int, default=20000, help="total req/s of the fixed-rate gRPC run")
    parser.add_argument("--rest-rate", type=int, default=5000, help="total req/s of the fixed-rate REST run")
    parser.add_argument("--users", type=int, default=10000, help="users seeded for ListUsers")
    parser.add_argument("--watch-streams", type=int, default=1100, help="REST watch streams in scenario 6")
    parser.add_argument("--watch-updates", type=int, default=500)
    parser.add_argument("--stalled-updates", type=int, default=800,
                        help="large updates in the fan-out with a stalled watcher (enough to overflow its buffers)")
    parser.add_argument("--watch-rate", type=float, default=100.0, help="updates/s in the fan-out")
    parser.add_argument("--only", choices=["load", "memory"],
                        help="run only the load scenarios (1, 2, 3a, 6) or only memory and lifecycle (3b, 3c, 4, 5)")
    parser.add_argument("--keep-logs", action="store_true", help="keep keel's stdout of the load scenarios")
    parser.add_argument("--out", type=Path, help="directory for logs and results (default: a temp dir)")
    args = parser.parse_args()
    if args.table_from:
        rerender(args.table_from)
        return
    if not args.bins:
        parser.error("--bins is required")

    # 1,000 connections on each side need more than a default 1,024 fds.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    work = args.out or Path(tempfile.mkdtemp(prefix="keel-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "get_user.bin").write_bytes(grpc_frame(USER_ID))
    info = machine()
    log(f"work dir {work}; {info['nproc']} CPUs ({info['cpu']}); load {info['load_average_at_start']}")

    rounds = []
    for n in range(args.rounds):
        order = ["bare", "keel"] if n % 2 == 0 else ["keel", "bare"]
        result = {name: {} for name in order}
        if args.only != "memory":
            log(f"round {n + 1}/{args.rounds}: both: saturation pairs")
            targets = {name: Target(name, args.bins, work) for name in order}
            try:
                for name in order:
                    targets[name].start("pairs")
                    seeded = run_client(args.bins, targets[name], "seed", "--count", args.users)
                    if seeded["errors"]:
                        raise RuntimeError(f"seeding failed for {seeded['errors']} users")
                figures, ratios = saturation_pairs(targets, args, args.bins, work)
                for target in targets.values():
                    target.stop()
                # Read (and removed) now, not after the load phase: the file
                # runs to hundreds of MB.
                paired_log = log_volume(work / "keel-stdout-pairs.log", args.keep_logs, n + 1)
            finally:
                for target in targets.values():
                    target.kill()
            for name in order:
                result[name].update(figures[name])
            result["ratios"] = ratios
            log("  pairs: " + ", ".join(f"{k}={fmt(v)}" for k, v in ratios.items()))
        for name in order:
            target = Target(name, args.bins, work)
            try:
                r = {}
                if args.only != "memory":
                    log(f"round {n + 1}/{args.rounds}: {name}: load scenarios")
                    target.start("load")
                    seeded = run_client(args.bins, target, "seed", "--count", args.users)
                    if seeded["errors"]:
                        raise RuntimeError(f"seeding failed for {seeded['errors']} users")
                    r.update(load_scenarios(target, args, work))
                    target.stop()
                    if target.keel:
                        load_log = log_volume(work / "keel-stdout-load.log", args.keep_logs, n + 1)
                        r.update(log_figures(paired_log, load_log))
                if args.only != "load":
                    log(f"round {n + 1}/{args.rounds}: {name}: memory and lifecycle")
                    target.start("memory", rest=False)
                    r.update(memory_scenarios(target, args, args.bins))
                result[name].update(r)
                log(f"  {name}: " + ", ".join(
                    f"{k}={v if isinstance(v, (dict, str)) else fmt(v)}" for k, v in r.items() if k != "pairs"
                ))
            finally:
                target.kill()
        rounds.append(result)

    report = table(rounds)
    (work / "results.json").write_text(json.dumps({"machine": info, "args": vars(args) | {"bins": str(args.bins), "out": str(work)}, "rounds": rounds}, indent=2, default=str))
    (work / "table.md").write_text(report + "\n")
    print()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}, commit {info['commit']}")
    print(f"rounds: {args.rounds}, {args.seconds}s per load run; keel stdout: {work}/keel-stdout-*.log")
    print()
    print(report)
    log(f"raw results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
