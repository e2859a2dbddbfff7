#!/usr/bin/env bash
# Benchmark of the HTTP face: the reference server (release build) on its embedded defaults
# (in-memory store, queue and bus, blobs on local disk), driven by wrk with the settings the
# replaced Hono service was measured with: wrk -t2 -c64 -d10s.
#
# For each endpoint a fresh server is started, so the peak RSS (VmHWM) is that endpoint's own.
# The delay is disabled, the rate limit opened wide and the per-owner quotas off, so the run
# measures the server, not the limiter.
#
#   scripts/bench-http.sh                 # all four endpoints
#   DURATION=30s CONNECTIONS=128 scripts/bench-http.sh
#   INITIATE_AVAILABLE=1 scripts/bench-http.sh   # initiate with available files (the worker builds zips)
#   SERVER_BIN=path/to/longjob-server scripts/bench-http.sh   # a prebuilt binary, no build
#   JOBS_PER_HOUR=1000000000 scripts/bench-http.sh   # with the per-owner quota check on
#
# Prints one Markdown table (req/s, latency, the server's CPU time per request, non-2xx, peak RSS,
# ratio to the Hono figures).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
DURATION="${DURATION:-10s}"
# The replaced Hono service on this 2-core machine (wrk -t2 -c64 -d10s): req/s per endpoint, RSS.
HONO_HEALTH=3400 HONO_CHECK=1800 HONO_INITIATE=2200 HONO_RSS_MB=253
# 0 turns the per-owner quotas off (the server's convention). With a quota on, every initiate
# counts the owner's recent jobs first (in the in-memory store, from its per-owner index): set
# e.g. JOBS_PER_HOUR=1000000000 to measure that path.
JOBS_PER_HOUR="${JOBS_PER_HOUR:-0}"

if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
command -v curl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }

if [ -n "${SERVER_BIN:-}" ]; then
  BIN=$SERVER_BIN # a prebuilt server binary: no build
else
  echo "building longjob-server (release)" >&2
  cargo build --release -p longjob-server --locked >&2
  BIN="$CARGO_TARGET_DIR/release/longjob-server"
fi

RUN_DIR=$(mktemp -d)
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap 'stop_server; rm -rf "$RUN_DIR"' EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start_server() {
  PORT=$(free_port)
  BASE="http://127.0.0.1:$PORT"
  rm -rf "$RUN_DIR/blobs"
  env -u REDIS_URL -u DATABASE_URL -u S3_BUCKET_NAME -u S3_ENDPOINT -u API_KEYS \
    HOST=127.0.0.1 PORT="$PORT" BLOB_DIR="$RUN_DIR/blobs" \
    DOWNLOAD_DELAY_ENABLED=false \
    RATE_LIMIT_MAX_REQUESTS=1000000000 JOBS_PER_HOUR="$JOBS_PER_HOUR" MAX_ACTIVE_JOBS_PER_OWNER=0 \
    RUST_LOG="${RUST_LOG:-warn}" \
    "$BIN" >"$RUN_DIR/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    curl -fsS "$BASE/health" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "longjob-server did not start:" >&2; cat "$RUN_DIR/server.log" >&2; exit 1
}

kib_of() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$SERVER_PID/status"; }
# The server's CPU time so far (user + system), in clock ticks: divided by the requests of a run,
# the CPU a request costs, which moves much less than req/s when other work shares the cores.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$SERVER_PID/stat"; }
CLK_TCK=$(getconf CLK_TCK)

# bench NAME METHOD PATH LUA HONO_RPS
bench() {
  local name=$1 path=$2 lua=$3 hono=$4
  start_server
  if [ "$path" = "JOB" ]; then
    local job
    job=$(curl -fsS -X POST -H 'Content-Type: application/json' -d '{"file_ids": [70000, 70001]}' \
      "$BASE/v1/download/initiate" | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobId"])')
    path="/v1/download/job/$job"
    sleep 0.5 # let the job finish: the status body is then final (no Retry-After churn)
  fi
  local rss_idle out
  rss_idle=$(kib_of VmRSS)
  out="$RUN_DIR/$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '_').txt"
  local args=(-t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency)
  [ -n "$lua" ] && args+=(-s "scripts/wrk/$lua")
  echo "== $name: wrk ${args[*]} $BASE$path" >&2
  local ticks_before ticks_after
  ticks_before=$(cpu_ticks)
  wrk "${args[@]}" "$BASE$path" >"$out" 2>&1 || { cat "$out" >&2; exit 1; }
  ticks_after=$(cpu_ticks)
  cat "$out" >&2
  local hwm rss_after
  hwm=$(kib_of VmHWM)
  rss_after=$(kib_of VmRSS)
  stop_server

  local rps p50 p99 non2xx errors
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
  p50=$(awk '$1 == "50%" { print $2 }' "$out")
  p99=$(awk '$1 == "99%" { print $2 }' "$out")
  non2xx=$(awk -F': *' '/Non-2xx or 3xx responses/ { print $2 }' "$out")
  errors=$(awk '/Socket errors/ { sub(/^ *Socket errors: */, ""); print }' "$out")
  local requests cpu_us
  requests=$(awk '/requests in/ { print $1 }' "$out")
  cpu_us=$(awk -v a="$ticks_before" -v b="$ticks_after" -v r="$requests" -v t="$CLK_TCK" \
    'BEGIN { printf "%.1f µs", (b - a) * 1e6 / t / r }')
  local ratio="n/a (new)" rss_ratio
  if [ "$hono" != "-" ]; then ratio=$(awk -v a="$rps" -v b="$hono" 'BEGIN { printf "%.1f×", a / b }'); fi
  rss_ratio=$(awk -v h="$hwm" -v b="$HONO_RSS_MB" 'BEGIN {
    if (h / 1024 <= b) printf "%.1f MB (1/%.0f)", h / 1024, b * 1024 / h
    else printf "%.1f MB (%.1f× Hono)", h / 1024, h / 1024 / b }')
  printf '| %s | %s | %s | %s | %s / %s | %s | %s | %s | %s |\n' \
    "$name" "$(printf '%.0f' "$rps")" "$( [ "$hono" = "-" ] && echo "–" || echo "$hono")" "$ratio" \
    "$p50" "$p99" "$cpu_us" "${non2xx:-0}${errors:+ (socket: $errors)}" \
    "$(awk -v k="$rss_idle" 'BEGIN { printf "%.1f MB", k / 1024 }') → $(awk -v k="$rss_after" 'BEGIN { printf "%.1f MB", k / 1024 }')" \
    "$rss_ratio" >>"$RUN_DIR/table.md"
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
bench "GET /health" "/health" "" "$HONO_HEALTH"
bench "POST /v1/download/check" "/v1/download/check" check.lua "$HONO_CHECK"
bench "POST /v1/download/initiate" "/v1/download/initiate" initiate.lua "$HONO_INITIATE"
bench "GET /v1/download/job/{id}" "JOB" "" "-"
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

echo
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency; JOBS_PER_HOUR=$JOBS_PER_HOUR; $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo); load average before $load_before, after $load_after"
echo
echo "| endpoint | req/s | Hono req/s | ratio | latency p50 / p99 | server CPU / request | non-2xx | RSS idle → after | peak RSS (VmHWM) vs Hono's $HONO_RSS_MB MB |"
echo "|---|---:|---:|---:|---|---:|---:|---|---|"
cat "$RUN_DIR/table.md"
