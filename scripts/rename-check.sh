#!/usr/bin/env bash
# CI check of scripts/rename: renames a clean copy of this checkout's HEAD
# and proves that the result builds, passes its tests, has a valid chart,
# runs under its new name, and mentions the old name nowhere.
#
#   scripts/rename-check.sh [NEW_NAME]      (default: orders)
#
# Steps, each timed:
#   1. copy: `git fetch` of HEAD into a fresh repository under $TMPDIR, so
#      the copy is clean (uncommitted changes here are not part of it);
#   2. `scripts/rename NEW_NAME` in the copy;
#   3. the README's test command (`cargo test --locked`) in the copy with
#      CARGO_TARGET_DIR at this tree's target/ (or $CARGO_TARGET_DIR), so
#      every dependency comes from there: any `Compiling` line other than
#      the renamed crate fails the check;
#   4. target/debug/NEW_NAME exists and reads NEW_NAME__* and NEW_NAME_ENV
#      (`config` exits 78 naming a bad NEW_NAME__GRPC__ADDR; production
#      refuses to start without tokens and prints its JSON with them), and a
#      server started on port 0 serves NEW_NAME_build_info on /metrics and
#      answers its own `healthcheck`; then the renamed scripts/e2e/run.sh
#      against it (reusing target/e2e-venv);
#   5. `helm lint --strict helm/NEW_NAME` (helm from scripts/chart/tools.sh,
#      reused from target/chart-tools), then scripts/chart/test.sh in the
#      copy, reusing this tree's helm and chart venv;
#   6. `grep -ri OLD_NAME` over the copy (not .git) and a search for paths
#      containing it find nothing outside ALLOWED below.
# The old name is read from Cargo.toml, so this script holds none (the
# rename leaves it alone) and keeps working after a rename.
# RENAME_CHECK_KEEP=1 keeps the copy for inspection.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

old="$(perl -ne 'if (/^\[package\]/) { $p = 1; next } if (/^\[/) { $p = 0 } if ($p && /^name\s*=\s*"([^"]+)"/) { print $1; exit }' Cargo.toml)"
new="${1:-orders}"
[ "$new" != "$old" ] || new=billing
NEW="${new^^}"

# Paths (prefixes, relative to the tree) that may still mention the old
# name: the vendored schemas, which the rename leaves alone by design.
ALLOWED=(proto/google/)

target_dir="$(realpath -m "${CARGO_TARGET_DIR:-$ROOT/target}")"
export CARGO_TERM_COLOR=never

started=$SECONDS
step_started=$SECONDS
timings=()
step() {
    local now=$SECONDS
    if [ -n "${step_name:-}" ]; then
        timings+=("$(printf '%4ss  %s' "$((now - step_started))" "$step_name")")
    fi
    step_name="$1"
    step_started=$now
    printf '\n==> rename-check: %s\n' "$1"
}
fail() {
    printf 'rename-check: FAIL: %s\n' "$*" >&2
    exit 1
}

work="$(mktemp -d "${TMPDIR:-/tmp}/rename-check.XXXXXX")"
copy="$work/copy"
server_pid=""
cleanup() {
    local status=$?
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    if [ "${RENAME_CHECK_KEEP:-}" = 1 ] || [ "$status" -ne 0 ]; then
        echo "rename-check: the copy is kept in $copy" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# --- 1. copy ------------------------------------------------------------------
step "copy HEAD ($(git rev-parse --short HEAD)) to $copy"
if [ -n "$(git status --porcelain)" ]; then
    echo "rename-check: note: uncommitted changes here are not in the copy (it is HEAD)" >&2
fi
git init -q "$copy"
git -C "$copy" fetch -q "$ROOT" HEAD
git -C "$copy" checkout -q --detach FETCH_HEAD
cd "$copy"

# --- 2. rename ----------------------------------------------------------------
step "scripts/rename $new ($old -> $new)"
scripts/rename "$new"

# --- 3. the README's test command -------------------------------------------------
test_command="$(sed -n 's/^| test | `\(cargo test[^`]*\)` |$/\1/p' README.md)"
[ -n "$test_command" ] || fail "README.md has no '| test | \`cargo test ...\` |' row"
step "$test_command (CARGO_TARGET_DIR=$target_dir)"
read -r -a test_argv <<<"$test_command"
# The PostgreSQL tests read the URL under the new prefix; pass it on, so
# they run here too (under CI=true a missing URL fails them, never skips).
OLD="${old^^}"
old_url_var="${OLD}_TEST_DATABASE_URL"
env "${NEW}_TEST_DATABASE_URL=${!old_url_var:-}" CARGO_TARGET_DIR="$target_dir" "${test_argv[@]}" 2>&1 | tee "$work/test.log"
compiled="$(sed -n 's/^ *Compiling \([^ ]*\) .*/\1/p' "$work/test.log" | sort -u)"
others="$(grep -v -x -F "$new" <<<"$compiled" || true)"
echo "rename-check: compiled: $(tr '\n' ' ' <<<"$compiled")"
if [ -n "$others" ]; then
    fail "dependencies were compiled again (they should come from $target_dir): $(tr '\n' ' ' <<<"$others")"
fi

# --- 4. the renamed binary ------------------------------------------------------
step "target/debug/$new under its new name"
binary="$target_dir/debug/$new"
[ -x "$binary" ] || fail "$binary was not built"
# Only the variables set here: nothing of the caller's environment leaks in.
run_bin() { env -i PATH="$PATH" HOME="${HOME:-/tmp}" "$@"; }

set +e
out="$(run_bin "${NEW}__GRPC__ADDR=bad" "$binary" config 2>&1)"
code=$?
set -e
[ "$code" -eq 78 ] || fail "${NEW}__GRPC__ADDR=bad $new config: exit $code, expected 78: $out"
grep -q "${NEW}__GRPC__ADDR" <<<"$out" || fail "the error does not name ${NEW}__GRPC__ADDR: $out"
echo "ok   ${NEW}__GRPC__ADDR=bad $new config exits 78 naming ${NEW}__GRPC__ADDR"

set +e
out="$(run_bin "${NEW}_ENV=production" "$binary" config 2>&1)"
code=$?
set -e
[ "$code" -eq 78 ] || fail "${NEW}_ENV=production without tokens: exit $code, expected 78: $out"
grep -q "${NEW}_ENV" <<<"$out" || fail "the production error does not name ${NEW}_ENV: $out"
echo "ok   ${NEW}_ENV=production without tokens exits 78 naming ${NEW}_ENV"

out="$(run_bin "${NEW}_ENV=production" "${NEW}__AUTH__TOKENS=sekrit-token" "$binary" config 2>"$work/config.err")" \
    || fail "${NEW}_ENV=production ${NEW}__AUTH__TOKENS=... $new config failed: $out $(cat "$work/config.err")"
[[ "$out" == "{"*"}" ]] || fail "$new config did not print a JSON object: $out"
grep -q '"grpc"' <<<"$out" || fail "$new config printed no grpc section: $out"
if grep -q sekrit-token <<<"$out"; then fail "$new config printed the token"; fi
echo "ok   ${NEW}_ENV=production ${NEW}__AUTH__TOKENS=... $new config prints JSON (token redacted)"

# A server on ephemeral ports; its addresses come from the startup log line,
# waited for (no fixed sleep) for up to 30 s.
log="$work/serve.log"
# env directly, not run_bin: `$!` must be the server itself, not a subshell.
env -i PATH="$PATH" HOME="${HOME:-/tmp}" "${NEW}__GRPC__ADDR=127.0.0.1:0" "${NEW}__HTTP__ADDR=127.0.0.1:0" "${NEW}__ADMIN__ADDR=127.0.0.1:0" \
    "${NEW}__LOG__FORMAT=json" "${NEW}__SHUTDOWN__DRAIN_DELAY=0s" "$binary" serve >"$log" 2>&1 &
server_pid=$!
deadline=$((SECONDS + 30))
admin="" grpc=""
while [ "$SECONDS" -lt "$deadline" ]; do
    admin="$(sed -n 's/.*"admin\.addr":"\([^"]*\)".*/\1/p' "$log" | head -n1)"
    grpc="$(sed -n 's/.*"grpc\.addr":"\([^"]*\)".*/\1/p' "$log" | head -n1)"
    [ -n "$admin" ] && [ -n "$grpc" ] && break
    kill -0 "$server_pid" 2>/dev/null || fail "$new serve exited: $(cat "$log")"
    sleep 0.1
done
[ -n "$admin" ] || fail "$new serve logged no admin.addr within 30 s: $(cat "$log")"
echo "ok   $new serve is up (grpc $grpc, admin $admin)"

# GET /metrics with bash's /dev/tcp: no curl needed.
metrics="$(
    exec 3<>"/dev/tcp/${admin%:*}/${admin##*:}"
    printf 'GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n' "$admin" >&3
    timeout 10 cat <&3
)"
grep -q "^${new}_build_info{" <<<"$metrics" || fail "/metrics has no ${new}_build_info: $(head -c 2000 <<<"$metrics")"
for family in "${new}_grpc_live_streams" "${new}_shutdown_budget_seconds"; do
    grep -q "^$family" <<<"$metrics" || fail "/metrics has no $family"
done
if grep -q -i "^${old}_" <<<"$metrics"; then fail "/metrics still has ${old}_* families"; fi
echo "ok   /metrics exports ${new}_build_info, ${new}_grpc_live_streams, ${new}_shutdown_budget_seconds"

run_bin "$binary" healthcheck --addr "$grpc" || fail "$new healthcheck --addr $grpc failed"
echo "ok   $new healthcheck --addr $grpc"

kill -TERM "$server_pid"
# A watchdog, so that a server hung in shutdown fails the check, not CI.
( sleep 30; kill -KILL "$server_pid" 2>/dev/null ) &
watchdog=$!
set +e
wait "$server_pid"
code=$?
set -e
kill "$watchdog" 2>/dev/null || true
server_pid=""
[ "$code" -eq 0 ] || fail "$new serve exited $code after SIGTERM: $(tail -n 20 "$log")"
grep -q "\"message\":\"$new serving\"" "$log" || echo "note: no \"$new serving\" log line" >&2
echo "ok   $new serve exits 0 on SIGTERM"

step "scripts/e2e/run.sh target/debug/$new in the copy"
# The renamed e2e (its NAMEproc.py, env names, log line, metric names and
# README examples) against the renamed binary, reusing this tree's venv.
env "${NEW}_E2E_VENV=$ROOT/target/e2e-venv" scripts/e2e/run.sh "$binary"

# --- 5. the chart ------------------------------------------------------------------
step "helm lint --strict helm/$new"
TOOLS_DIR="$ROOT/target/chart-tools"
# shellcheck source=scripts/chart/tools.sh
source "$ROOT/scripts/chart/tools.sh"
install_helm
"$HELM" lint --strict "helm/$new"

step "scripts/chart/test.sh in the copy"
CHART_TOOLS_DIR="$ROOT/target/chart-tools" CHART_VENV="$ROOT/target/chart-venv" CHECKOV_VENV="$ROOT/target/checkov-venv" \
    bash scripts/chart/test.sh

# --- 6. no trace of the old name ------------------------------------------------------
step "grep -ri $old over the copy"
allowed() {
    local path="${1#./}" prefix
    for prefix in "${ALLOWED[@]}"; do
        [[ "$path" == "$prefix"* ]] && return 0
    done
    return 1
}
found=()
while IFS= read -r -d '' file; do
    allowed "$file" || found+=("$file")
done < <(grep -r -i -l -Z --exclude-dir=.git --exclude-dir=target -e "$old" . || true)
paths=()
while IFS= read -r -d '' path; do
    allowed "$path" || paths+=("$path")
done < <(find . \( -name .git -o -name target \) -prune -o -iname "*$old*" -print0)
for prefix in "${ALLOWED[@]}"; do
    grep -r -i -q -e "$old" "$prefix" 2>/dev/null && echo "allowed: $prefix mentions $old (vendored, left alone by the rename)"
done
if [ "${#found[@]}" -gt 0 ] || [ "${#paths[@]}" -gt 0 ]; then
    for file in "${found[@]}"; do
        grep -n -i -a -e "$old" "$file" | head -n 20 | sed "s|^|${file#./}:|" >&2
    done
    for path in "${paths[@]}"; do
        echo "path: ${path#./}" >&2
    done
    fail "'$old' is still mentioned in ${#found[@]} file(s) and ${#paths[@]} path name(s) (above)"
fi
echo "ok   no '$old' outside ${ALLOWED[*]}"

step "done"
echo
echo "rename-check: passed ($old -> $new) in $((SECONDS - started))s:"
printf '  %s\n' "${timings[@]}"
