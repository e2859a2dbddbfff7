#!/usr/bin/env bash
# Browser test of the demo page: headless Chromium (Debian's) driven by playwright-core (npm).
# Installs chromium and the npm dependencies when missing, builds the reference server (debug),
# starts it on a free loopback port with a short download delay, waits for /health, runs
# tests/browser with node's test runner, and stops the server on exit.
#
# BASE_URL=http://host:port skips the build and start and tests that server instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM_PATH" ]; then
  echo "installing chromium (Debian package)"
  apt_install chromium
fi
[ -x "$CHROMIUM_PATH" ] || { echo "browser suite: no Chromium at $CHROMIUM_PATH" >&2; exit 1; }
command -v curl >/dev/null || apt_install curl
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing nodejs and npm (Debian packages)"
  apt_install nodejs npm
fi

# npm dependencies (playwright-core only; it downloads no browser)
(
  cd tests/browser
  if [ ! -d node_modules/playwright-core ]; then
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
  fi
)

SERVER_PID=""
RUN_DIR=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  if [ -n "$RUN_DIR" ]; then rm -rf "$RUN_DIR"; fi
}
trap cleanup EXIT INT TERM

if [ -z "${BASE_URL:-}" ]; then
  echo "building longjob-server (debug)"
  cargo build -p longjob-server --locked
  BIN="$CARGO_TARGET_DIR/debug/longjob-server"
  [ -x "$BIN" ] || { echo "browser suite: $BIN was not built" >&2; exit 1; }

  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' 2>/dev/null \
    || node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
  RUN_DIR=$(mktemp -d)
  export BASE_URL="http://127.0.0.1:$PORT"
  echo "starting longjob-server on $BASE_URL (log: $RUN_DIR/server.log)"
  env -u REDIS_URL -u DATABASE_URL -u S3_BUCKET_NAME -u S3_ENDPOINT -u API_KEYS \
    HOST=127.0.0.1 PORT="$PORT" BLOB_DIR="$RUN_DIR/blobs" \
    DOWNLOAD_DELAY_ENABLED=true DOWNLOAD_DELAY_MIN_MS=300 DOWNLOAD_DELAY_MAX_MS=1200 \
    RATE_LIMIT_MAX_REQUESTS=100000 JOBS_PER_HOUR=1000 MAX_ACTIVE_JOBS_PER_OWNER=100 \
    RUST_LOG="${RUST_LOG:-info}" \
    "$BIN" >"$RUN_DIR/server.log" 2>&1 &
  SERVER_PID=$!

  for _ in $(seq 1 100); do
    if curl -fsS "$BASE_URL/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "browser suite: longjob-server exited during start:" >&2; cat "$RUN_DIR/server.log" >&2; exit 1
    fi
    sleep 0.1
  done
  curl -fsS "$BASE_URL/health" >/dev/null || {
    echo "browser suite: longjob-server does not answer $BASE_URL/health:" >&2; cat "$RUN_DIR/server.log" >&2; exit 1; }
fi

cd tests/browser
status=0
BASE_URL="$BASE_URL" CHROMIUM_PATH="$CHROMIUM_PATH" node --test --test-reporter=spec demo.test.mjs || status=$?
if [ "$status" != 0 ] && [ -n "$RUN_DIR" ]; then
  echo "---- server log (last 60 lines) ----" >&2
  tail -n 60 "$RUN_DIR/server.log" >&2 || true
fi
exit "$status"
