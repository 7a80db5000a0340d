"""Checks of the chart's dashboard ConfigMap and PrometheusRule; run by
scripts/chart/test_observability.sh. Prints one line per check and
`observability: N passed, M failed`; exits non-zero on any failure."""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "keel")
DASHBOARD = os.path.join(CHART, "dashboards", "keel.json")
UNIT_TESTS = os.path.join(ROOT, "scripts", "chart", "alerts_test.yaml")
RUNBOOK = os.path.join(ROOT, "docs", "RUNBOOK.md")
# What alerts_test.yaml was written against.
TEST_RUNBOOK_URL = "https://runbook.test/RUNBOOK.md"
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
ALERTS = ["KeelErrorBudgetBurn", "KeelHighLatency", "KeelLoadShedding", "KeelNotReady", "KeelFrequentRestarts",
          "KeelMemoryNearLimit"]

passed, failed = 0, 0


def check(condition, what):
    global passed, failed
    if condition:
        passed += 1
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what}")
    return condition


def render(helm, *sets, release="keel", namespace="prod"):
    args = [helm, "template", release, CHART, "--namespace", namespace]
    for value in sets:
        # Numbers go as JSON: --set leaves 0.99 a string, which the schema
        # refuses.
        args += ["--set-json", value[5:]] if value.startswith("json:") else ["--set", value]
    out = subprocess.run(args, capture_output=True, text=True)
    return out.returncode, [d for d in yaml.safe_load_all(out.stdout) if d] if out.returncode == 0 else [], out.stderr


def of_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def string_map(value):
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def check_prometheus_rule(rule):
    """The PrometheusRule CRD's schema (monitoring.coreos.com/v1), by hand:
    no cluster or CRD download is needed."""
    problems = []
    if rule.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {rule.get('apiVersion')}")
    if not rule.get("metadata", {}).get("name"):
        problems.append("no metadata.name")
    spec = rule.get("spec")
    if not isinstance(spec, dict) or set(spec) - {"groups"}:
        problems.append("spec must hold only groups")
        return problems
    names = set()
    for group in spec.get("groups", []):
        if set(group) - {"name", "interval", "rules", "partial_response_strategy", "limit", "query_offset", "labels"}:
            problems.append(f"group {group.get('name')}: unknown fields {set(group) - {'name', 'rules', 'interval'}}")
        if not group.get("name") or group["name"] in names:
            problems.append(f"group name {group.get('name')!r} missing or repeated")
        names.add(group.get("name"))
        for r in group.get("rules", []):
            what = r.get("alert") or r.get("record")
            if set(r) - {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}:
                problems.append(f"{what}: unknown fields")
            if ("alert" in r) == ("record" in r):
                problems.append(f"{what}: needs exactly one of alert and record")
            if not isinstance(r.get("expr"), (str, int)) or not str(r.get("expr")).strip():
                problems.append(f"{what}: expr missing")
            if "for" in r and not (isinstance(r["for"], str) and DURATION.match(r["for"])):
                problems.append(f"{what}: for {r['for']!r} is not a duration")
            for field in ("labels", "annotations"):
                if field in r and not string_map(r[field]):
                    problems.append(f"{what}: {field} must map strings to strings")
            if "record" in r and ("annotations" in r or "for" in r):
                problems.append(f"{what}: a recording rule takes no annotations or for")
    return problems


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--helm", required=True)
    parser.add_argument("--promtool", required=True)
    parser.add_argument("--kubernetes-validate", help="validates the built-in kinds (the ConfigMap) offline")
    args = parser.parse_args()

    code, docs, err = render(args.helm)
    check(code == 0 and not of_kind(docs, "PrometheusRule")
          and not [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")],
          "defaults render neither the dashboard nor the PrometheusRule")

    code, _, err = render(args.helm, "alerts.enabled=true")
    check(code != 0 and "alerts.runbookUrl is required" in err, "alerts without a runbookUrl fail, naming it: " + (err.strip().splitlines() or [""])[0][-160:])

    lint = subprocess.run([args.helm, "lint", "--strict", CHART, "--set", "dashboards.enabled=true", "--set",
                           "alerts.enabled=true", "--set", f"alerts.runbookUrl={TEST_RUNBOOK_URL}"],
                          capture_output=True, text=True)
    check(lint.returncode == 0, "helm lint --strict with dashboards and alerts on " + (lint.stdout + lint.stderr).strip()[-300:])

    code, docs, err = render(args.helm, "dashboards.enabled=true", "alerts.enabled=true",
                             f"alerts.runbookUrl={TEST_RUNBOOK_URL}", "dashboards.annotations.grafana_folder=Services",
                             "alerts.labels.release=monitoring")
    if not check(code == 0, f"renders with dashboards.enabled and alerts.enabled {err.strip()}"):
        return

    # The dashboard ConfigMap.
    maps = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "keel-dashboard"]
    if check(len(maps) == 1, "one dashboard ConfigMap"):
        cm = maps[0]
        check(cm["metadata"]["labels"].get("grafana_dashboard") == "1", "labelled grafana_dashboard: \"1\" for the sidecar")
        check(cm["metadata"].get("annotations", {}).get("grafana_folder") == "Services", "dashboards.annotations are set")
        with open(DASHBOARD) as f:
            shipped = f.read()
        check(cm["data"].get("keel.json", "").strip() == shipped.strip(), "keel.json is shipped verbatim")
        if args.kubernetes_validate:
            out = subprocess.run([args.kubernetes_validate, "--strict", "-k", "1.30.0", "-"], input=yaml.safe_dump(cm),
                                 capture_output=True, text=True)
            check(out.returncode == 0, f"kubernetes-validate --strict accepts the ConfigMap {out.stdout.strip()[-200:]}")
        dashboard = json.loads(cm["data"]["keel.json"])
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        check(set(variables) >= {"datasource", "namespace", "pod", "grpc_service", "grpc_method"},
              f"variables datasource, namespace, pod, grpc_service, grpc_method ({sorted(variables)})")
        check(variables.get("datasource", {}).get("type") == "datasource", "datasource is a data source variable")
        rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
        check(rows == ["gRPC traffic", "HTTP gateway", "Streams", "Saturation", "Database pool", "Downstream clients", "Lifecycle"], f"rows {rows}")
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        bad = [p["title"] for p in panels
               if p.get("datasource", {}).get("uid") != "${datasource}" or not p.get("targets")
               or any(not t.get("expr") or t.get("datasource", {}).get("uid") != "${datasource}" for t in p["targets"])]
        check(not bad, f"every panel queries ${{datasource}} with an expression ({bad or len(panels)})")
        grid = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
        overlaps = [(a, b) for i, (a, g) in enumerate(grid) for b, h in grid[i + 1:]
                    if g["x"] < h["x"] + h["w"] and h["x"] < g["x"] + g["w"]
                    and g["y"] < h["y"] + h["h"] and h["y"] < g["y"] + g["h"]]
        check(not overlaps and all(g["x"] + g["w"] <= 24 for _, g in grid), f"panels fit the grid without overlaps {overlaps}")
        ids = [p["id"] for p in dashboard["panels"]]
        check(len(ids) == len(set(ids)), "panel ids are unique")
        unfiltered = [t["expr"] for p in panels for t in p["targets"]
                      if "$namespace" not in t["expr"] or "$pod" not in t["expr"]]
        check(not unfiltered, f"every expression honours $namespace and $pod ({unfiltered})")
        client = [t["expr"] for p in panels for t in p["targets"] if "grpc_client_" in t["expr"]]
        check(client and all("grpc_client_target" in e for e in client),
              f"the client panels split by grpc_client_target ({len(client)} expressions)")

    # The PrometheusRule.
    rules = of_kind(docs, "PrometheusRule")
    if not check(len(rules) == 1, "one PrometheusRule"):
        return
    rule = rules[0]
    problems = check_prometheus_rule(rule)
    check(not problems, f"the PrometheusRule matches the CRD's structure {problems}")
    check(rule["metadata"]["labels"].get("release") == "monitoring", "alerts.labels are set")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    check(sorted({a["alert"] for a in alerts}) == sorted(ALERTS), f"alerts {sorted({a['alert'] for a in alerts})}")
    missing = [a["alert"] for a in alerts if not {"summary", "description", "runbook_url"} <= set(a.get("annotations", {}))]
    check(not missing, f"every alert has summary, description and runbook_url ({missing})")
    with open(RUNBOOK) as f:
        runbook = f.read()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", runbook, re.M)}
    linked = {a["annotations"]["runbook_url"].split("#", 1)[1] for a in alerts}
    check(linked <= anchors, f"every runbook_url anchor is a docs/RUNBOOK.md section ({sorted(linked - anchors)})")
    check(all(a["annotations"]["runbook_url"].startswith(TEST_RUNBOOK_URL + "#") for a in alerts), "runbook_url uses alerts.runbookUrl")
    unselected = [r.get("alert") or r.get("record") for g in rule["spec"]["groups"] for r in g["rules"]
                  if 'namespace="prod", job="keel-metrics"' not in r["expr"]]
    check(not unselected, f"every rule selects the release's namespace and job ({unselected})")

    with tempfile.TemporaryDirectory(prefix="keel-rules-") as scratch:
        path = os.path.join(scratch, "rules.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"groups": rule["spec"]["groups"]}, f, sort_keys=False, width=1000)
        out = subprocess.run([args.promtool, "check", "rules", path], capture_output=True, text=True)
        check(out.returncode == 0, f"promtool check rules: {(out.stdout + out.stderr).strip().splitlines()[-1]}")
        with open(UNIT_TESTS) as f:
            tests = f.read()
        tested = set(re.findall(r"alertname: (\w+)", tests))
        check(tested == set(ALERTS), f"alerts_test.yaml covers every alert ({sorted(set(ALERTS) - tested)})")
        test_path = os.path.join(scratch, "alerts_test.yaml")
        with open(test_path, "w") as f:
            f.write(tests)
        out = subprocess.run([args.promtool, "test", "rules", test_path], capture_output=True, text=True, cwd=scratch)
        check(out.returncode == 0, "promtool test rules: " + ("SUCCESS" if out.returncode == 0 else out.stdout + out.stderr))

    # Thresholds and the selector come from values.
    code, docs, err = render(args.helm, "alerts.enabled=true", f"alerts.runbookUrl={TEST_RUNBOOK_URL}",
                             'alerts.selector=service="orders"', "json:alerts.latency.thresholdSeconds=0.25",
                             "alerts.memory.enabled=false", "json:alerts.errorBudget.slo=0.99")
    rule = of_kind(docs, "PrometheusRule")[0] if code == 0 else {"spec": {"groups": []}}
    exprs = {r.get("alert") or r.get("record"): r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    check('service="orders"' in exprs.get("KeelHighLatency", "") and "> 0.25" in exprs.get("KeelHighLatency", ""),
          "alerts.selector and alerts.latency.thresholdSeconds reach the expressions")
    check("KeelMemoryNearLimit" not in exprs, "a disabled alert is left out")
    check("(1 - 0.99)" in exprs.get("KeelErrorBudgetBurn", ""), "alerts.errorBudget.slo sets the budget")
    code, _, err = render(args.helm, "alerts.enabled=true", f"alerts.runbookUrl={TEST_RUNBOOK_URL}", "json:alerts.errorBudget.slo=1.5")
    check(code != 0 and "alerts.errorBudget.slo" in err, "the schema refuses an SLO of 1.5")


if __name__ == "__main__":
    main()
    print(f"observability: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
