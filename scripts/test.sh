#!/usr/bin/env bash
# The whole test suite, as CI runs it: starts (and on a bare Debian machine installs) every
# server the tests need, then format check, clippy with warnings denied, every test, the docs.
# Each scripts/services/*.sh makes one server answer or exits non-zero, so a server that cannot
# be had fails the run (in CI and locally alike: no test is skipped for a missing server).
set -euo pipefail
cd "$(dirname "$0")/.."

for service in scripts/services/*.sh; do
  [ -e "$service" ] || continue
  echo "== $(basename "$service" .sh)"
  bash "$service"
done

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --all-features --locked
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --locked

# Suites that drive built binaries from outside (end-to-end, browser): scripts/suites/*.sh
for suite in scripts/suites/*.sh; do
  [ -e "$suite" ] || continue
  echo "== $(basename "$suite" .sh)"
  bash "$suite"
done
echo "== all suites passed"
