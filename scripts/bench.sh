#!/usr/bin/env bash
# The standard benchmark set of longjob against its peers, written into docs/benchmarks.md.
#
#   scripts/bench.sh [redis] [postgres]        (default: both)
#
# For each backend it runs `longjob-bench throughput --backend B --peers` on the shapes below and
# replaces the matching section of docs/benchmarks.md (between `<!-- bench:ID -->` and
# `<!-- /bench:ID -->`; a missing section is appended) with the command, the date, the machine's
# load and the harness output (longjob's JSON line and the Markdown table). Servers: REDIS_URL and
# DATABASE_URL (loopback defaults); scripts/services/B.sh is run first for each backend B (the
# harness needs no object store, so the S3 server is neither installed nor started).
# PEER_TIMEOUT (seconds, default 900) bounds each peer run; a peer past it is reported as failed.
set -euo pipefail
cd "$(dirname "$0")/.."

backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(redis postgres)
doc=docs/benchmarks.md
peer_timeout="${PEER_TIMEOUT:-900}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

for backend in "${backends[@]}"; do
  case "$backend" in
    redis | postgres) ;;
    *)
      echo "unknown backend $backend: redis or postgres" >&2
      exit 2
      ;;
  esac
done

for backend in "${backends[@]}"; do
  service="scripts/services/$backend.sh"
  [ -e "$service" ] || continue
  echo "== $backend" >&2
  bash "$service" >&2
done

echo "== cargo build --release -p longjob-bench" >&2
cargo build --release --locked -p longjob-bench >&2
bench="${CARGO_TARGET_DIR:-target}/release/longjob-bench"

mkdir -p docs
if [ ! -e "$doc" ]; then
  cat >"$doc" <<'EOF'
# Benchmarks

Throughput of longjob next to its peers, from `scripts/bench.sh` (one run of
`longjob-bench throughput --backend B --peers` per shape, C = 50 unless said otherwise).
`process/s` is N over the time from the worker's start until the backend shows all N jobs
completed; `enqueue/s` is N over the time to submit them in batches of 1000. The last column is
longjob's `process/s` divided by the peer's. Sections below are rewritten by the script.
EOF
fi

# replace_section ID FILE: puts FILE's content between the markers of ID in $doc.
replace_section() {
  local id="$1" body="$2" tmp
  tmp="$(mktemp)"
  if grep -qF "<!-- bench:$id -->" "$doc"; then
    awk -v start="<!-- bench:$id -->" -v end="<!-- /bench:$id -->" -v body="$body" '
      $0 == start { print; while ((getline line < body) > 0) print line; skip = 1; next }
      $0 == end { skip = 0 }
      !skip { print }
    ' "$doc" >"$tmp"
  else
    { cat "$doc"; echo; echo "<!-- bench:$id -->"; cat "$body"; echo "<!-- /bench:$id -->"; } >"$tmp"
  fi
  mv "$tmp" "$doc"
}

results="$(mktemp -d)"
trap 'rm -rf "$results"' EXIT

# run ID TITLE ARGS...: one harness run, written into section ID (its output kept as $results/ID).
run() {
  local id="$1" title="$2"
  shift 2
  local out="$results/$id" body
  body="$(mktemp)"
  local cmd=(throughput "$@" --peers --peer-timeout "$peer_timeout")
  echo "== longjob-bench ${cmd[*]}" >&2
  local status=0
  "$bench" "${cmd[@]}" >"$out" || status=$?
  {
    echo
    echo "### $title"
    echo
    echo "\`longjob-bench ${cmd[*]}\` — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    if [ "$status" -ne 0 ]; then
      echo "**The harness failed (exit $status).**"
      echo
    fi
    echo '```json'
    head -n 1 "$out"
    echo '```'
    tail -n +2 "$out"
    echo
  } >"$body"
  replace_section "$id" "$body"
  cat "$out"
  rm -f "$body"
}

# cliff ID SMALL LARGE: longjob's process/s at the large N as a share of the small N's.
cliff() {
  local id="$1" small="$2" large="$3" body
  local a b
  a="$(grep -o '"process_per_s":[0-9.]*' "$results/$small" | head -n 1 | cut -d: -f2 || true)"
  b="$(grep -o '"process_per_s":[0-9.]*' "$results/$large" | head -n 1 | cut -d: -f2 || true)"
  body="$(mktemp)"
  {
    echo
    if [ -n "$a" ] && [ -n "$b" ]; then
      awk -v a="$a" -v b="$b" 'BEGIN { r = 100 * b / a; printf "%s: longjob at N = 200 000 runs at %.1f %% of its N = 20 000 rate (%s against %s jobs/s; the target is at least 80 %%).\n", (r >= 80 ? "No cliff" : "Cliff target missed"), r, b, a }'
    else
      echo "Cliff: not measured (a run failed)."
    fi
    echo
  } >"$body"
  replace_section "$id" "$body"
  rm -f "$body"
}

for backend in "${backends[@]}"; do
  case "$backend" in
    redis)
      run redis-20000-p0 "Redis, N = 20 000, C = 50, P = 0" --backend redis --jobs 20000 --concurrency 50 --progress 0
      run redis-20000-p10 "Redis, N = 20 000, C = 50, P = 10" --backend redis --jobs 20000 --concurrency 50 --progress 10
      run redis-200000-p0 "Redis, N = 200 000, C = 50, P = 0" --backend redis --jobs 200000 --concurrency 50 --progress 0
      cliff redis-cliff redis-20000-p0 redis-200000-p0
      ;;
    postgres)
      run postgres-20000-p0 "PostgreSQL, N = 20 000, C = 50, P = 0" --backend postgres --jobs 20000 --concurrency 50 --progress 0
      run postgres-200000-p0 "PostgreSQL, N = 200 000, C = 50, P = 0" --backend postgres --jobs 200000 --concurrency 50 --progress 0
      cliff postgres-cliff postgres-20000-p0 postgres-200000-p0
      ;;
  esac
done
echo "== wrote $doc" >&2
