#!/usr/bin/env bash
# The shutdown soak: CYCLES (default 20) of start → mixed load (gRPC unary,
# REST, WatchUsers over gRPC, the gateway's /v1/users:watch) → SIGTERM
# against the binary, asserting on every cycle (scripts/soak/shutdown_soak.py).
#   scripts/soak-shutdown.sh [path/to/keel] [cycles]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
binary="$(realpath "${1:-$root/target/debug/keel}")"
cycles="${2:-20}"
venv="${KEEL_E2E_VENV:-$root/target/e2e-venv}"
source "$here/e2e/venv.sh"
cd "$root"
"$venv/bin/python" "$here/soak/shutdown_soak.py" "$binary" "$cycles"
