#!/usr/bin/env bash
# Download the runtime dependencies' wheels on the host into docker/wheels/, for the image
# to install with `pip install --no-index`: the build then needs no network of its own.
#
#   docker/wheels.sh [PYTHON] [FRAMEWORK]   (default python3.11, any Python 3.11 with pip; keras)
#
# The runtime dependencies with the keras extra, and the torch extra's too for FRAMEWORK torch
# (pip finds the CPU build of PyTorch where the machine has it, as `make venv` does). Wheels
# that hold every line asked for are kept, so a Keras build after a PyTorch one downloads nothing.
#
# Why on the host: a machine that reaches only the package registries (CI here) may reach
# them through a proxy whose certificate the host trusts but a fresh container does not.
# The wheels are for the image, not the host: CPython 3.11 on glibc 2.36 (Debian bookworm,
# which python:3.11-slim is built on too), this machine's architecture.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${1:-python3.11}"
framework="${2:-keras}"
out=docker/wheels
arch="$(uname -m)"

platforms=()
for minor in $(seq 5 36); do
  platforms+=(--platform "manylinux_2_${minor}_${arch}")
done
platforms+=(--platform "manylinux2014_${arch}" --platform "manylinux2010_${arch}"
            --platform "manylinux1_${arch}")

req="$(mktemp)"
trap 'rm -f "$req"' EXIT
extras=(keras)
[ "$framework" = keras ] || extras+=("$framework")
"$python" docker/requirements.py --extra "${extras[@]}" >"$req"
if [ -f "$out/requirements.txt" ] && ! grep -vxFf "$out/requirements.txt" "$req" >/dev/null; then
  echo "wheels in $out are up to date"
  exit 0
fi
mkdir -p "$out"
# Anything left from an older dependency set would be installable too: start empty.
find "$out" \( -name '*.whl' -o -name requirements.txt \) -delete
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --implementation cp --python-version 3.11 --abi cp311 "${platforms[@]}" \
  --dest "$out" -r "$req" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
cp "$req" "$out/requirements.txt"
echo "$(find "$out" -name '*.whl' | wc -l) wheels in $out ($(du -sh "$out" | cut -f1))"
