#!/usr/bin/env bash
# A longer soak of the start → load → SIGTERM cycle test (CI runs 4 cycles):
#   scripts/soak-shutdown.sh [cycles]   (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
KEEL_SHUTDOWN_CYCLES="${1:-200}" cargo test --locked --test shutdown repeated_start_load_stop_cycles_lose_nothing -- --nocapture
