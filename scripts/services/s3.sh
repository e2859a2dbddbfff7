#!/usr/bin/env bash
# Makes an S3-compatible server that verifies SigV4 signatures (and presigned URL expiry) answer on
# loopback, for the tests of longjob-s3.
#
# - With S3_ENDPOINT set, that server is used: nothing is started (the bucket must exist).
# - Otherwise: s3s-fs 0.14.1 (installed with `cargo install` when missing, about 2 min once, into
#   ~/.cargo/bin, outside the work tree) on 127.0.0.1:${S3_PORT:-9100}, data under .run/s3/data,
#   with the test-only credentials below and the bucket "longjob-test".
#
# The tests' defaults match these values (crates/longjob-s3/tests/common/mod.rs):
#   S3_ENDPOINT=http://127.0.0.1:9100  S3_ACCESS_KEY_ID=longjob-test-access
#   S3_SECRET_ACCESS_KEY=longjob-test-secret  S3_BUCKET_NAME=longjob-test
set -euo pipefail
cd "$(dirname "$0")/../.."

S3S_FS_VERSION=0.14.1
PORT="${S3_PORT:-9100}"
ACCESS_KEY=longjob-test-access
SECRET_KEY=longjob-test-secret
BUCKET=longjob-test
RUN_DIR="$PWD/.run/s3"
DATA_DIR="$RUN_DIR/data"

if [ -n "${S3_ENDPOINT:-}" ]; then
  echo "s3: S3_ENDPOINT is set; using $S3_ENDPOINT (nothing started)"
  if command -v curl >/dev/null 2>&1; then
    # Any HTTP answer (even 403) means the server is up.
    if ! curl -s -o /dev/null -m 5 "$S3_ENDPOINT"; then
      echo "s3: $S3_ENDPOINT does not answer" >&2
      exit 1
    fi
  fi
  exit 0
fi

answers() {
  # true when something accepts TCP connections on 127.0.0.1:$PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

mkdir -p "$DATA_DIR/$BUCKET"

# Whether the server on the port lists the test bucket with the test credentials (curl signs the
# request). Any other answer (a 500 from an s3s-fs whose data directory was deleted, a 403 from a
# server with other credentials) means it is not a server the tests can use.
serves_bucket() {
  local code
  code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$ACCESS_KEY:$SECRET_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
    "http://127.0.0.1:$PORT/$BUCKET?list-type=2&max-keys=1") || true
  [ "$code" = 200 ]
}

if answers; then
  if ! command -v curl >/dev/null 2>&1 || serves_bucket; then
    echo "s3: a server already answers on 127.0.0.1:$PORT"
    exit 0
  fi
  # An s3s-fs left by another checkout (its data directory gone) is replaced; anything else is
  # not ours to stop.
  stale=$(pgrep -f "s3s-fs .*--port $PORT( |$)" || true)
  if [ -z "$stale" ]; then
    echo "s3: the server on 127.0.0.1:$PORT does not serve bucket $BUCKET with the test credentials;" \
      "stop it, or set S3_PORT or S3_ENDPOINT" >&2
    exit 1
  fi
  echo "s3: the s3s-fs on 127.0.0.1:$PORT (pid $stale) does not serve bucket $BUCKET; replacing it"
  kill $stale 2>/dev/null || true
  for _ in $(seq 1 50); do answers || break; sleep 0.1; done
fi

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v s3s-fs >/dev/null 2>&1 \
  || ! s3s-fs --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
  echo "s3: installing s3s-fs $S3S_FS_VERSION (about 2 min, once)"
  if ! command -v cargo >/dev/null 2>&1; then
    echo "s3: cargo is not on PATH; cannot install s3s-fs" >&2
    exit 1
  fi
  # Its own build directory, not the workspace's target directory.
  env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET_DIR \
    cargo install s3s-fs --version "$S3S_FS_VERSION" --locked --features binary
fi

# Objects of earlier test runs (each test writes under its own test-<uuid>/ prefix) are of no use.
rm -rf "$DATA_DIR/$BUCKET"/test-*

echo "s3: starting s3s-fs on 127.0.0.1:$PORT (data in $DATA_DIR)"
# s3s-fs logs one ERROR line per rejected request: expected in the signing tests.
RUST_LOG="${S3S_LOG:-warn}" nohup setsid s3s-fs --host 127.0.0.1 --port "$PORT" \
  --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" "$DATA_DIR" \
  >"$RUN_DIR/server.log" 2>&1 </dev/null &
echo $! >"$RUN_DIR/s3s-fs.pid"

for _ in $(seq 1 100); do
  if answers; then
    echo "s3: s3s-fs answers on 127.0.0.1:$PORT (bucket $BUCKET)"
    exit 0
  fi
  if ! kill -0 "$(cat "$RUN_DIR/s3s-fs.pid")" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
echo "s3: s3s-fs did not start on 127.0.0.1:$PORT; its log ($RUN_DIR/server.log):" >&2
tail -n 20 "$RUN_DIR/server.log" >&2 || true
exit 1
