#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the database tests.
#
#   eval "$(scripts/postgres.sh start)"   # prints the exports below
#   scripts/postgres.sh stop              # stops the server, deletes the cluster
#   scripts/postgres.sh pause | resume    # pg_ctl stop -m fast / start (fault tests)
#
# Installs Debian's `postgresql` package when it is missing, then runs
# initdb and pg_ctl as the unprivileged `postgres` user, in $KEEL_PG_DIR
# (default /tmp/keel-pg), listening on 127.0.0.1 on a free port with its
# socket in that directory. `start` prints:
#   export KEEL_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:PORT/postgres
#   export KEEL_TEST_PG_DIR=...
# The tests create one database per test from that URL.
set -euo pipefail

DIR="${KEEL_PG_DIR:-${KEEL_TEST_PG_DIR:-/tmp/keel-pg}}"
DATA="$DIR/data"
SOCK="$DIR/sock"

log() { echo "postgres.sh: $*" >&2; }

bindir() {
    local initdb
    initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$initdb" ]; then
        log "installing the postgresql package"
        if [ "$(id -u)" -eq 0 ]; then
            apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
        else
            sudo apt-get update -qq >&2 && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
        fi
        initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)
    fi
    dirname "$initdb"
}

# Runs a command as the postgres user (or as ourselves when not root).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_start() {
    local bin port
    bin=$(bindir)
    port=$(cat "$DIR/port")
    as_pg "$bin/pg_ctl" -D "$DATA" -l "$DIR/server.log" -w -t 30 \
        -o "-p $port -k $SOCK -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >&2
}

case "${1:-}" in
start)
    bin=$(bindir)
    if [ -f "$DIR/port" ] && as_pg "$bin/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        port=$(cat "$DIR/port")
        log "already running on port $port"
    else
        rm -rf "$DIR"
        mkdir -p "$DATA" "$SOCK"
        if [ "$(id -u)" -eq 0 ]; then chown -R postgres:postgres "$DIR"; fi
        as_pg "$bin/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=trust -E UTF8 >/dev/null
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
        echo "$port" > "$DIR/port"
        pg_start
        log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data $DATA)"
    fi
    echo "export KEEL_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$port/postgres"
    echo "export KEEL_TEST_PG_DIR=$DIR"
    ;;
stop)
    bin=$(bindir)
    as_pg "$bin/pg_ctl" -D "$DATA" -m fast -w stop >&2 2>/dev/null || true
    rm -rf "$DIR"
    ;;
pause)
    as_pg "$(bindir)/pg_ctl" -D "$DATA" -m fast -w stop >&2
    ;;
resume)
    pg_start
    ;;
*)
    echo "usage: $0 start|stop|pause|resume" >&2
    exit 64
    ;;
esac
