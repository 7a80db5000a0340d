#!/usr/bin/env bash
# The chart's operations kit: the Grafana dashboard ConfigMap
# (dashboards.enabled) and the PrometheusRule (alerts.enabled) render and
# hold together, `promtool check rules` is clean on the rendered groups, and
# `promtool test rules` (scripts/chart/alerts_test.yaml) passes. Called by
# scripts/chart/test.sh; runs alone too:
#
#   scripts/chart/test_observability.sh
#
# Uses helm and the chart venv (PyYAML) the way test.sh installs them, and
# Debian's prometheus package for promtool when it is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
TOOLS_DIR="${CHART_TOOLS_DIR:-$ROOT/target/chart-tools}"
VENV="${CHART_VENV:-$ROOT/target/chart-venv}"

# shellcheck source=scripts/chart/tools.sh
source "$ROOT/scripts/chart/tools.sh"
install_helm
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import yaml' 2>/dev/null; then
    mkdir -p "$ROOT/target"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || { rm -rf "$VENV"; apt_install python3-venv; python3 -m venv "$VENV"; }
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check PyYAML==6.0.3
fi
command -v promtool >/dev/null 2>&1 || apt_install prometheus
log "promtool $(promtool --version 2>&1 | head -n1 | awk '{print $3}')"

validate=()
# test.sh installs kubernetes-validate into the venv; alone, it is optional.
[ -x "$VENV/bin/kubernetes-validate" ] && validate=(--kubernetes-validate "$VENV/bin/kubernetes-validate")
exec "$VENV/bin/python" "$ROOT/scripts/chart/assert_observability.py" --helm "$HELM" --promtool "$(command -v promtool)" \
    "${validate[@]}"
