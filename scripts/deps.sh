#!/usr/bin/env bash
# Installs the Debian 12 packages faultline needs that are missing; does
# nothing when all are there. Uses sudo when not run as root.
# Usage: scripts/deps.sh [extra-package...]
set -euo pipefail

packages=(
  g++ meson ninja-build pkg-config cmake ccache
  liburing-dev libzstd-dev libuv1-dev libxxhash-dev nlohmann-json3-dev python3-numpy
  doctest-dev libbenchmark-dev libopenblas-dev
  python3-dev pybind11-dev python3-torch python3-pytest
  "$@"
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
echo "installing: ${missing[*]}" >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
