#!/usr/bin/env bash
# End-to-end acceptance with clients keel did not write (Python grpcio with
# reflection, grpcurl). Installs what it needs into a venv, so it runs on a
# fresh Debian machine. Usage: scripts/e2e/run.sh [path/to/keel]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
binary="$(realpath "${1:-$root/target/debug/keel}")"
venv="${KEEL_E2E_VENV:-$root/target/e2e-venv}"

# The pinned venv (shared with the shutdown soak).
source "$here/venv.sh"

export GRPCURL="$venv/bin/grpcurl"
cd "$root"
# The checks write scratch files there (with CARGO_TARGET_DIR elsewhere it may not exist).
mkdir -p target
for check in "$here"/*_acceptance.py; do
  echo "== $(basename "$check")"
  "$venv/bin/python" "$check" "$binary"
done
