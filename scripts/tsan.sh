#!/usr/bin/env bash
# Builds the suites with ThreadSanitizer in build-tsan/ and runs them with
# the project's suppressions (tests/tsan.supp, each with its reason); exits
# non-zero if any reports a race. Not in CI: the allocator suite alone takes
# about ten minutes under TSan on two cores.
# Usage: scripts/tsan.sh [SUITE...]   (default: core bundle cli pager alloc)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
if [[ ! -f build-tsan/build.ninja ]]; then
  meson setup build-tsan -Db_sanitize=thread -Db_lundef=false --buildtype=debugoptimized \
    -Dbenchmarks=disabled -Dcuda=disabled -Dpython=disabled
fi
ninja -C build-tsan
# die_after_fork=0: tests fork children that start threads (the pager's
# fork tests); TSan would end them before they check anything.
export TSAN_OPTIONS="suppressions=$PWD/tests/tsan.supp die_after_fork=0 halt_on_error=0 exitcode=66 ${TSAN_OPTIONS:-}"
suites=("$@")
[[ ${#suites[@]} -gt 0 ]] || suites=(core bundle tools pager alloc)
args=()
for s in "${suites[@]}"; do args+=(--suite "$s"); done
meson test -C build-tsan --print-errorlogs --timeout-multiplier 6 "${args[@]}"
