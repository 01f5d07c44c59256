#!/usr/bin/env bash
# Checks the Python package as `pip install .` builds it from this source
# tree (meson-python, pyproject.toml): installs it into a temporary
# directory with Debian's meson-python, offline (no build isolation), and
# runs the Python test suite against that copy instead of the build tree.
# Run after scripts/test.sh (the suite's CLI tests use build/tools).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh python3-mesonpy python3-pip patchelf
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
/usr/bin/python3 -m pip install -q --no-build-isolation --no-deps --disable-pip-version-check \
  --root-user-action=ignore --target "$target" .
test -f "$target/faultline/py.typed" && test -f "$target/faultline/_native.pyi"
# The tests must import the installed copy, not the build tree's.
where=$(cd /tmp && PYTHONPATH="$target" /usr/bin/python3 -c 'import faultline; print(faultline.__file__)')
[[ "$where" == "$target/faultline/__init__.py" ]] || { echo "imported $where, not the installed package" >&2; exit 1; }
echo "installed: $where ($(cd /tmp && PYTHONPATH="$target" /usr/bin/python3 -c 'import faultline; print(faultline.cuda_describe())'))"
PYTHONPATH="$target:$PWD/.pydeps" FAULTLINE_CLI="$PWD/${BUILD_DIR:-build}/tools/faultline" \
  /usr/bin/python3 python/tests/run.py
