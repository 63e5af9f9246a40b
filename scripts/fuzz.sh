#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 30 s each) against its
# seed corpus. Needs cargo-fuzz (installed here if missing); the stable
# toolchain accepts the fuzzer's -Z flags with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-30}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz (once)"
  cargo install cargo-fuzz --locked
fi
# A build directory outside the clone keeps repeated runs fast.
target_dir="${CARGO_FUZZ_TARGET_DIR:-$HOME/.cache/courier-fuzz-target}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in $(ls fuzz_targets | sed 's/\.rs$//'); do
  echo "== fuzz $target for ${seconds}s"
  mkdir -p "$scratch/$target"
  # New inputs go to the scratch dir; the repo's corpus is read, never written.
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --target-dir "$target_dir" "$target" \
      "$scratch/$target" "corpus/$target" -- -max_total_time="$seconds" -print_final_stats=1 \
      >"$scratch/$target.log" 2>&1; then
    grep -E "panicked|SUMMARY|ERROR|left|right" "$scratch/$target.log" | head -20 >&2 || true
    echo "fuzz target $target found a failure; the input is in fuzz/artifacts/$target/ — fix it and add it as a regression test" >&2
    exit 1
  fi
  grep -E "^Done|number_of_executed_units" "$scratch/$target.log" || true
done
