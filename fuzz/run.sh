#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each; first
# argument overrides). Needs a nightly toolchain and cargo-fuzz; without a
# nightly toolchain it says so and exits 0, so CI can call it everywhere.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain; skipped"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
targets=$(cargo fuzz list)
cargo +nightly fuzz build
for target in $targets; do
  echo "--- fuzz $target (${seconds}s)"
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 2>&1 \
    | grep -E "^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::new_units_added|==[0-9]+==ERROR|SUMMARY)" || true
  if ls "artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $target found a crash: $(ls artifacts/$target/crash-*)"
    exit 1
  fi
done
echo "--- fuzz ok"
