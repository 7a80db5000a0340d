"""The Grafana dashboard (helm/keel/dashboards/keel.json) against a live
Prometheus scraping a live keel under light load: gRPC and REST calls, server
streams, a load-shed burst and errors. Every panel's PromQL, with the
dashboard variables substituted as Grafana would, goes to Prometheus' query
API: each expression must parse, and each panel that should have data must
return a non-empty result. The variable queries must list this keel. This
keeps the dashboard true to the metric names as they change. Installs
Debian's prometheus package when it is missing."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc

from keelproc import Checks, Keel, ensure_prometheus, free_port, http_get as get

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keel"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "helm", "keel", "dashboards", "keel.json")
checks = Checks("dashboard acceptance")


def check(condition, what):
    """Records the check and hands back its outcome."""
    checks(condition, what)
    return condition

# The labels Kubernetes service discovery would add, as static labels.
NAMESPACE, POD = "e2e", "keel-e2e-0"
# Panels with no data here, and why. Every other panel must have data.
DATABASE_PANELS = {"Pool connections by state", "Pool acquire p99", "Pool acquire timeouts"}
# Only when the machine gives keel no cgroup memory limit (then keel exports
# none, on purpose).
NEEDS_MEMORY_LIMIT = {"Memory usage of the limit": None, "Resident memory vs container limit": "B"}
# Panels whose data must show activity (some value above zero), not just
# series at zero.
MUST_BE_POSITIVE = {"Request rate by code", "Request rate by method", "Request rate by route and code",
                    "Load shed rate", "Non-OK codes by method", "Client calls by target and code", "Messages sent by streams", "Streams started by type"}
MAX_CONCURRENT = 2


def raw(channel, method, streaming=False):
    """A call with raw protobuf bytes in and out: no generated stubs."""
    kind = channel.unary_stream if streaming else channel.unary_unary
    return kind(f"/user.v1.UserService/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b)


def field(number, text):
    data = text.encode()
    return bytes([number << 3 | 2, len(data)]) + data


def load(keel):
    """Light load of every kind the dashboard draws. Returns the number of
    calls that were shed."""
    http = f"http://{keel.addrs['http']}"
    for i in range(3):
        body = json.dumps({"user_id": f"d{i}", "display_name": "D", "email": f"d{i}@example.com"}).encode()
        request = urllib.request.Request(f"{http}/v1/users", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
    for _ in range(10):
        urllib.request.urlopen(f"{http}/v1/users/d0", timeout=10).read()
        urllib.request.urlopen(f"{http}/v1/users", timeout=10).read()
    try:
        urllib.request.urlopen(f"{http}/v1/users/missing", timeout=10)
    except urllib.error.HTTPError:
        pass
    channel = grpc.insecure_channel(keel.grpc)
    get_user = raw(channel, "GetUser")
    for _ in range(20):
        get_user(field(1, "d1"), timeout=5)
    try:
        get_user(field(1, "nobody"), timeout=5)
    except grpc.RpcError:
        pass
    for message in raw(channel, "ListUsers", streaming=True)(b"", timeout=5):
        pass
    # The shed burst: watches hold every slot of grpc.max_concurrent_requests,
    # so further calls are refused with RESOURCE_EXHAUSTED.
    watches = [raw(channel, "WatchUsers", streaming=True)(b"", timeout=60) for _ in range(MAX_CONCURRENT)]
    firsts = []
    def first_message(watch):
        try:
            next(iter(watch), None)
        except grpc.RpcError:
            pass  # cancelled below, as intended

    for watch in watches:
        thread = threading.Thread(target=first_message, args=(watch,), daemon=True)
        thread.start()
        firsts.append(thread)
    shed = 0
    deadline = time.monotonic() + 10
    while shed < 5 and time.monotonic() < deadline:
        try:
            get_user(field(1, "d1"), timeout=5)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                shed += 1
    for watch in watches:
        watch.cancel()
    channel.close()
    return shed


def database_url():
    """A fresh, migrated database on the test cluster when there is one
    (CI exports KEEL_TEST_DATABASE_URL: scripts/postgres.sh), else None."""
    base = os.environ.get("KEEL_TEST_DATABASE_URL")
    psql = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql")) or [shutil.which("psql")]
    if not base or not psql[-1]:
        return None
    name = f"keel_dashboard_{os.getpid()}"
    subprocess.run([psql[-1], base, "-qc", f"DROP DATABASE IF EXISTS {name}"], check=True, capture_output=True)
    subprocess.run([psql[-1], base, "-qc", f"CREATE DATABASE {name}"], check=True, capture_output=True)
    url = base.rsplit("/", 1)[0] + "/" + name
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL")}
    subprocess.run([BINARY, "migrate"], env=dict(env, KEEL__DATABASE__URL=url), check=True, capture_output=True)
    return url


def substitute(expr, rate_interval="1m"):
    """The variables as Grafana fills them with this pod selected and All
    for the gRPC service and method (All is `.*`)."""
    values = {"namespace": NAMESPACE, "pod": POD, "grpc_service": ".*", "grpc_method": ".*",
              "__rate_interval": rate_interval, "__interval": "15s", "__range": "1h"}
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def main():
    ensure_prometheus()
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    env = {"KEEL__GRPC__MAX_CONCURRENT_REQUESTS": str(MAX_CONCURRENT)}
    database = database_url()
    if database:
        env["KEEL__DATABASE__URL"] = database
    print(f"     (store: {'PostgreSQL' if database else 'memory; the database panels may be empty'})")
    keel = Keel(BINARY, env=env)
    admin = keel.addrs["admin"]
    scratch = tempfile.mkdtemp(prefix="keel-dash-")
    prometheus = None
    try:
        port = free_port()
        config = os.path.join(scratch, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: keel\n    static_configs:\n"
                    f"      - targets: ['{admin}']\n"
                    f"        labels: {{namespace: {NAMESPACE}, pod: {POD}}}\n")
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={scratch}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        api = f"http://127.0.0.1:{port}/api/v1"

        def query(expr):
            try:
                return json.loads(get(f"{api}/query?" + urllib.parse.urlencode({"query": expr})))
            except urllib.error.HTTPError as error:
                return json.loads(error.read().decode() or "{}")
            except Exception as error:  # Prometheus not up yet
                return {"status": "error", "error": str(error)}

        def wait_for(expr, bound=30):
            deadline = time.monotonic() + bound
            while time.monotonic() < deadline:
                answer = query(expr)
                if answer.get("status") == "success" and answer["data"]["result"]:
                    return answer["data"]["result"]
                time.sleep(0.5)
            return []

        # Counters must be scraped at zero before the load, so rates see it.
        up = wait_for(f'up{{job="keel", pod="{POD}"}} == 1')
        check(bool(up), "Prometheus scrapes keel with the static namespace and pod labels")
        shed = load(keel)
        check(shed > 0, f"the burst past grpc.max_concurrent_requests={MAX_CONCURRENT} was shed ({shed} calls)")
        arrived = wait_for(f'keel_grpc_requests_shed_total{{pod="{POD}"}} >= {shed}')
        check(bool(arrived), "the shed calls arrived in Prometheus")
        wait_for(f'grpc_server_handled_total{{pod="{POD}", grpc_method="GetUser", grpc_code="OK"}} >= 20')
        metrics = get(f"http://{admin}/metrics")
        has_memory_limit = "\nkeel_container_memory_limit_bytes " in metrics

        # The variables list this keel.
        expected = {"namespace": NAMESPACE, "pod": POD, "grpc_service": "user.v1.UserService", "grpc_method": "GetUser"}
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            definition = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition.strip())
            if not check(bool(match), f"variable {variable['name']} is a label_values query"):
                continue
            selector, label = substitute(match.group(1)), match.group(2)
            answer = json.loads(get(f"{api}/label/{label}/values?" + urllib.parse.urlencode({"match[]": selector})))
            values = answer.get("data", [])
            check(expected[variable["name"]] in values, f"variable {variable['name']} lists {expected[variable['name']]} ({values[:6]})")

        # Every panel expression parses and, unless excused, has data.
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        for panel in panels:
            for target in panel["targets"]:
                expr = substitute(target["expr"])
                answer = query(expr)
                title = f"{panel['title']} [{target['refId']}]"
                if not check(answer.get("status") == "success", f"{title} parses: {answer.get('error', 'ok')}"):
                    continue
                result = answer["data"]["result"]
                excuse = None
                if panel["title"] in DATABASE_PANELS and not database:
                    excuse = "no database in this run (set KEEL_TEST_DATABASE_URL)"
                limit_part = NEEDS_MEMORY_LIMIT.get(panel["title"], "none")
                if not has_memory_limit and (limit_part is None or limit_part == target["refId"]):
                    excuse = "no cgroup memory limit on this machine"
                if excuse:
                    print(f"     ({title}: {len(result)} series; may be empty: {excuse})")
                    continue
                check(bool(result), f"{title} has data ({len(result)} series)")
                if panel["title"] in MUST_BE_POSITIVE and result:
                    values = [float(r["value"][1]) for r in result]
                    check(any(v > 0 for v in values), f"{title} shows the load ({max(values):.3g})")
        for annotation in dashboard.get("annotations", {}).get("list", []):
            if "expr" in annotation:
                answer = query(substitute(annotation["expr"]))
                check(answer.get("status") == "success", f"annotation {annotation['name']} parses")
        # A typo in a metric name must fail this check, not pass silently.
        check(not query(substitute('sum(rate(grpc_server_handled_totl{namespace=~"$namespace"}[1m]))'))["data"]["result"],
              "a misspelt metric returns no data (the check can fail)")
    finally:
        if prometheus:
            prometheus.terminate()
            prometheus.wait(10)
        keel.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        if database:
            psql = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql")) or [shutil.which("psql")]
            subprocess.run([psql[-1], os.environ["KEEL_TEST_DATABASE_URL"], "-qc",
                            f"DROP DATABASE IF EXISTS {database.rsplit('/', 1)[1]}"], capture_output=True)
    checks.finish()


if __name__ == "__main__":
    main()
