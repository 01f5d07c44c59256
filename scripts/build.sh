#!/usr/bin/env bash
# Configures (once) and builds faultline in build/ (or $BUILD_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
if [[ ! -f "$build/build.ninja" ]]; then
  meson setup "$build" --buildtype=release
fi
ninja -C "$build"
