#!/usr/bin/env python3
"""Checks of keel's deployment artefacts: the Helm chart in helm/keel, the
Dockerfile and .dockerignore.

Runs `helm lint`, renders the chart with several value sets, validates every
render offline against the Kubernetes schemas (kubernetes-validate) at the
chart's kubeVersion floor, at 1.33 and at the newest version it ships, and
the Gateway API routes against the structural schemas in
scripts/chart/schemas (the CRDs cannot be downloaded here), asserts the
shape of the rendered objects, checks that invalid values fail rendering,
and lints the Dockerfile with hadolint. Called by
scripts/chart/test.sh, which installs the tools; prints one line per check
and a final `chart: N passed, M failed` summary, and exits non-zero when any
check failed.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "keel"
ALL_ON = ROOT / "scripts" / "chart" / "all-on.yaml"
RELEASE = "demo"
NAMESPACE = "apps"
FULLNAME = "demo-keel"
# The versions every render is validated at: the chart's floor (read from
# Chart.yaml's kubeVersion), 1.33, and the newest kubernetes-validate ships.
KUBE_VERSIONS: list[str] = []
NEWEST_KUBE_VERSION = "1.37.0"
SCHEMAS = ROOT / "scripts" / "chart" / "schemas"
ROUTE_SCHEMAS = {"HTTPRoute": "httproute-v1.json", "GRPCRoute": "grpcroute-v1.json"}
AUTH_DIR = "/var/run/secrets/keel/auth"
AUTH_TOKENS_FILE = f"{AUTH_DIR}/tokens"
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
EXPECTED_PORTS = {"grpc": 9000, "http": 8080, "admin": 8081}
CRD_KINDS = {"ServiceMonitor", "HTTPRoute", "GRPCRoute", "PrometheusRule", "Certificate"}


class Checks:
    """Counts and prints results; one failed check never stops the run."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  ok    {name}", flush=True)
        else:
            self.failed.append(name)
            suffix = f": {detail}" if detail != "" else ""
            print(f"  FAIL  {name}{suffix}", flush=True)
        return ok


class Tools:
    def __init__(self, helm: str, kubernetes_validate: str, hadolint: str, checkov: str | None = None) -> None:
        self.helm = helm
        self.kubernetes_validate = kubernetes_validate
        self.hadolint = hadolint
        self.checkov = checkov


# checkov findings the chart accepts, each with its reason; the README's
# "Policy checks" table lists the same IDs. Any other failure fails the run.
CHECKOV_ACCEPTED = {
    "CKV_K8S_11": "no CPU limit by design: tokio sizes its pool from the CPU quota (runtime.worker_threads if one is imposed)",
    "CKV_K8S_43": "the default image is referenced by tag; set image.digest (all-on does) to pin it",
    "CKV_K8S_15": "pullPolicy IfNotPresent is right for immutable tags and digests",
    "CKV_K8S_8": "the helm test pod runs to completion (and all-on's example sidecar has no probes)",
    "CKV_K8S_9": "the helm test pod runs to completion (and all-on's example sidecar has no probes)",
    "CKV_K8S_21": "checkov's helm runner renders without -n; every object carries the release namespace",
    "CKV2_K8S_6": "the NetworkPolicy is opt-in (it needs the cluster's peers); the test and migration pods accept no traffic",
    "CKV_DOCKER_7": "the base images come from build args whose defaults carry a pinned tag, which checkov cannot resolve",
}


def run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, input=stdin, capture_output=True, text=True, cwd=ROOT)


def short(text: str, limit: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " ..."


# Rendering helpers


def helm_template(tools: Tools, args: list[str], chart: Path = CHART) -> subprocess.CompletedProcess:
    return run([tools.helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *args])


def render(checks: Checks, tools: Tools, label: str, args: list[str]) -> list[dict] | None:
    result = helm_template(tools, args)
    if not checks.check(f"{label}: helm template succeeds", result.returncode == 0, short(result.stderr)):
        return None
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kube_floor() -> str:
    """The lowest version Chart.yaml's kubeVersion admits, as X.Y.0."""
    constraint = str(yaml.safe_load((CHART / "Chart.yaml").read_text()).get("kubeVersion", ""))
    match = re.fullmatch(r">=\s*v?([0-9]+)\.([0-9]+)(\.[0-9]+)?(-0)?", constraint.strip())
    if not match:
        raise ValueError(f"Chart.yaml kubeVersion {constraint!r} is not of the form >=X.Y.Z-0")
    return f"{match.group(1)}.{match.group(2)}.0"


def validate(checks: Checks, tools: Tools, label: str, docs: list[dict]) -> None:
    """kubernetes-validate --strict on everything but CRD instances, at each
    of KUBE_VERSIONS; the Gateway API routes against their schemas."""
    builtin = [doc for doc in docs if doc["kind"] not in CRD_KINDS]
    text = yaml.safe_dump_all(builtin, sort_keys=False)
    for version in KUBE_VERSIONS:
        result = run([tools.kubernetes_validate, "--strict", "-k", version, "-"], stdin=text)
        output = result.stdout + result.stderr
        passed_lines = sum(1 for line in output.splitlines() if line.startswith("INFO - passed"))
        ok = result.returncode == 0 and passed_lines == len(builtin)
        checks.check(
            f"{label}: {len(builtin)} objects valid for Kubernetes {version} (kubernetes-validate --strict)",
            ok,
            short(output),
        )
    routes = [doc for doc in docs if doc["kind"] in ROUTE_SCHEMAS]
    if routes:
        validate_routes(checks, label, routes)


def validate_routes(checks: Checks, label: str, routes: list[dict]) -> None:
    import jsonschema  # a dependency of kubernetes-validate

    for route in routes:
        schema = json.loads((SCHEMAS / ROUTE_SCHEMAS[route["kind"]]).read_text())
        errors = sorted(
            f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
            for error in jsonschema.Draft7Validator(schema).iter_errors(route)
        )
        checks.check(
            f"{label}: {route['kind']}/{route['metadata']['name']} valid against the Gateway API v1 schema",
            not errors,
            errors[:5],
        )


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc.get("kind") == kind]


def named(docs: list[dict], kind: str, name: str) -> dict | None:
    for doc in objects(docs, kind):
        if doc["metadata"]["name"] == name:
            return doc
    return None


def selects(selector: dict | None, labels: dict | None) -> bool:
    """True when every key of a matchLabels selector is in labels."""
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(key) == value for key, value in selector.items())


def leaf_keys(tree: object, prefix: str = "") -> set[str]:
    if isinstance(tree, dict) and tree:
        keys: set[str] = set()
        for key, value in tree.items():
            keys |= leaf_keys(value, f"{prefix}{key}.")
        return keys
    return {prefix.rstrip(".")}


def main_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "keel")


def env_map(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def rendered_config(docs: list[dict]) -> dict:
    configmap = named(docs, "ConfigMap", FULLNAME)
    return yaml.safe_load(configmap["data"]["config.yaml"]) if configmap else {}


def duration_seconds(text: str) -> float:
    factors = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * factors[u] for n, u in re.findall(r"([0-9]+)(ns|us|ms|s|m|h|d)", text))


def expected_grace(drain: str, timeout: str, margin: int = 5, flush: str = "1s") -> int:
    return math.ceil(duration_seconds(drain) + duration_seconds(timeout) + duration_seconds(flush)) + margin


# Checks shared by every render


def check_common(checks: Checks, label: str, docs: list[dict], app_version: str) -> None:
    missing = [
        f"{doc['kind']}/{doc['metadata']['name']}: {key}"
        for doc in docs
        for key in STANDARD_LABELS
        if key not in (doc["metadata"].get("labels") or {})
    ]
    checks.check(f"{label}: every object has the standard labels", not missing, missing)
    without_namespace = [f"{doc['kind']}/{doc['metadata']['name']}" for doc in docs if not doc["metadata"].get("namespace")]
    checks.check(f"{label}: every object names its namespace", not without_namespace, without_namespace)

    deployment = named(docs, "Deployment", FULLNAME)
    if not checks.check(f"{label}: Deployment {FULLNAME} exists", deployment is not None):
        return
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    container = main_container(deployment)
    pod_labels = pod["metadata"]["labels"]

    checks.check(
        f"{label}: Deployment selector matches its pod labels",
        selects(deployment["spec"]["selector"]["matchLabels"], pod_labels),
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    checks.check(
        f"{label}: container ports are exactly grpc 9000, http 8080, admin 8081",
        ports == EXPECTED_PORTS and len(container["ports"]) == 3,
        ports,
    )
    checks.check(
        f"{label}: args pass --config /etc/keel/config.yaml and serve",
        container.get("args") == ["--config", "/etc/keel/config.yaml", "serve"],
        container.get("args"),
    )
    secret_env = [
        e["name"] for c in spec.get("containers", []) + spec.get("initContainers", []) for e in c.get("env", [])
        if "secretKeyRef" in (e.get("valueFrom") or {})
    ]
    checks.check(f"{label}: no secret is passed as an environment variable", not secret_env, secret_env)
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mount = mounts.get("/etc/keel")
    volume = volumes.get(mount["name"]) if mount else None
    checks.check(
        f"{label}: the ConfigMap is mounted read-only at /etc/keel",
        bool(mount and mount.get("readOnly") and volume and volume.get("configMap", {}).get("name") == FULLNAME),
        mount,
    )

    # Restricted security context.
    psc = spec.get("securityContext", {})
    checks.check(
        f"{label}: pod securityContext is restricted (runAsNonRoot, non-root uid/gid, fsGroup, RuntimeDefault seccomp)",
        psc.get("runAsNonRoot") is True
        and isinstance(psc.get("runAsUser"), int)
        and psc["runAsUser"] > 0
        and isinstance(psc.get("runAsGroup"), int)
        and psc["runAsGroup"] > 0
        and isinstance(psc.get("fsGroup"), int)
        and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        psc,
    )
    csc = container.get("securityContext", {})
    checks.check(
        f"{label}: container securityContext is restricted (read-only root, no escalation, drop ALL, non-root)",
        csc.get("readOnlyRootFilesystem") is True
        and csc.get("allowPrivilegeEscalation") is False
        and csc.get("capabilities", {}).get("drop") == ["ALL"]
        and not csc.get("capabilities", {}).get("add")
        and csc.get("runAsNonRoot") is True
        and not csc.get("privileged"),
        csc,
    )
    checks.check(
        f"{label}: pod spec has automountServiceAccountToken: false",
        spec.get("automountServiceAccountToken") is False,
    )
    sa_name = spec.get("serviceAccountName")
    account = named(docs, "ServiceAccount", sa_name or "")
    checks.check(
        f"{label}: ServiceAccount {sa_name} exists with automountServiceAccountToken: false",
        account is not None and account.get("automountServiceAccountToken") is False,
        account,
    )
    resources = container.get("resources", {})
    checks.check(
        f"{label}: resources set cpu/memory requests and a memory limit",
        {"cpu", "memory"} <= set(resources.get("requests", {})) and "memory" in resources.get("limits", {}),
        resources,
    )
    checks.check(
        f"{label}: memory request equals the memory limit",
        resources.get("requests", {}).get("memory") == resources.get("limits", {}).get("memory"),
        resources,
    )
    checks.check(f"{label}: startupProbe present", "startupProbe" in container)
    checksum = pod["metadata"].get("annotations", {}).get("checksum/config", "")
    checks.check(
        f"{label}: pod annotation checksum/config is a sha256",
        re.fullmatch(r"[0-9a-f]{64}", checksum) is not None,
        checksum,
    )

    # Environment and tokens.
    env = env_map(container)
    checks.check(
        f"{label}: env KEEL_ENV=production",
        env.get("KEEL_ENV", {}).get("value") == "production",
        env.get("KEEL_ENV"),
    )

    # The public Service.
    service = named(docs, "Service", FULLNAME)
    if checks.check(f"{label}: public Service {FULLNAME} exists", service is not None):
        sports = service["spec"]["ports"]
        checks.check(
            f"{label}: public Service is ClusterIP",
            service["spec"].get("type", "ClusterIP") == "ClusterIP" and "clusterIP" not in service["spec"],
        )
        checks.check(
            f"{label}: public Service exposes exactly grpc and http",
            sorted(p["name"] for p in sports) == ["grpc", "http"],
            sports,
        )
        checks.check(
            f"{label}: public Service has no admin port (8081 / admin)",
            not any(
                p.get("port") == EXPECTED_PORTS["admin"]
                or p.get("targetPort") in ("admin", EXPECTED_PORTS["admin"])
                or p.get("name") == "admin"
                for p in sports
            ),
            sports,
        )
        protocols = {p["name"]: p.get("appProtocol") for p in sports}
        checks.check(
            f"{label}: appProtocol kubernetes.io/h2c on grpc, http on http",
            protocols == {"grpc": "kubernetes.io/h2c", "http": "http"},
            protocols,
        )
        checks.check(
            f"{label}: public Service targets named container ports",
            {p["name"]: p["targetPort"] for p in sports} == {"grpc": "grpc", "http": "http"},
        )
        checks.check(
            f"{label}: public Service selects the keel pods",
            selects(service["spec"]["selector"], pod_labels),
        )

    # ConfigMap: only keel keys, no secrets.
    configmap = named(docs, "ConfigMap", FULLNAME)
    if checks.check(
        f"{label}: ConfigMap {FULLNAME} with config.yaml", bool(configmap and "config.yaml" in configmap["data"])
    ):
        config = rendered_config(docs)
        known = leaf_keys(yaml.safe_load((ROOT / "config" / "default.yaml").read_text()))
        unknown = sorted(leaf_keys(config) - known)
        checks.check(f"{label}: config.yaml holds only keys of config/default.yaml", not unknown, unknown)
        checks.check(
            f"{label}: config.yaml has no auth.tokens",
            "tokens" not in (config.get("auth") or {}),
            config.get("auth"),
        )
        secrets_text = []
        for secret in objects(docs, "Secret"):
            for value in (secret.get("data") or {}).values():
                secrets_text += base64.b64decode(value).decode().split(",")
        leaked = [t for t in secrets_text if t and t in json.dumps(configmap)]
        checks.check(f"{label}: no token from any Secret appears in the ConfigMap", not leaked)

    # helm test pod.
    test_pods = [p for p in objects(docs, "Pod") if p["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    if checks.check(f"{label}: one helm test Pod (helm.sh/hook: test)", len(test_pods) == 1, len(test_pods)):
        test_pod = test_pods[0]
        tcontainer = test_pod["spec"]["containers"][0]
        checks.check(
            f"{label}: test pod runs `keel healthcheck --addr {FULLNAME}:9000` from the same image",
            # With TLS on, over TLS: the probe flags follow (see check_tls).
            (tcontainer.get("args") or [])[:3] == ["healthcheck", "--addr", f"{FULLNAME}:9000"]
            and (tcontainer.get("args") or [])[3:4] in ([], ["--tls"])
            and tcontainer.get("image") == container.get("image"),
            (tcontainer.get("args"), tcontainer.get("image")),
        )
        checks.check(
            f"{label}: test pod has the same restricted securityContext",
            test_pod["spec"].get("securityContext") == psc and tcontainer.get("securityContext") == csc,
        )
        checks.check(
            f"{label}: test pod: restartPolicy Never, no service account token",
            test_pod["spec"].get("restartPolicy") == "Never"
            and test_pod["spec"].get("automountServiceAccountToken") is False,
        )
        services = objects(docs, "Service")
        checks.check(
            f"{label}: test pod is not selected by any Service or the Deployment",
            not any(selects(s["spec"].get("selector"), test_pod["metadata"]["labels"]) for s in services)
            and not selects(deployment["spec"]["selector"]["matchLabels"], test_pod["metadata"]["labels"]),
        )

    config = rendered_config(docs)
    if (config.get("auth") or {}).get("disabled"):
        checks.check(f"{label}: no tokens file with auth disabled", "tokens_file" not in config["auth"], config["auth"])
    else:
        auth_mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == AUTH_DIR]
        auth_volume = volumes.get(auth_mounts[0]["name"], {}) if auth_mounts else {}
        checks.check(
            f"{label}: the tokens Secret is mounted read-only at {AUTH_DIR} without subPath, and config.auth.tokens_file points at it",
            len(auth_mounts) == 1
            and auth_mounts[0].get("readOnly") is True
            and "subPath" not in auth_mounts[0]
            and [i["path"] for i in auth_volume.get("secret", {}).get("items", [])] == ["tokens"]
            and config.get("auth", {}).get("tokens_file") == AUTH_TOKENS_FILE,
            (auth_mounts, auth_volume, config.get("auth")),
        )

    image = container["image"]
    checks.check(
        f"{label}: image has a tag or a digest",
        "@sha256:" in image or re.search(r":[^/:]+$", image) is not None,
        image,
    )


# The individual renders


def check_default(checks: Checks, tools: Tools, app_version: str) -> dict | None:
    label = "default"
    checks.section("helm template with the default values")
    docs = render(checks, tools, label, [])
    if docs is None:
        return None
    validate(checks, tools, label, docs)
    check_common(checks, label, docs, app_version)
    kinds = sorted(doc["kind"] for doc in docs)
    checks.check(
        f"{label}: renders exactly ServiceAccount, Secret, ConfigMap, Service, Deployment and the test Pod",
        kinds == sorted(["ServiceAccount", "Secret", "ConfigMap", "Service", "Deployment", "Pod"]),
        kinds,
    )
    for kind in (
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "NetworkPolicy",
        "Ingress",
        "HTTPRoute",
        "GRPCRoute",
    ):
        checks.check(f"{label}: no {kind} by default", not objects(docs, kind))
    deployment = named(docs, "Deployment", FULLNAME)
    container = main_container(deployment)
    spec = deployment["spec"]["template"]["spec"]
    checks.check(
        f"{label}: replicas: 1 (the memory store cannot be shared)",
        deployment["spec"].get("replicas") == 1,
        deployment["spec"].get("replicas"),
    )
    checks.check(f"{label}: no migration Job without a database", not objects(docs, "Job"))
    checks.check(f"{label}: no database in config.yaml", "database" not in rendered_config(docs))
    checks.check(
        f"{label}: image is repository:appVersion",
        container["image"] == f"ghcr.io/example/keel:{app_version}",
        container["image"],
    )

    readiness = container.get("readinessProbe", {}).get("httpGet", {})
    liveness = container.get("livenessProbe", {}).get("httpGet", {})
    startup = container.get("startupProbe", {}).get("httpGet", {})
    checks.check(
        f"{label}: readinessProbe httpGet /readyz on port admin",
        readiness.get("path") == "/readyz" and readiness.get("port") == "admin",
        readiness,
    )
    checks.check(
        f"{label}: livenessProbe httpGet /livez on port admin",
        liveness.get("path") == "/livez" and liveness.get("port") == "admin",
        liveness,
    )
    checks.check(f"{label}: startupProbe httpGet on port admin", startup.get("port") == "admin", startup)

    grace = spec.get("terminationGracePeriodSeconds")
    checks.check(
        f"{label}: terminationGracePeriodSeconds = 5s + 20s + 1s flush + 5s margin = 31 (>= 27)",
        grace == expected_grace("5s", "20s") == 31 and grace >= 27,
        grace,
    )
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    checks.check(
        f"{label}: prometheus.io scrape/port/path pod annotations (no ServiceMonitor)",
        annotations.get("prometheus.io/scrape") == "true"
        and annotations.get("prometheus.io/port") == "8081"
        and annotations.get("prometheus.io/path") == "/metrics",
        annotations,
    )

    volume = next((v for v in spec.get("volumes", []) if v["name"] == "auth"), {})
    secret = named(docs, "Secret", volume.get("secret", {}).get("secretName", ""))
    checks.check(
        f"{label}: the auth volume mounts the chart's Secret, key tokens",
        secret is not None and volume["secret"].get("items") == [{"key": "tokens", "path": "tokens"}],
        volume,
    )
    token = base64.b64decode(secret["data"]["tokens"]).decode() if secret else ""
    checks.check(
        f"{label}: without tokens a random token is generated (>= 32 characters, no commas)",
        len(token) >= 32 and "," not in token,
    )
    checks.check(
        f"{label}: no checksum of the tokens (keel reloads the file: rotation needs no restart)",
        not any(key.startswith("checksum/auth") for key in annotations),
    )
    resources = container["resources"]
    checks.check(
        f"{label}: no CPU limit by default (tokio sizes its pool from the CPU quota), request 250m, memory 128Mi = limit",
        "cpu" not in resources.get("limits", {})
        and resources["requests"] == {"cpu": "250m", "memory": "128Mi"}
        and resources["limits"] == {"memory": "128Mi"},
        resources,
    )

    config = rendered_config(docs)
    checks.check(
        f"{label}: listen addresses derived from ports",
        (config.get("grpc", {}).get("addr"), config.get("http", {}).get("addr"), config.get("admin", {}).get("addr"))
        == ("0.0.0.0:9000", "0.0.0.0:8080", "0.0.0.0:8081"),
        config,
    )
    checks.check(
        f"{label}: config.yaml carries log and shutdown settings",
        config.get("shutdown") == {"drain_delay": "5s", "timeout": "20s", "flush_timeout": "1s"}
        and config.get("log", {}).get("format") == "json",
        config,
    )

    constraints = spec.get("topologySpreadConstraints", [])
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    checks.check(
        f"{label}: topology spread by zone and hostname, ScheduleAnyway, selecting the keel pods",
        sorted(c["topologyKey"] for c in constraints) == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        and all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in constraints)
        and all(selects(c["labelSelector"]["matchLabels"], pod_labels) for c in constraints),
        constraints,
    )
    return deployment["spec"]["template"]["metadata"]["annotations"]


def check_all_on(checks: Checks, tools: Tools, app_version: str) -> None:
    label = "all-on"
    checks.section("helm template with every optional object on (scripts/chart/all-on.yaml)")
    docs = render(checks, tools, label, ["-f", str(ALL_ON)])
    if docs is None:
        return
    validate(checks, tools, label, docs)
    check_common(checks, label, docs, app_version)
    values = yaml.safe_load(ALL_ON.read_text())
    deployment = named(docs, "Deployment", FULLNAME)
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = main_container(deployment)

    for kind in (
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "NetworkPolicy",
        "Ingress",
        "HTTPRoute",
        "GRPCRoute",
    ):
        checks.check(f"{label}: renders one {kind}", len(objects(docs, kind)) == 1)
    check_platform_values(checks, label, docs, values)
    check_routes(checks, label, docs)
    checks.check(f"{label}: Deployment has no replicas (the HPA owns them)", "replicas" not in deployment["spec"])
    checks.check(
        f"{label}: image by digest",
        container["image"] == f"{values['image']['repository']}@{values['image']['digest']}",
        container["image"],
    )

    hpa = named(docs, "HorizontalPodAutoscaler", FULLNAME)
    if hpa:
        target = hpa["spec"]["scaleTargetRef"]
        metrics = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]}
        checks.check(
            f"{label}: HPA (autoscaling/v2) scales Deployment {FULLNAME} 3..12 on cpu 65% and memory 80%",
            hpa["apiVersion"] == "autoscaling/v2"
            and target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
            and (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
            and metrics == {"cpu": 65, "memory": 80}
            and hpa["spec"].get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds") == 300,
            hpa["spec"],
        )
    pdb = named(docs, "PodDisruptionBudget", FULLNAME)
    if pdb:
        checks.check(
            f"{label}: PDB (policy/v1) maxUnavailable 1 over the keel pods",
            pdb["apiVersion"] == "policy/v1"
            and pdb["spec"].get("maxUnavailable") == 1
            and "minAvailable" not in pdb["spec"]
            and selects(pdb["spec"]["selector"]["matchLabels"], pod_labels),
            pdb["spec"],
        )

    # Metrics Service and ServiceMonitor.
    metrics_service = named(docs, "Service", f"{FULLNAME}-metrics")
    public = named(docs, "Service", FULLNAME)
    headless = named(docs, "Service", f"{FULLNAME}-headless")
    if checks.check(f"{label}: metrics Service {FULLNAME}-metrics exists", metrics_service is not None):
        checks.check(
            f"{label}: metrics Service exposes only the admin port",
            [(p["name"], p["port"], p["targetPort"]) for p in metrics_service["spec"]["ports"]]
            == [("admin", 8081, "admin")],
            metrics_service["spec"]["ports"],
        )
        checks.check(
            f"{label}: metrics Service selects the keel pods", selects(metrics_service["spec"]["selector"], pod_labels)
        )
    monitor = objects(docs, "ServiceMonitor")
    if monitor and metrics_service:
        monitor = monitor[0]
        endpoint = (monitor["spec"].get("endpoints") or [{}])[0]
        selector = monitor["spec"].get("selector", {}).get("matchLabels")
        admin_port_names = [p["name"] for p in metrics_service["spec"]["ports"]]
        checks.check(
            f"{label}: ServiceMonitor is monitoring.coreos.com/v1 ServiceMonitor",
            monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor",
        )
        checks.check(
            f"{label}: ServiceMonitor endpoint: port admin (a port of the metrics Service), path /metrics",
            endpoint.get("port") == "admin" and "admin" in admin_port_names and endpoint.get("path") == "/metrics",
            endpoint,
        )
        checks.check(
            f"{label}: ServiceMonitor interval 15s, scrapeTimeout 5s, metricRelabelings passed through",
            endpoint.get("interval") == "15s"
            and endpoint.get("scrapeTimeout") == "5s"
            and endpoint.get("metricRelabelings") == values["serviceMonitor"]["metricRelabelings"],
            endpoint,
        )
        checks.check(
            f"{label}: ServiceMonitor selector matches the metrics Service labels",
            selects(selector, metrics_service["metadata"]["labels"]),
            selector,
        )
        checks.check(
            f"{label}: ServiceMonitor selector matches neither the public nor the headless Service",
            not selects(selector, public["metadata"]["labels"])
            and not (headless and selects(selector, headless["metadata"]["labels"])),
        )
        checks.check(
            f"{label}: ServiceMonitor looks in the release namespace and carries its extra labels",
            monitor["spec"].get("namespaceSelector") == {"matchNames": [NAMESPACE]}
            and monitor["metadata"]["labels"].get("release") == "prometheus",
        )
        known_fields = {"namespaceSelector", "selector", "endpoints"}
        endpoint_fields = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}
        checks.check(
            f"{label}: ServiceMonitor uses only known spec and endpoint fields",
            set(monitor["spec"]) <= known_fields and set(endpoint) <= endpoint_fields,
            (sorted(monitor["spec"]), sorted(endpoint)),
        )
    annotations = pod["metadata"].get("annotations", {})
    checks.check(
        f"{label}: no prometheus.io annotations when the ServiceMonitor is on",
        not any(key.startswith("prometheus.io/") for key in annotations),
        annotations,
    )
    checks.check(
        f"{label}: podAnnotations and podLabels applied",
        annotations.get("example.com/team") == "platform" and pod_labels.get("example.com/tier") == "backend",
    )

    # Headless Service.
    if checks.check(f"{label}: headless Service {FULLNAME}-headless exists", headless is not None):
        checks.check(
            f"{label}: headless Service has clusterIP None and the grpc port",
            headless["spec"].get("clusterIP") == "None"
            and [(p["name"], p["port"]) for p in headless["spec"]["ports"]] == [("grpc", 9000)]
            and selects(headless["spec"]["selector"], pod_labels),
            headless["spec"],
        )

    # NetworkPolicy.
    policy = named(docs, "NetworkPolicy", FULLNAME)
    if policy:
        rules = policy["spec"].get("ingress", [])
        by_ports = {tuple(sorted(str(p["port"]) for p in rule.get("ports", []))): rule for rule in rules}
        public_rule = by_ports.get(("grpc", "http"), {})
        admin_rule = by_ports.get(("admin",), {})
        test_pod = next(p for p in objects(docs, "Pod") if p["metadata"]["name"].endswith("test-healthcheck"))
        checks.check(
            f"{label}: NetworkPolicy selects the keel pods, Ingress only",
            selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
            and policy["spec"].get("policyTypes") == ["Ingress"],
        )
        checks.check(
            f"{label}: NetworkPolicy: grpc/http from ingressFrom and from the helm test pod",
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}}}
            in public_rule.get("from", [])
            and any(
                selects(peer.get("podSelector", {}).get("matchLabels"), test_pod["metadata"]["labels"])
                for peer in public_rule.get("from", [])
            ),
            public_rule,
        )
        checks.check(
            f"{label}: NetworkPolicy: admin only from metricsFrom",
            admin_rule.get("from") == values["networkPolicy"]["metricsFrom"] and len(rules) == 2,
            rules,
        )

    # Tokens from values: in the Secret, never in the ConfigMap.
    volume = next((v for v in pod["spec"].get("volumes", []) if v["name"] == "auth"), {})
    secret = named(docs, "Secret", volume.get("secret", {}).get("secretName", ""))
    tokens = ",".join(values["auth"]["tokens"])
    checks.check(
        f"{label}: the chart's Secret holds auth.tokens joined with commas, mounted as the tokens file",
        secret is not None and base64.b64decode(secret["data"]["tokens"]).decode() == tokens,
        volume,
    )
    configmap_text = json.dumps(named(docs, "ConfigMap", FULLNAME))
    checks.check(
        f"{label}: no token in the ConfigMap",
        not any(token in configmap_text for token in values["auth"]["tokens"]),
    )
    checks.check(
        f"{label}: no checksum/auth pod annotation (tokens are reloaded, not rolled)",
        "checksum/auth" not in annotations,
    )
    checks.check(
        f"{label}: extraEnv appended after KEEL_ENV",
        [e["name"] for e in container["env"]] == ["KEEL_ENV", "RUST_BACKTRACE"],
        [e["name"] for e in container["env"]],
    )

    config_db = rendered_config(docs).get("database")
    job = named(docs, "Job", f"{FULLNAME}-migrate")
    if checks.check(f"{label}: migration Job {FULLNAME}-migrate renders", job is not None):
        job_pod = job["spec"]["template"]["spec"]
        job_env = env_map(job_pod["containers"][0])
        checks.check(
            f"{label}: Job takes database.migrate (backoffLimit, deadline, resources), the pool timeouts and the Secret key",
            job["spec"]["backoffLimit"] == 1
            and job["spec"]["activeDeadlineSeconds"] == 300
            and job_pod["containers"][0]["resources"] == values["database"]["migrate"]["resources"]
            and job_env.get("KEEL__DATABASE__ACQUIRE_TIMEOUT", {}).get("value") == "5s"
            and job_env.get("KEEL__DATABASE__STATEMENT_TIMEOUT", {}).get("value") == "15s"
            and job_pod["volumes"][0]["secret"]["items"] == [{"key": "postgres-url", "path": "url"}]
            and job_pod.get("imagePullSecrets") == [{"name": "registry-credentials"}],
            job,
        )
    checks.check(
        f"{label}: config.database keeps the pool settings and gets url_file",
        config_db == {
            "max_connections": 20,
            "acquire_timeout": "5s",
            "statement_timeout": "15s",
            "url_file": "/var/run/secrets/keel/database/url",
        },
        config_db,
    )

    grace = pod["spec"]["terminationGracePeriodSeconds"]
    checks.check(
        f"{label}: terminationGracePeriodSeconds = 10s + 30s + 1s + 5s = 46",
        grace == expected_grace("10s", "30s") == 46,
        grace,
    )
    config = rendered_config(docs)
    checks.check(
        f"{label}: config values rendered (log level, max_concurrent_streams, max_body_size)",
        config["log"]["level"] == "keel=debug,tower=warn"
        and config["grpc"]["max_concurrent_streams"] == 256
        and config["http"]["max_body_size"] == "8MiB",
        config,
    )
    checks.check(
        f"{label}: scheduling values passed through (nodeSelector, tolerations, affinity, priorityClassName, imagePullSecrets)",
        pod["spec"].get("nodeSelector") == values["nodeSelector"]
        and pod["spec"].get("tolerations") == values["tolerations"]
        and pod["spec"].get("affinity") == values["affinity"]
        and pod["spec"].get("priorityClassName") == "high-priority"
        and pod["spec"].get("imagePullSecrets") == [{"name": "registry-credentials"}],
    )


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(object, pod template metadata) of every workload and bare pod."""
    out = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "Job"):
            out.append((name, doc["spec"]["template"]["metadata"]))
        elif doc["kind"] == "Pod":
            out.append((name, doc["metadata"]))
    return out


def check_platform_values(checks: Checks, label: str, docs: list[dict], values: dict) -> None:
    """commonLabels, commonAnnotations and the injected containers, env and
    volumes of all-on.yaml land where a platform expects them."""
    common = values["commonLabels"]
    annotations = values["commonAnnotations"]
    missing = [
        f"{doc['kind']}/{doc['metadata']['name']}"
        for doc in docs
        if any((doc["metadata"].get("labels") or {}).get(k) != v for k, v in common.items())
        or any((doc["metadata"].get("annotations") or {}).get(k) != v for k, v in annotations.items())
    ]
    missing += [
        f"{name} pod template"
        for name, meta in pod_specs(docs)
        if any((meta.get("labels") or {}).get(k) != v for k, v in common.items())
        or any((meta.get("annotations") or {}).get(k) != v for k, v in annotations.items())
    ]
    checks.check(f"{label}: commonLabels and commonAnnotations on every object and pod template", not missing, missing)
    deployment = named(docs, "Deployment", FULLNAME)
    spec = deployment["spec"]["template"]["spec"]
    container = main_container(deployment)
    checks.check(
        f"{label}: deploymentAnnotations on the Deployment only (not its pods)",
        deployment["metadata"]["annotations"].get("example.com/rollout") == "canary"
        and "example.com/rollout" not in deployment["spec"]["template"]["metadata"].get("annotations", {}),
        deployment["metadata"].get("annotations"),
    )
    hooks = {doc["metadata"]["name"]: doc["metadata"]["annotations"] for doc in docs if doc["kind"] in ("Job", "Pod")}
    checks.check(
        f"{label}: hook annotations kept beside commonAnnotations",
        all("helm.sh/hook" in a and "helm.sh/hook-delete-policy" in a for a in hooks.values()) and len(hooks) == 2,
        hooks,
    )
    checks.check(
        f"{label}: initContainers and sidecars passed through, keel first",
        [c["name"] for c in spec.get("initContainers", [])] == ["wait-for-network"]
        and [c["name"] for c in spec["containers"]] == ["keel", "log-shipper"]
        and spec["containers"][1] == values["sidecars"][0],
        [c["name"] for c in spec["containers"]],
    )
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    checks.check(
        f"{label}: extraEnvFrom, extraVolumes and extraVolumeMounts passed through",
        container.get("envFrom") == values["extraEnvFrom"]
        and any(v == values["extraVolumes"][0] for v in spec["volumes"])
        and mounts.get("scratch") == values["extraVolumeMounts"][0],
        (container.get("envFrom"), sorted(mounts)),
    )
    checks.check(
        f"{label}: config.runtime.worker_threads reaches config.yaml",
        rendered_config(docs).get("runtime") == {"worker_threads": 4},
        rendered_config(docs).get("runtime"),
    )


def check_routes(checks: Checks, label: str, docs: list[dict]) -> None:
    """Ingress, HTTPRoute and GRPCRoute point at ports the public Service
    has, gRPC at the h2c one."""
    service = named(docs, "Service", FULLNAME)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    ingress = named(docs, "Ingress", FULLNAME)
    if ingress:
        backends = [
            path["backend"]["service"]
            for rule in ingress["spec"]["rules"]
            for path in rule["http"]["paths"]
        ]
        checks.check(
            f"{label}: Ingress routes api.example.com / to the Service's http port, with TLS and the class",
            backends == [{"name": FULLNAME, "port": {"name": "http"}}]
            and ingress["spec"]["rules"][0]["host"] == "api.example.com"
            and ingress["spec"].get("ingressClassName") == "nginx"
            and ingress["spec"]["tls"][0]["secretName"] == "api-example-com-tls",
            ingress["spec"],
        )
    for kind, suffix, port_name in (("HTTPRoute", "http", "http"), ("GRPCRoute", "grpc", "grpc")):
        route = named(docs, kind, f"{FULLNAME}-{suffix}")
        if not checks.check(f"{label}: {kind} {FULLNAME}-{suffix} exists", route is not None):
            continue
        refs = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
        checks.check(
            f"{label}: {kind} sends to the Service's {port_name} port ({ports[port_name]['port']}, appProtocol {ports[port_name].get('appProtocol')})",
            refs == [{"name": FULLNAME, "port": ports[port_name]["port"]}]
            and route["spec"]["parentRefs"][0]["name"] == "public",
            route["spec"],
        )
    grpc_route = named(docs, "GRPCRoute", f"{FULLNAME}-grpc")
    if grpc_route:
        checks.check(
            f"{label}: GRPCRoute matches user.v1.UserService; the grpc Service port speaks h2c",
            grpc_route["spec"]["rules"][0]["matches"] == [{"method": {"service": "user.v1.UserService"}}]
            and ports["grpc"].get("appProtocol") == "kubernetes.io/h2c",
        )


def check_common_labels(checks: Checks, tools: Tools) -> None:
    """`--set commonLabels.team=x` lands on every object and pod template of
    every render, and namespaceOverride on every object."""
    checks.section("commonLabels, commonAnnotations and the namespace on every object")
    for label, args in (
        ("default", []),
        ("all-on", ["-f", str(ALL_ON)]),
        ("database", ["--set", "database.existingSecret=db"]),
    ):
        docs = render(checks, tools, f"{label} + commonLabels.team=x", [*args, "--set", "commonLabels.team=x", "--set", "commonAnnotations.example\\.com/note=y"])
        if docs is None:
            continue
        missing = [
            f"{doc['kind']}/{doc['metadata']['name']}"
            for doc in docs
            if (doc["metadata"].get("labels") or {}).get("team") != "x"
            or (doc["metadata"].get("annotations") or {}).get("example.com/note") != "y"
        ]
        missing += [
            f"{name} pod template"
            for name, meta in pod_specs(docs)
            if (meta.get("labels") or {}).get("team") != "x"
            or (meta.get("annotations") or {}).get("example.com/note") != "y"
        ]
        checks.check(
            f"{label}: commonLabels.team=x and a commonAnnotation on all {len(docs)} objects and their pod templates",
            not missing,
            missing,
        )
        deployment = named(docs, "Deployment", FULLNAME)
        checks.check(
            f"{label}: commonLabels never reach the Deployment's selector",
            "team" not in deployment["spec"]["selector"]["matchLabels"],
        )
    docs = render(checks, tools, "namespaceOverride=payments", ["-f", str(ALL_ON), "--set", "namespaceOverride=payments"])
    if docs is not None:
        wrong = [
            f"{doc['kind']}/{doc['metadata']['name']}: {doc['metadata'].get('namespace')}"
            for doc in docs
            if doc["metadata"].get("namespace") != "payments"
        ]
        monitor = objects(docs, "ServiceMonitor")[0]
        checks.check("namespaceOverride=payments: every object in namespace payments", not wrong, wrong)
        checks.check(
            "namespaceOverride=payments: the ServiceMonitor looks in payments",
            monitor["spec"]["namespaceSelector"] == {"matchNames": ["payments"]},
        )


def check_pdb_and_policies(checks: Checks, tools: Tools) -> None:
    """The PodDisruptionBudget follows the number of pods that can run; the
    NetworkPolicy keeps Prometheus in; command/args overrides."""
    checks.section("PodDisruptionBudget default, NetworkPolicy and scraping, command/args")
    for label, args, expected in (
        ("memory store (1 pod)", [], False),
        ("database (2 pods)", ["--set", "database.existingSecret=db"], True),
        ("store=none (2 pods)", ["--set", "store=none"], True),
        ("store=none, replicaCount=1", ["--set", "store=none", "--set", "replicaCount=1"], False),
        ("store=none, autoscaling 2..10", ["--set", "store=none", "--set", "autoscaling.enabled=true"], True),
        (
            "store=none, autoscaling 1..10",
            ["--set", "store=none", "--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=1"],
            False,
        ),
        ("database, enabled=false", ["--set", "database.existingSecret=db", "--set", "podDisruptionBudget.enabled=false"], False),
    ):
        docs = render(checks, tools, f"PDB: {label}", args)
        if docs is not None:
            pdbs = objects(docs, "PodDisruptionBudget")
            checks.check(
                f"PDB: {label}: {'one PodDisruptionBudget, maxUnavailable 1' if expected else 'no PodDisruptionBudget'}",
                (len(pdbs) == 1 and pdbs[0]["spec"].get("maxUnavailable") == 1) if expected else not pdbs,
                [p["spec"] for p in pdbs],
            )
    docs = render(
        checks,
        tools,
        "NetworkPolicy without scraping",
        ["--set", "networkPolicy.enabled=true", "--set", "scrapeAnnotations=false"],
    )
    if docs is not None:
        deployment = named(docs, "Deployment", FULLNAME)
        policy = named(docs, "NetworkPolicy", FULLNAME)
        checks.check(
            "networkPolicy.enabled=true, scrapeAnnotations=false: renders, no admin rule, no scrape annotations",
            policy is not None
            and len(policy["spec"]["ingress"]) == 1
            and not any(k.startswith("prometheus.io/") for k in deployment["spec"]["template"]["metadata"]["annotations"]),
        )
    docs = render(
        checks,
        tools,
        "NetworkPolicy with metricsFrom and annotations",
        [
            "--set",
            "networkPolicy.enabled=true",
            "--set-json",
            'networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]',
        ],
    )
    if docs is not None:
        policy = named(docs, "NetworkPolicy", FULLNAME)
        admin = [r for r in policy["spec"]["ingress"] if [p["port"] for p in r["ports"]] == ["admin"]]
        checks.check("networkPolicy with metricsFrom: an admin-port rule for Prometheus", len(admin) == 1, policy["spec"])
    docs = render(
        checks,
        tools,
        "command/args override",
        ["--set-json", 'command=["/app/keel"]', "--set-json", 'args=["--config","/etc/keel/config.yaml","serve"]'],
    )
    if docs is not None:
        container = main_container(named(docs, "Deployment", FULLNAME))
        checks.check(
            "command/args override: command and args replaced verbatim",
            container.get("command") == ["/app/keel"] and container.get("args") == ["--config", "/etc/keel/config.yaml", "serve"],
            (container.get("command"), container.get("args")),
        )


def check_floor(checks: Checks, tools: Tools) -> None:
    """The declared floor is honest: what the chart uses exists there."""
    checks.section("Kubernetes version floor")
    floor = kube_floor()
    checks.check(
        f"kubeVersion floor {floor} is 1.27 or later (matchLabelKeys, unhealthyPodEvictionPolicy, gRPC probes)",
        tuple(int(x) for x in floor.split(".")[:2]) >= (1, 27),
        floor,
    )
    below = run([tools.helm, "template", RELEASE, str(CHART), "--kube-version", "1.26.0"])
    checks.check(
        "helm template --kube-version 1.26.0 is refused by the chart's kubeVersion",
        below.returncode != 0 and "kubeVersion" in below.stderr,
        short(below.stderr, 300),
    )
    at_floor = run([tools.helm, "template", RELEASE, str(CHART), "--kube-version", floor, "-f", str(ALL_ON)])
    checks.check(f"helm template --kube-version {floor} (the floor) renders all-on", at_floor.returncode == 0, short(at_floor.stderr))


def check_grpc_probes(checks: Checks, tools: Tools, app_version: str) -> None:
    label = "grpc-probes"
    checks.section("helm template with native gRPC probes and an existing Secret (all-on + overrides)")
    args = [
        "-f",
        str(ALL_ON),
        "--set",
        "probes.type=grpc",
        "--set",
        "auth.existingSecret=keel-tokens",
        "--set",
        "auth.existingSecretKey=api-tokens",
    ]
    docs = render(checks, tools, label, args)
    if docs is None:
        return
    validate(checks, tools, label, docs)
    check_common(checks, label, docs, app_version)
    deployment = named(docs, "Deployment", FULLNAME)
    container = main_container(deployment)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container.get(probe, {})
        checks.check(
            f"{label}: {probe} is a native gRPC probe on port 9000",
            spec.get("grpc") == {"port": 9000} and "httpGet" not in spec,
            spec,
        )
    volume = next((v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth"), {})
    checks.check(
        f"{label}: the tokens file comes from Secret keel-tokens key api-tokens (existingSecret wins)",
        volume.get("secret", {}).get("secretName") == "keel-tokens"
        and volume["secret"].get("items") == [{"key": "api-tokens", "path": "tokens"}],
        volume,
    )
    checks.check(f"{label}: no Secret rendered with auth.existingSecret", not objects(docs, "Secret"))
    checks.check(
        f"{label}: no checksum/auth annotation with auth.existingSecret",
        "checksum/auth" not in deployment["spec"]["template"]["metadata"]["annotations"],
    )


def check_tls(checks: Checks, tools: Tools, app_version: str) -> None:
    """TLS on (issue #17): the Secret mounted as files, keel's config pointing
    at them, HTTP probes even when gRPC probes were asked for, the
    cert-manager Certificate, and mTLS wiring the CA."""
    label = "tls"
    checks.section("helm template with TLS, mTLS and a cert-manager Certificate")
    args = [
        "--set", "tls.enabled=true", "--set", "tls.mtls=true", "--set", "tls.certManager.enabled=true",
        "--set", "tls.certManager.issuerRef.name=ca-issuer", "--set", "probes.type=grpc",
        "--set", "commonLabels.team=x", "--set", "namespaceOverride=shop",
    ]
    docs = render(checks, tools, label, args)
    if docs is None:
        return
    validate(checks, tools, label, docs)
    check_common(checks, label, docs, app_version)
    deployment = named(docs, "Deployment", FULLNAME)
    container = main_container(deployment)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container.get(probe, {})
        checks.check(f"{label}: {probe} is httpGet on admin (the kubelet's gRPC probe cannot do TLS)",
                     "httpGet" in spec and "grpc" not in spec, spec)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    checks.check(f"{label}: the TLS Secret is mounted whole (no subPath), read-only",
                 "tls" in volumes and "subPath" not in mounts.get("tls", {"subPath": 1})
                 and mounts["tls"].get("readOnly") is True, mounts.get("tls"))
    tls_config = rendered_config(docs).get("grpc", {}).get("tls", {})
    checks.check(f"{label}: grpc.tls points at the mounted files, with the CA for mTLS",
                 tls_config.get("cert_file", "").startswith(mounts.get("tls", {}).get("mountPath", "?"))
                 and tls_config.get("client_ca_file", "").endswith("ca.crt"), tls_config)
    test_pod = next((p for p in objects(docs, "Pod") if p["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"), {})
    test_args = (test_pod.get("spec", {}).get("containers") or [{}])[0].get("args", [])
    checks.check(f"{label}: helm test runs keel healthcheck over mTLS (--tls, the CA, a client certificate)",
                 "--tls" in test_args and "--ca-file" in test_args and "--cert-file" in test_args, test_args)
    certificate = next((d for d in docs if d["kind"] == "Certificate"), None)
    checks.check(f"{label}: a cert-manager Certificate makes the Secret the pod mounts",
                 certificate is not None
                 and certificate["spec"]["secretName"] == volumes.get("tls", {}).get("secret", {}).get("secretName"),
                 certificate and certificate.get("spec"))
    checks.check(f"{label}: the Certificate carries the namespace and commonLabels",
                 certificate is not None and certificate["metadata"].get("namespace") == "shop"
                 and certificate["metadata"].get("labels", {}).get("team") == "x", certificate and certificate["metadata"])


def deployment_of(checks: Checks, tools: Tools, label: str, args: list[str]) -> tuple[dict | None, list[dict]]:
    docs = render(checks, tools, label, args)
    if docs is None:
        return None, []
    return named(docs, "Deployment", FULLNAME), docs


def check_variations(checks: Checks, tools: Tools, default_annotations: dict | None) -> None:
    checks.section("value variations")

    deployment, _ = deployment_of(checks, tools, "drain_delay=30s", ["--set", "config.shutdown.drain_delay=30s"])
    if deployment:
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        checks.check(
            "drain_delay=30s: terminationGracePeriodSeconds rises to 30s + 20s + 1s + 5s = 56",
            grace == expected_grace("30s", "20s") == 56,
            grace,
        )

    deployment, _ = deployment_of(
        checks,
        tools,
        "1m30s/250ms",
        ["--set", "config.shutdown.drain_delay=1m30s", "--set", "config.shutdown.timeout=250ms"],
    )
    if deployment:
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        checks.check(
            "drain_delay=1m30s timeout=250ms: terminationGracePeriodSeconds = ceil(91.25) + 5 = 97",
            grace == expected_grace("1m30s", "250ms") == 97,
            grace,
        )

    for explicit, drain, timeout in ((27, "5s", "20s"), (60, "5s", "20s"), (93, "1m30s", "250ms")):
        deployment, _ = deployment_of(
            checks,
            tools,
            f"terminationGracePeriodSeconds={explicit}",
            [
                "--set",
                f"terminationGracePeriodSeconds={explicit}",
                "--set",
                f"config.shutdown.drain_delay={drain}",
                "--set",
                f"config.shutdown.timeout={timeout}",
            ],
        )
        if deployment:
            grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            checks.check(
                f"explicit terminationGracePeriodSeconds={explicit} (>= {drain} + {timeout} + 1s flush + 1s) is kept",
                grace == explicit,
                grace,
            )

    original = (default_annotations or {}).get("checksum/config")
    deployment, _ = deployment_of(checks, tools, "log.level=debug", ["--set", "config.log.level=debug"])
    if deployment:
        changed = deployment["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config")
        checks.check(
            "checksum/config changes when a config value changes (log.level=debug)",
            bool(original) and bool(changed) and changed != original,
            (original, changed),
        )
    deployment, _ = deployment_of(checks, tools, "rerender", [])
    if deployment:
        again = deployment["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config")
        checks.check(
            "checksum/config is stable for the same values", bool(original) and again == original, (original, again)
        )

    deployment, docs = deployment_of(checks, tools, "auth disabled", ["--set", "config.auth.disabled=true"])
    if deployment:
        env = env_map(main_container(deployment))
        checks.check(
            "config.auth.disabled=true: no Secret, no auth volume, auth.disabled in config.yaml",
            not objects(docs, "Secret")
            and not any(v["name"] == "auth" for v in deployment["spec"]["template"]["spec"]["volumes"])
            and rendered_config(docs).get("auth") == {"disabled": True},
        )

    deployment, docs = deployment_of(
        checks,
        tools,
        "ports",
        ["--set", "ports.grpc=9100", "--set", "listenHost=[::]"],
    )
    if deployment:
        container = main_container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        config = rendered_config(docs)
        test_pod = objects(docs, "Pod")[0]
        checks.check(
            "ports.grpc=9100, listenHost=[::]: container port and listen addresses follow; Service port stays 9000",
            ports["grpc"] == 9100
            and config["grpc"]["addr"] == "[::]:9100"
            and config["admin"]["addr"] == "[::]:8081"
            and test_pod["spec"]["containers"][0]["args"][-1] == f"{FULLNAME}:9000",
            (ports, config),
        )

    deployment, docs = deployment_of(checks, tools, "tokens", ["--set", "auth.tokens={alpha-123,beta-456}"])
    if deployment:
        secret = named(docs, "Secret", f"{FULLNAME}-auth")
        checks.check(
            "auth.tokens={alpha-123,beta-456}: Secret tokens = alpha-123,beta-456",
            secret is not None and base64.b64decode(secret["data"]["tokens"]).decode() == "alpha-123,beta-456",
        )

    deployment, docs = deployment_of(checks, tools, "no topology spread", ["--set", "topologySpread.enabled=false"])
    if deployment:
        checks.check(
            "topologySpread.enabled=false: no topologySpreadConstraints",
            "topologySpreadConstraints" not in deployment["spec"]["template"]["spec"],
        )

    docs = render(checks, tools, "tests disabled", ["--set", "tests.enabled=false"])
    if docs is not None:
        checks.check("tests.enabled=false: no helm test Pod", not objects(docs, "Pod"))


DATABASE_DIR = "/var/run/secrets/keel/database"
DATABASE_URL_FILE = f"{DATABASE_DIR}/url"


def check_database(checks: Checks, tools: Tools, app_version: str) -> None:
    """database.existingSecret, the migration hook Job and the store value."""
    label = "database"
    checks.section("helm template with database.existingSecret=db")
    docs = render(checks, tools, label, ["--set", "database.existingSecret=db"])
    if docs is not None:
        validate(checks, tools, label, docs)
        check_common(checks, label, docs, app_version)
        deployment = named(docs, "Deployment", FULLNAME)
        spec = deployment["spec"]["template"]["spec"]
        container = main_container(deployment)
        checks.check(
            f"{label}: replicas default to 2 with the postgres store",
            deployment["spec"].get("replicas") == 2,
            deployment["spec"].get("replicas"),
        )
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == DATABASE_DIR]
        mount = mounts[0] if mounts else {}
        secret_volume = volumes.get(mount.get("name", ""), {}).get("secret", {})
        checks.check(
            f"{label}: the Deployment mounts Secret db key url read-only at {DATABASE_URL_FILE}, without subPath",
            len(mounts) == 1
            and mount.get("readOnly") is True
            and "subPath" not in mount
            and secret_volume.get("secretName") == "db"
            and secret_volume.get("items") == [{"key": "url", "path": "url"}],
            (mount, secret_volume),
        )
        config = rendered_config(docs)
        configmap_text = named(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"]
        checks.check(
            f"{label}: config.yaml has database.url_file {DATABASE_URL_FILE} and never a url",
            config.get("database") == {"url_file": DATABASE_URL_FILE} and "url:" not in configmap_text.replace("url_file:", ""),
            config.get("database"),
        )
        env = env_map(container)
        checks.check(
            f"{label}: the Deployment passes no database env (the URL only as a file)",
            not any(name.startswith("KEEL__DATABASE__") for name in env),
            sorted(env),
        )
        jobs = objects(docs, "Job")
        if checks.check(f"{label}: one migration Job", len(jobs) == 1, [j["metadata"]["name"] for j in jobs]):
            job = jobs[0]
            annotations = job["metadata"].get("annotations", {})
            checks.check(
                f"{label}: Job is a pre-install,pre-upgrade hook deleted before re-creation and on success",
                annotations.get("helm.sh/hook") == "pre-install,pre-upgrade"
                and annotations.get("helm.sh/hook-delete-policy") == "before-hook-creation,hook-succeeded",
                annotations,
            )
            pod = job["spec"]["template"]["spec"]
            job_container = pod["containers"][0]
            checks.check(
                f"{label}: Job runs `keel migrate` from the same image",
                job_container.get("args") == ["migrate"] and job_container["image"] == container["image"],
                (job_container.get("args"), job_container["image"]),
            )
            checks.check(
                f"{label}: Job has backoffLimit, activeDeadlineSeconds, restartPolicy Never, no token",
                isinstance(job["spec"].get("backoffLimit"), int)
                and isinstance(job["spec"].get("activeDeadlineSeconds"), int)
                and pod.get("restartPolicy") == "Never"
                and pod.get("automountServiceAccountToken") is False,
                job["spec"],
            )
            checks.check(
                f"{label}: Job has the Deployment's restricted security contexts",
                pod.get("securityContext") == spec.get("securityContext")
                and job_container.get("securityContext") == container.get("securityContext")
                and pod["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault"
                and job_container["securityContext"].get("readOnlyRootFilesystem") is True
                and job_container["securityContext"].get("capabilities", {}).get("drop") == ["ALL"],
                (pod.get("securityContext"), job_container.get("securityContext")),
            )
            job_env = env_map(job_container)
            own_objects = {FULLNAME, f"{FULLNAME}-auth"}
            refs = json.dumps(pod)
            checks.check(
                f"{label}: Job is configured from env and Secret db alone (no ConfigMap, chart Secret or ServiceAccount)",
                job_env.get("KEEL__DATABASE__URL_FILE", {}).get("value") == DATABASE_URL_FILE
                and job_env.get("KEEL_ENV", {}).get("value") == "production"
                and job_env.get("KEEL__AUTH__DISABLED", {}).get("value") == "true"
                and "serviceAccountName" not in pod
                and not any(v.get("configMap") for v in pod.get("volumes", []))
                and [v.get("secret", {}).get("secretName") for v in pod.get("volumes", [])] == ["db"]
                and not any(f'"{name}"' in refs for name in own_objects),
                (sorted(job_env), pod.get("volumes")),
            )
            checks.check(
                f"{label}: Job pod is not selected by the Deployment or any Service",
                not selects(deployment["spec"]["selector"]["matchLabels"], job["spec"]["template"]["metadata"]["labels"])
                and not any(
                    selects(s["spec"].get("selector"), job["spec"]["template"]["metadata"]["labels"])
                    for s in objects(docs, "Service")
                ),
            )

    docs = render(
        checks,
        tools,
        "database, migrate disabled",
        ["--set", "database.existingSecret=db", "--set", "database.migrate.enabled=false"],
    )
    if docs is not None:
        checks.check("database.migrate.enabled=false: no Job", not objects(docs, "Job"))

    docs = render(
        checks,
        tools,
        "database, existingSecretKey",
        ["--set", "database.existingSecret=db", "--set", "database.existingSecretKey=dsn", "--set", "replicaCount=4"],
    )
    if docs is not None:
        deployment = named(docs, "Deployment", FULLNAME)
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "database")
        checks.check(
            "database.existingSecretKey=dsn: mounted as url; replicaCount=4 kept",
            volume["secret"]["items"] == [{"key": "dsn", "path": "url"}] and deployment["spec"]["replicas"] == 4,
            volume,
        )

    for label, args, replicas in (
        ("store=none", ["--set", "store=none"], 2),
        ("store=none, replicaCount=2", ["--set", "store=none", "--set", "replicaCount=2"], 2),
        ("memory, replicaCount=1", ["--set", "store=memory", "--set", "replicaCount=1"], 1),
    ):
        docs = render(checks, tools, label, args)
        if docs is not None:
            validate(checks, tools, label, docs)
            deployment = named(docs, "Deployment", FULLNAME)
            checks.check(
                f"{label}: replicas {replicas}, no Job",
                deployment["spec"].get("replicas") == replicas and not objects(docs, "Job"),
                deployment["spec"].get("replicas"),
            )
    docs = render(checks, tools, "store=none, autoscaling", ["--set", "store=none", "--set", "autoscaling.enabled=true"])
    if docs is not None:
        checks.check("store=none allows autoscaling: one HPA", len(objects(docs, "HorizontalPodAutoscaler")) == 1)


def check_negative(checks: Checks, tools: Tools) -> None:
    checks.section("values that must fail rendering")
    cases = [
        ("replicaCount=many (schema)", ["--set", "replicaCount=many"], "replicaCount"),
        (
            "terminationGracePeriodSeconds=10 (below 5s + 20s + 1s + 1s)",
            ["--set", "terminationGracePeriodSeconds=10"],
            "terminationGracePeriodSeconds=10 is too short",
        ),
        (
            "terminationGracePeriodSeconds=91 with drain 1m30s + timeout 250ms",
            [
                "--set",
                "terminationGracePeriodSeconds=91",
                "--set",
                "config.shutdown.drain_delay=1m30s",
                "--set",
                "config.shutdown.timeout=250ms",
            ],
            "must be at least 93",
        ),
        ("config.shutdown.timeout=soon (schema)", ["--set", "config.shutdown.timeout=soon"], "config.shutdown.timeout"),
        (
            "config.shutdown.timeout=soon without the schema (template check)",
            ["--skip-schema-validation", "--set", "config.shutdown.timeout=soon"],
            'invalid duration "soon"',
        ),
        (
            "config.http.default_timeout=5 seconds (schema)",
            ["--set", "config.http.default_timeout=5 seconds"],
            "default_timeout",
        ),
        ("config.auth.tokens in the ConfigMap (schema)", ["--set", "config.auth.tokens={leak}"], "tokens"),
        (
            "config.auth.tokens without the schema (template check)",
            ["--skip-schema-validation", "--set", "config.auth.tokens={leak}"],
            "config.auth.tokens must not be set",
        ),
        ("config.grpc.addr (owned by ports)", ["--set", "config.grpc.addr=0.0.0.0:1"], "addr"),
        ("unknown config key config.grpc.no_such_key", ["--set", "config.grpc.no_such_key=1"], "no_such_key"),
        ("unknown config section config.database", ["--set", "config.database.url=x"], "database"),
        ("config.log.format=xml", ["--set", "config.log.format=xml"], "format"),
        ("config.http.max_body_size=big", ["--set", "config.http.max_body_size=big"], "max_body_size"),
        ("unknown top-level value replicas", ["--set", "replicas=3"], "replicas"),
        ("ports.admin=70000", ["--set", "ports.admin=70000"], "ports.admin"),
        ("ports.admin equal to ports.grpc", ["--set", "ports.admin=9000"], "three different ports"),
        ("probes.type=tcp", ["--set", "probes.type=tcp"], "probes.type"),
        ("environment=staging (no config/staging.yaml)", ["--set", "environment=staging"], "environment"),
        ("environment=Production (case matters)", ["--set", "environment=Production"], "environment"),
        ("auth.tokens with a comma", ["--set-json", 'auth.tokens=["a,b"]'], "auth.tokens"),
        ("no tokens, auth.generate=false", ["--set", "auth.generate=false"], "keel needs bearer tokens"),
        (
            "podDisruptionBudget with minAvailable and maxUnavailable",
            ["--set", "store=none", "--set", "podDisruptionBudget.enabled=true", "--set", "podDisruptionBudget.minAvailable=1"],
            "exactly one of minAvailable and maxUnavailable",
        ),
        (
            "autoscaling minReplicas > maxReplicas",
            [
                "--set",
                "store=none",
                "--set",
                "autoscaling.enabled=true",
                "--set",
                "autoscaling.minReplicas=5",
                "--set",
                "autoscaling.maxReplicas=2",
            ],
            "minReplicas",
        ),
        (
            "replicaCount=2 with the memory store",
            ["--set", "replicaCount=2"],
            "replicaCount=2 with the memory store: each pod would keep its own data, which cannot be shared. Set database.existingSecret",
        ),
        (
            "autoscaling.enabled=true with the memory store",
            ["--set", "autoscaling.enabled=true"],
            "autoscaling.enabled=true with the memory store",
        ),
        (
            "autoscaling with the memory store, HPA template alone",
            ["--set", "autoscaling.enabled=true", "--show-only", "templates/hpa.yaml"],
            "with the memory store",
        ),
        ("store=postgres without a database", ["--set", "store=postgres"], "set database.existingSecret"),
        ("store=cache (schema)", ["--set", "store=cache"], "store"),
        (
            "store=memory with database.existingSecret",
            ["--set", "store=memory", "--set", "database.existingSecret=db"],
            "Unset store (or set store=postgres)",
        ),
        (
            "config.database.url_file elsewhere with database.existingSecret",
            ["--set", "database.existingSecret=db", "--set", "config.database.url_file=/etc/db/url"],
            "Unset config.database.url_file",
        ),
        (
            "config.database.url_file without database.existingSecret",
            ["--set", "config.database.url_file=/etc/db/url"],
            "set database.existingSecret",
        ),
        (
            "config.database.url without the schema (template check)",
            ["--skip-schema-validation", "--set", "config.database.url=postgres://u:p@h/d"],
            "config.database.url must not be set",
        ),
        ("database.existingSecret=Bad_Name (schema)", ["--set", "database.existingSecret=Bad_Name"], "existingSecret"),
        ("database.migrate.unknown (schema)", ["--set", "database.migrate.unknown=1"], "unknown"),
        ("image.pullPolicy=Sometimes", ["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        ("resources.requests.cpu=lots", ["--set", "resources.requests.cpu=lots"], "cpu"),
        ("service.type=ExternalName", ["--set", "service.type=ExternalName"], "service.type"),
        (
            "terminationGracePeriodMarginSeconds=0",
            ["--set", "terminationGracePeriodMarginSeconds=0"],
            "terminationGracePeriodMarginSeconds",
        ),
        (
            "networkPolicy on with a ServiceMonitor and no metricsFrom",
            ["--set", "networkPolicy.enabled=true", "--set", "serviceMonitor.enabled=true"],
            "networkPolicy.enabled=true with scraping on (serviceMonitor.enabled=true) but networkPolicy.metricsFrom is empty"
            ": the policy would block Prometheus from the admin port (8081, /metrics). Set networkPolicy.metricsFrom",
        ),
        (
            "networkPolicy on with the scrape annotations and no metricsFrom",
            ["--set", "networkPolicy.enabled=true"],
            "or turn scraping off (serviceMonitor.enabled=false and scrapeAnnotations=false)",
        ),
        (
            "podDisruptionBudget.enabled=true with replicaCount=1",
            ["--set", "podDisruptionBudget.enabled=true", "--set", "store=none", "--set", "replicaCount=1"],
            "podDisruptionBudget.enabled=true with replicaCount=1: with a single pod the budget either blocks every node drain"
            " or protects nothing. Set replicaCount to 2 or more",
        ),
        (
            "podDisruptionBudget.enabled=true with the memory store (1 pod)",
            ["--set", "podDisruptionBudget.enabled=true"],
            "podDisruptionBudget.enabled=true with replicaCount=1",
        ),
        (
            "podDisruptionBudget.enabled=true with autoscaling.minReplicas=1",
            [
                "--set",
                "podDisruptionBudget.enabled=true",
                "--set",
                "store=none",
                "--set",
                "autoscaling.enabled=true",
                "--set",
                "autoscaling.minReplicas=1",
            ],
            "Set autoscaling.minReplicas to 2 or more",
        ),
        (
            "commonLabels overriding a selector label",
            ["--set", "commonLabels.app\\.kubernetes\\.io/name=other"],
            "commonLabels.app.kubernetes.io/name: the chart sets this label itself",
        ),
        ("commonLabels with a non-string value (schema)", ["--set", "commonLabels.team=1"], "commonLabels"),
        ("config.auth.tokens_file (schema)", ["--set", "config.auth.tokens_file=/x"], "tokens_file"),
        (
            "config.auth.tokens_file without the schema (template check)",
            ["--skip-schema-validation", "--set", "config.auth.tokens_file=/x"],
            "config.auth.tokens_file must not be set",
        ),
        ("config.runtime.worker_threads=5000 (schema)", ["--set", "config.runtime.worker_threads=5000"], "worker_threads"),
        ("httpRoute without parentRefs", ["--set", "httpRoute.enabled=true"], "httpRoute.enabled=true needs httpRoute.parentRefs"),
        ("grpcRoute without parentRefs", ["--set", "grpcRoute.enabled=true"], "grpcRoute.enabled=true needs grpcRoute.parentRefs"),
        ("ingress without hosts", ["--set", "ingress.enabled=true"], "ingress.enabled=true needs at least one entry in ingress.hosts"),
        ("sidecars entry without a name (schema)", ["--set-json", 'sidecars=[{"image":"x"}]'], "sidecars"),
    ]
    for name, args, expected in cases:
        result = helm_template(tools, args)
        checks.check(
            f"fails: {name}",
            result.returncode != 0 and expected in result.stderr,
            f"exit {result.returncode}; stderr: {short(result.stderr, 300)}",
        )
    result = helm_template(tools, ["--set", "replicaCount=many"])
    print("  (schema message for replicaCount=many: " + " ".join(result.stderr.split())[:200] + ")")


def check_lint(checks: Checks, tools: Tools) -> None:
    checks.section("helm lint --strict")
    variants = [
        ("default values", []),
        ("all-on.yaml", ["-f", str(ALL_ON)]),
        (
            "all-on.yaml + grpc probes + existing Secret",
            ["-f", str(ALL_ON), "--set", "probes.type=grpc", "--set", "auth.existingSecret=keel-tokens"],
        ),
    ]
    for name, args in variants:
        result = run([tools.helm, "lint", "--strict", str(CHART), *args])
        checks.check(f"helm lint --strict ({name})", result.returncode == 0, short(result.stdout + result.stderr))


def check_schema_matches_app(checks: Checks) -> None:
    """The chart's config schema and keel's config/default.yaml must agree."""
    checks.section("values.schema.json against keel's config keys")
    schema = json.loads((CHART / "values.schema.json").read_text())
    checks.check(
        "values.schema.json declares JSON Schema draft-07",
        schema.get("$schema") == "http://json-schema.org/draft-07/schema#",
    )

    def schema_leaves(node: dict, prefix: str = "") -> set[str]:
        props = node.get("properties") or {}
        if node.get("type") == "object" and props:
            leaves: set[str] = set()
            for key, sub in props.items():
                leaves |= schema_leaves(sub, f"{prefix}{key}.")
            return leaves
        if node.get("type") == "object":
            # A map (clients, auth.jwt.required_scopes): its keys are data,
            # so the map itself is the settable key.
            return {prefix.rstrip(".")} if isinstance(node.get("additionalProperties"), dict) else set()
        return {prefix.rstrip(".")}

    def strict(node: dict, path: str = "config") -> list[str]:
        if node.get("type") != "object":
            return []
        extra = node.get("additionalProperties")
        # A map's entries are checked by the schema of its values.
        loose = [] if extra is False or isinstance(extra, dict) else [path]
        for key, sub in (node.get("properties") or {}).items():
            loose += strict(sub, f"{path}.{key}")
        if isinstance(extra, dict):
            loose += strict(extra, f"{path}.*")
        return loose

    config_schema = schema["properties"]["config"]
    allowed = schema_leaves(config_schema)
    defaults = leaf_keys(yaml.safe_load((ROOT / "config" / "default.yaml").read_text()))
    # database.url is a secret: the chart takes it only as a mounted file.
    # TLS files come from the chart's tls values (a mounted Secret); the
    # chart keeps admin plaintext, for the kubelet's probes and scrapers.
    tls_owned = {f"{server}.tls.{f}" for server in ("grpc", "http", "admin") for f in ("cert_file", "key_file", "client_ca_file")}
    chart_owned = {"grpc.addr", "http.addr", "admin.addr", "auth.tokens", "auth.tokens_file", "database.url"} | tls_owned
    checks.check(
        "every config key the schema allows exists in config/default.yaml",
        allowed <= defaults,
        sorted(allowed - defaults),
    )
    checks.check(
        "every key of config/default.yaml is settable (except the addresses and tokens the chart owns)",
        defaults - chart_owned <= allowed,
        sorted(defaults - chart_owned - allowed),
    )
    checks.check(
        "the config schema refuses unknown keys at every level", not strict(config_schema), strict(config_schema)
    )
    checks.check(
        "the config schema does not allow auth.tokens",
        "tokens" not in config_schema["properties"]["auth"].get("properties", {}),
    )


def check_environment(checks: Checks, tools: Tools) -> None:
    """`environment` (KEEL_ENV) accepts exactly the overlays in config/."""
    checks.section("environment against the overlays in config/")
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["environment"].get("enum") or [])
    overlays = {p.stem for p in (ROOT / "config").glob("*.yaml")} - {"default"}
    checks.check(
        "the schema's environment enum is the overlays in config/ plus \"\" (none)",
        allowed == overlays | {""},
        f"enum {sorted(allowed)}, config/ overlays {sorted(overlays)}",
    )
    for value in sorted(allowed):
        result = helm_template(tools, ["--set-string", f"environment={value}"])
        checks.check(f"renders with environment={value!r}", result.returncode == 0, short(result.stderr, 300))


def check_notes(checks: Checks, tools: Tools) -> None:
    """helm template drops NOTES.txt; render it through a copy of the chart."""
    checks.section("NOTES.txt")
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "keel"
        shutil.copytree(CHART, chart)
        notes = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "_notes_check.tpl").write_text(
            '{{- define "notes-check" -}}\n' + notes + "\n{{- end -}}\n"
        )
        (chart / "templates" / "notes-check.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
            '  notes: {{ include "notes-check" . | quote }}\n'
        )
        for label, args, expected in (
            (
                "default",
                [],
                [
                    "port-forward svc/demo-keel 9000 8080",
                    "helm test demo",
                    "A token was generated",
                    "WARNING: a generated token is in use",
                    "auth.existingSecret",
                    "/var/run/secrets/keel/auth/tokens",
                    "terminationGracePeriodSeconds is 31",
                ],
            ),
            (
                "all-on",
                ["-f", str(ALL_ON)],
                [
                    "dns:///demo-keel-headless.apps.svc:9000",
                    "ServiceMonitor demo-keel",
                    "Secret demo-keel-auth",
                    "PodDisruptionBudget: demo-keel",
                    "Ingress: demo-keel",
                    "HTTPRoute: demo-keel-http",
                    "GRPCRoute: demo-keel-grpc",
                ],
            ),
            ("auth disabled", ["--set", "config.auth.disabled=true"], ["WARNING: authentication is disabled"]),
            ("default store", [], ["Store: in memory", "Replicas: 1."]),
            (
                "database",
                ["--set", "database.existingSecret=db"],
                ["Store: PostgreSQL, URL from Secret db", "Job demo-keel-migrate", "Replicas: 2."],
            ),
            ("store none", ["--set", "store=none"], ["Store: none", "Replicas: 2.", "PodDisruptionBudget: demo-keel"]),
            ("no scraping", ["--set", "scrapeAnnotations=false"], ["Metrics: not scraped by the chart"]),
        ):
            result = helm_template(tools, ["--show-only", "templates/notes-check.yaml", *args], chart=chart)
            text = ""
            if result.returncode == 0:
                text = yaml.safe_load(result.stdout)["data"]["notes"]
            missing = [e for e in expected if e not in text]
            checks.check(
                f"NOTES.txt renders ({label}) and mentions {', '.join(expected)}",
                result.returncode == 0 and not missing,
                short(result.stderr) or missing,
            )
        for label, args in (
            ("tokens from values", ["--set", "auth.tokens={a-1}"]),
            ("existing Secret", ["--set", "auth.existingSecret=keel-tokens"]),
        ):
            result = helm_template(tools, ["--show-only", "templates/notes-check.yaml", *args], chart=chart)
            text = yaml.safe_load(result.stdout)["data"]["notes"] if result.returncode == 0 else ""
            checks.check(
                f"NOTES.txt ({label}): no generated-token warning",
                result.returncode == 0 and "generated token" not in text and "Authentication:" in text,
                short(result.stderr) or text[-400:],
            )


def check_dockerfile(checks: Checks, tools: Tools) -> None:
    checks.section("Dockerfile and .dockerignore")
    dockerfile = ROOT / "Dockerfile"
    if not checks.check("Dockerfile exists", dockerfile.is_file()):
        return
    result = run([tools.hadolint, "--failure-threshold", "warning", str(dockerfile)])
    checks.check(
        "hadolint --failure-threshold warning Dockerfile", result.returncode == 0, short(result.stdout + result.stderr)
    )
    if result.stdout.strip():
        print("  (hadolint notes below the threshold: " + " | ".join(result.stdout.strip().splitlines()) + ")")

    text = dockerfile.read_text()
    lines = [line.strip() for line in text.splitlines()]
    # Global ARGs (before the first FROM) give the base image references.
    first_from = next(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    global_args = dict(
        line[4:].split("=", 1) for line in lines[:first_from] if line.upper().startswith("ARG ") and "=" in line
    )

    def expand(word: str) -> str:
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: global_args.get(m.group(1), m.group(0)), word)

    raw_froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ") and not line.split()[1].startswith("--")]
    froms = [expand(image) for image in raw_froms]
    stage_names = {
        line.split()[3].lower() for line in lines if line.upper().startswith("FROM ") and len(line.split()) >= 4
    }
    external = [image for image in froms if image.lower() not in stage_names]
    checks.check(
        "every base image is pinned (tag or digest, never latest)",
        bool(external)
        and all(
            (":" in image.rsplit("/", 1)[-1] or "@sha256:" in image) and not image.endswith(":latest")
            for image in external
        ),
        external,
    )
    checks.check("multi-stage build", len(froms) >= 3, froms)
    external_raw = [image for image in raw_froms if image.lower() not in stage_names]
    checks.check(
        "every base image comes from a build arg (so a digest can be passed and Renovate can pin it)",
        bool(external_raw) and all(re.fullmatch(r"\$\{[A-Z_]+_IMAGE\}", image) for image in external_raw),
        external_raw,
    )
    renovate_path = ROOT / "renovate.json"
    if checks.check("renovate.json exists", renovate_path.is_file()):
        renovate = json.loads(renovate_path.read_text())
        managed = set()
        for manager in renovate.get("customManagers", []):
            for pattern in manager.get("matchStrings", []):
                python_pattern = pattern.replace("(?<", "(?P<")
                for match in re.finditer(python_pattern, text):
                    managed.add((match.group("depName"), match.group("currentValue")))
        wanted = {tuple(global_args[image[2:-1]].split("@")[0].rsplit(":", 1)) for image in external_raw}
        checks.check(
            "renovate.json: a custom manager reads every base image arg, with digest pinning on",
            managed == wanted
            and any(rule.get("pinDigests") for rule in renovate.get("packageRules", [])),
            (sorted(managed), sorted(wanted)),
        )
    runtime_stage = text[text.rindex("\nFROM ") :]
    checks.check(
        "the runtime image sets ENV KEEL_ENV=production (auth required wherever the image runs)",
        re.search(r"^ENV KEEL_ENV=production$", runtime_stage, re.MULTILINE) is not None,
    )
    oci = set(re.findall(r"org\.opencontainers\.image\.([a-z.]+)=", runtime_stage))
    needed_oci = {
        "title", "description", "licenses", "source", "revision", "version", "created", "url", "documentation",
        "vendor", "authors", "ref.name", "base.name",
    }
    checks.check("the runtime stage carries the full set of OCI labels", needed_oci <= oci, sorted(needed_oci - oci))
    checks.check(
        "revision, version and created come from build args; the commit reaches keel_build_info (KEEL_GIT_COMMIT)",
        'org.opencontainers.image.revision="${KEEL_GIT_COMMIT}"' in runtime_stage
        and 'org.opencontainers.image.version="${KEEL_VERSION}"' in runtime_stage
        and 'org.opencontainers.image.created="${BUILD_DATE}"' in runtime_stage
        and re.search(r"ARG KEEL_GIT_COMMIT", text[: text.rindex("\nFROM ")]) is not None
        and 'option_env!("KEEL_GIT_COMMIT")' in (ROOT / "src" / "metrics" / "mod.rs").read_text()
        and "rerun-if-env-changed=KEEL_GIT_COMMIT" in (ROOT / "build.rs").read_text(),
    )
    checks.check(
        "the musl target follows TARGETARCH (amd64 and arm64), never hard-coded in the cargo steps",
        "ARG TARGETARCH" in text
        and "amd64) echo x86_64-unknown-linux-musl" in text
        and "arm64) echo aarch64-unknown-linux-musl" in text
        and not re.search(r"cargo (build|chef cook)[^\n]*--target x86_64", text),
    )
    checks.check(
        "musl-tools installed without an exact Debian version pin",
        re.search(r"musl-tools(?!=)", text) is not None and "musl-tools=" not in text,
    )
    checks.check(
        "dependencies cached separately (cargo-chef or a BuildKit cache mount)",
        ("cargo chef cook" in text and "cargo chef prepare" in text) or "--mount=type=cache" in text,
    )
    checks.check("cargo build --release --locked", re.search(r"cargo build --release --locked", text) is not None)
    checks.check(
        "the build gets build.rs and proto/",
        re.search(r"COPY .*build\.rs", text) is not None and re.search(r"COPY .*proto", text) is not None,
    )
    runtime = froms[-1]
    checks.check(
        "runtime image is distroless and non-root",
        runtime.startswith("gcr.io/distroless/") and runtime.endswith(":nonroot"),
        runtime,
    )
    checks.check(
        "USER is non-root (65532 / nonroot)",
        any(re.fullmatch(r"USER (65532(:65532)?|nonroot(:nonroot)?)", line) for line in lines),
    )
    checks.check(
        "WORKDIR /app and ENV KEEL_CONFIG_DIR=/app/config",
        "WORKDIR /app" in lines and any(re.fullmatch(r"ENV KEEL_CONFIG_DIR=/app/config", line) for line in lines),
    )
    checks.check("EXPOSE 9000 8080 8081", "EXPOSE 9000 8080 8081" in lines)
    checks.check(
        "HEALTHCHECK runs the binary in exec form",
        'HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/app/keel", "healthcheck"]'
        in text,
    )
    checks.check(
        'ENTRYPOINT ["/app/keel"] and CMD ["serve"]', 'ENTRYPOINT ["/app/keel"]' in lines and 'CMD ["serve"]' in lines
    )
    checks.check("config/ is copied into the image", re.search(r"COPY .*config/? +/app/config", text) is not None)
    checks.check(
        "size estimate with the measured binary size",
        re.search(r"^# binary: [0-9.]+ ?MB", text, re.MULTILINE) is not None,
    )

    ignore = ROOT / ".dockerignore"
    if checks.check(".dockerignore exists", ignore.is_file()):
        entries = {
            line.strip().rstrip("/").lstrip("/")
            for line in ignore.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        }
        checks.check(".dockerignore excludes target/ and .git/", {"target", ".git"} <= entries, sorted(entries))
        needed = {"src", "proto", "config", "build.rs", "Cargo.toml", "Cargo.lock", "benches"}
        checks.check(".dockerignore keeps what the build needs", not (needed & entries), sorted(needed & entries))


def check_checkov(checks: Checks, tools: Tools) -> None:
    """checkov on the chart (helm), the rendered default and all-on
    manifests (kubernetes) and the Dockerfile: only accepted findings."""
    checks.section("checkov (policy checks)")
    if not tools.checkov:
        print("  (skipped: no --checkov given)")
        return
    readme = (ROOT / "README.md").read_text()
    undocumented = [check for check in CHECKOV_ACCEPTED if check not in readme]
    checks.check("every accepted checkov finding is listed in the README", not undocumented, undocumented)
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / "rendered"
        rendered.mkdir()
        for name, args in (("default", []), ("all-on", ["-f", str(ALL_ON)])):
            result = helm_template(tools, args)
            (rendered / f"{name}.yaml").write_text(result.stdout)
        helm_dir = str(Path(tools.helm).parent)
        env_path = f"{helm_dir}:{os.environ.get('PATH', '')}"
        for label, target in (
            ("helm chart", ["-d", str(CHART), "--framework", "helm"]),
            ("rendered default and all-on", ["-d", str(rendered), "--framework", "kubernetes"]),
            ("Dockerfile", ["-f", str(ROOT / "Dockerfile"), "--framework", "dockerfile"]),
        ):
            result = subprocess.run(
                [tools.checkov, *target, "--skip-download", "--quiet", "-o", "json"],
                check=False,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, "PATH": env_path},
            )
            try:
                report = json.loads(result.stdout)
            except json.JSONDecodeError:
                checks.check(f"checkov ({label}) ran", False, short(result.stdout + result.stderr))
                continue
            reports = report if isinstance(report, list) else [report]
            failed = [f for r in reports for f in r.get("results", {}).get("failed_checks", [])]
            passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
            unexpected = sorted({f"{f['check_id']} {f['resource']}" for f in failed if f["check_id"] not in CHECKOV_ACCEPTED})
            checks.check(
                f"checkov ({label}): {passed} passed, {len(failed)} failed, all of them accepted",
                passed > 0 and not unexpected,
                unexpected,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--helm", default="helm")
    parser.add_argument("--kubernetes-validate", default="kubernetes-validate")
    parser.add_argument("--hadolint", default="hadolint")
    parser.add_argument("--checkov", default=None, help="checkov binary; the checkov checks are skipped without it")
    args = parser.parse_args()
    tools = Tools(args.helm, args.kubernetes_validate, args.hadolint, args.checkov)
    checks = Checks()
    app_version = str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])

    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    checks.section("Chart.yaml")
    checks.check(
        "Chart.yaml apiVersion v2, type application",
        chart_meta.get("apiVersion") == "v2" and chart_meta.get("type") == "application",
    )

    def guarded(name: str, function, *args):
        """A crash in one group of checks counts as a failure; the rest run."""
        try:
            return function(*args)
        except Exception as error:  # noqa: BLE001 - reported, never hidden
            checks.check(f"{name} ran to completion", False, f"{type(error).__name__}: {error}")
            return None

    KUBE_VERSIONS[:] = sorted({kube_floor(), "1.33.0", NEWEST_KUBE_VERSION}, key=lambda v: tuple(map(int, v.split("."))))
    print(f"validating at Kubernetes {', '.join(KUBE_VERSIONS)} (the chart's floor, 1.33, the newest shipped)")
    guarded("helm lint", check_lint, checks, tools)
    guarded("Kubernetes version floor", check_floor, checks, tools)
    guarded("schema against config keys", check_schema_matches_app, checks)
    guarded("environment against config overlays", check_environment, checks, tools)
    default_annotations = guarded("default render", check_default, checks, tools, app_version)
    guarded("all-on render", check_all_on, checks, tools, app_version)
    guarded("grpc-probes render", check_grpc_probes, checks, tools, app_version)
    guarded("tls render", check_tls, checks, tools, app_version)
    guarded("value variations", check_variations, checks, tools, default_annotations)
    guarded("database render", check_database, checks, tools, app_version)
    guarded("commonLabels and namespace", check_common_labels, checks, tools)
    guarded("PDB, NetworkPolicy, command/args", check_pdb_and_policies, checks, tools)
    guarded("negative cases", check_negative, checks, tools)
    guarded("NOTES.txt", check_notes, checks, tools)
    guarded("Dockerfile", check_dockerfile, checks, tools)
    guarded("checkov", check_checkov, checks, tools)

    if checks.failed:
        print("\nFailed checks:")
        for name in checks.failed:
            print(f"  - {name}")
    print(f"\nchart: {checks.passed} passed, {len(checks.failed)} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
