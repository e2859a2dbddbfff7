#!/usr/bin/env bash
# Makes the Redis the tests use answer: REDIS_URL's when it is set (the tests read it too),
# else 127.0.0.1:6379 (or REDIS_PORT). A loopback URL, or none, that does not answer gets a
# redis-server started on that port, without persistence; any other URL must answer as it is.
# Either way it installs redis-server from Debian packages when missing: the fault tests of
# longjob-redis run a private redis-server of their own. Exits non-zero with a message when
# it cannot.
set -euo pipefail

PORT="${REDIS_PORT:-6379}"
URL="${REDIS_URL:-}"
if [ -n "$URL" ]; then
  # redis://[user:password@]host[:port][/db]: only a loopback host without credentials is ours
  # to start; its port is the URL's.
  hostport="${URL#*://}"
  hostport="${hostport%%/*}"
  case "$hostport" in
    127.0.0.1 | localhost) PORT=6379 URL="" ;;
    127.0.0.1:* | localhost:*) PORT="${hostport##*:}" URL="" ;;
  esac
fi
RUN_DIR="${REDIS_RUN_DIR:-/tmp/longjob-redis-$PORT}"

answers() {
  command -v redis-cli >/dev/null 2>&1 || return 1
  if [ -n "$URL" ]; then
    [ "$(redis-cli -u "$URL" ping 2>/dev/null || true)" = "PONG" ]
  else
    [ "$(redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null || true)" = "PONG" ]
  fi
}

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis: redis-server is not installed and apt-get is not available" >&2
    exit 1
  fi
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "redis: need root (or sudo) to install redis-server" >&2
      exit 1
    fi
  fi
  echo "redis: installing redis-server"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if answers; then
  if [ -n "$URL" ]; then echo "redis: REDIS_URL answers"; else echo "redis: answering on 127.0.0.1:$PORT"; fi
  exit 0
fi
if [ -n "$URL" ]; then
  # Not printed: the URL may hold a password.
  echo "redis: REDIS_URL does not answer, and it is not a loopback address this script could start a server on" >&2
  exit 1
fi

mkdir -p "$RUN_DIR"
echo "redis: starting redis-server on 127.0.0.1:$PORT (data in $RUN_DIR)"
redis-server --bind 127.0.0.1 --port "$PORT" --daemonize yes --save '' --appendonly no \
  --dir "$RUN_DIR" --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log"

for _ in $(seq 1 100); do
  if answers; then
    echo "redis: answering on 127.0.0.1:$PORT"
    exit 0
  fi
  sleep 0.1
done
echo "redis: redis-server did not answer on 127.0.0.1:$PORT within 10 s; see $RUN_DIR/redis.log" >&2
exit 1
