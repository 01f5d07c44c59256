#!/usr/bin/env bash
# Installs what is missing, builds, and runs the test suite (meson test).
# Extra arguments go to meson test (e.g. --suite bundle, or --benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
meson test -C "${BUILD_DIR:-build}" --print-errorlogs "$@"
