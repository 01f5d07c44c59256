#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) in build-fuzz/ and
# runs each for a bounded time over a copy of its seed corpus.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
scripts/deps.sh clang libclang-rt-14-dev
if [[ ! -f build-fuzz/build.ninja ]]; then
  CXX=clang++ meson setup build-fuzz -Dfuzz=enabled -Dtests=disabled -Dbenchmarks=disabled \
    -Db_sanitize=address,undefined -Db_lundef=false --buildtype=debugoptimized
fi
ninja -C build-fuzz
for target in bundle safetensors; do
  work=$(mktemp -d)
  cp tests/fuzz/corpus/$target/* "$work"/
  echo "fuzzing $target for ${seconds}s"
  UBSAN_OPTIONS=halt_on_error=1 build-fuzz/tests/fuzz/fuzz_$target -max_total_time="$seconds" \
    -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "$work" 2>&1 | tail -n 12
  status=${PIPESTATUS[0]}
  rm -rf "$work"
  [[ $status -eq 0 ]] || { echo "fuzz_$target found a failure" >&2; exit 1; }
done
