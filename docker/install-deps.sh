#!/bin/sh
# Install a requirements file into /opt/venv, for the images' build stages:
#   install-deps.sh REQUIREMENTS
# From the wheels docker/wheels.sh downloaded into /tmp/wheels (docker/wheels/ in the
# context) when there are any, needing no network; else from the package index.
set -eu
if ls /tmp/wheels/*.whl >/dev/null 2>&1; then
  set -- --no-index --find-links /tmp/wheels -r "$1"
else
  set -- -r "$1"
fi
exec /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "$@"
