#!/usr/bin/env bash
# Makes the PostgreSQL the tests use answer: DATABASE_URL's when it is set (the tests read it
# too), else 127.0.0.1:5432 (or PG_PORT) with a database `test` (or PG_DATABASE). First installs
# Debian's `postgresql` when its server binaries are missing (the fault tests of
# longjob-postgres run a private cluster of their own, so they are needed even when a server
# answers); then uses the server answering there, creating the database when missing; else, for
# a loopback address, creates a private cluster (trust authentication on loopback only) under
# PG_RUN_DIR, starts it and creates the database. A DATABASE_URL of another host must answer
# as it is. Exits non-zero with a message when it cannot.
set -euo pipefail

PORT="${PG_PORT:-5432}"
DB="${PG_DATABASE:-test}"
URL="${DATABASE_URL:-}"
if [ -n "$URL" ]; then
  # postgres://[user[:password]@]host[:port][/db][?options]: a loopback host is ours to start,
  # on the URL's port with the URL's database.
  rest="${URL#*://}"
  authority="${rest%%/*}"
  hostport="${authority##*@}"
  path="${rest#"$authority"}"
  path="${path#/}"
  path="${path%%\?*}"
  case "$hostport" in
    127.0.0.1 | localhost) PORT=5432 URL="" ;;
    127.0.0.1:* | localhost:*) PORT="${hostport##*:}" URL="" ;;
  esac
  if [ -z "$URL" ] && [ -n "$path" ]; then DB="$path"; fi
fi
RUN_DIR="${PG_RUN_DIR:-/tmp/longjob-postgres-$PORT}"

answers() {
  if [ -n "$URL" ]; then
    pg_isready -q -d "$URL" -t 2
  else
    pg_isready -q -h 127.0.0.1 -p "$PORT" -t 1
  fi
}

ensure_database() {
  local exists
  exists="$(psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Atc \
    "SELECT 1 FROM pg_database WHERE datname = '$DB'" 2>&1)" || {
    echo "postgres: answering on 127.0.0.1:$PORT but cannot connect as postgres: $exists" >&2
    exit 1
  }
  if [ "$exists" != "1" ]; then
    echo "postgres: creating database $DB"
    psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qc "CREATE DATABASE \"$DB\"" >/dev/null
  fi
  echo "postgres: answering on 127.0.0.1:$PORT, database $DB ready"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else
    echo "postgres: need root (or sudo) to $*" >&2
    exit 1
  fi
}

bin_dir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

if [ -z "$(bin_dir)" ] || [ ! -x "$(bin_dir)/initdb" ] || ! command -v psql >/dev/null 2>&1 ||
  ! command -v pg_isready >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "postgres: PostgreSQL is not installed and apt-get is not available" >&2
    exit 1
  fi
  echo "postgres: installing postgresql"
  as_root apt-get update -qq >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
BIN="$(bin_dir)"

if answers; then
  if [ -n "$URL" ]; then
    # Not printed: the URL may hold a password. The database is the URL's to provide.
    echo "postgres: DATABASE_URL answers"
  else
    ensure_database
  fi
  exit 0
fi
if [ -n "$URL" ]; then
  echo "postgres: DATABASE_URL does not answer, and it is not a loopback address this script could start a server on" >&2
  exit 1
fi

# Run the server as the postgres user when we are root (initdb refuses root), else as ourselves.
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
  as_pg() { runuser -u postgres -- "$@"; }
  install -d -o postgres -g postgres "$RUN_DIR" "$RUN_DIR/data" "$RUN_DIR/socket"
else
  as_pg() { "$@"; }
  mkdir -p "$RUN_DIR/data" "$RUN_DIR/socket"
fi

if [ ! -f "$RUN_DIR/data/PG_VERSION" ]; then
  echo "postgres: creating a cluster in $RUN_DIR/data"
  as_pg "$BIN/initdb" -D "$RUN_DIR/data" -U postgres --auth-local=trust --auth-host=trust \
    -E UTF8 --locale=C.UTF-8 >"$RUN_DIR/initdb.log" 2>&1 || {
    echo "postgres: initdb failed; see $RUN_DIR/initdb.log" >&2
    exit 1
  }
fi

echo "postgres: starting on 127.0.0.1:$PORT (data in $RUN_DIR/data)"
as_pg "$BIN/pg_ctl" -D "$RUN_DIR/data" -l "$RUN_DIR/server.log" -w -t 30 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $RUN_DIR/socket" start >/dev/null || {
  echo "postgres: the server did not start; see $RUN_DIR/server.log" >&2
  exit 1
}

for _ in $(seq 1 100); do
  if answers; then
    ensure_database
    exit 0
  fi
  sleep 0.1
done
echo "postgres: no answer on 127.0.0.1:$PORT within 10 s; see $RUN_DIR/server.log" >&2
exit 1
