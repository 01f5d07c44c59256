#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs the demo (a
# multi-layer model packed into a bundle, inspected, verified, read back
# bit-exactly), then shows the bundle with the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
build=${BUILD_DIR:-build}
out="$build/demo"
"$build/tools/faultline-demo" "$out" "$@"
echo
"$build/tools/faultline" inspect "$out/demo.apbundle" > "$out/inspect.txt"
head -n 20 "$out/inspect.txt"
echo "  ... (full listing in $out/inspect.txt)"
"$build/tools/faultline" verify "$out/demo.apbundle"
