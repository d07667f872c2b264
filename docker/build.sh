#!/usr/bin/env bash
# Build FedHub's images (`make docker`): fedhub-server, fedhub-device and fedhub-dashboard.
#
#   docker/build.sh [PYTHON]          (default python3.11: downloads the wheels, see wheels.sh)
#   FEDHUB_FRAMEWORK=torch docker/build.sh   (server and device with PyTorch, no TensorFlow:
#                                             fedhub-server:torch, fedhub-device:torch)
#
# The base is BASE_IMAGE if set, else python:3.11-slim when it is present or can be pulled,
# else fedhub-base:py311, built from Debian's packages by base-image.sh. The wheels come from
# the host, so the builds run with no network at all.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${1:-python3.11}"
tag="${FEDHUB_IMAGE_TAG:-latest}"
framework="${FEDHUB_FRAMEWORK:-keras}"
case "$framework" in
  keras) ml_tag="$tag" ;;
  torch) ml_tag="${FEDHUB_TORCH_TAG:-torch}" ;;
  *) echo "error: FEDHUB_FRAMEWORK must be keras or torch, got '$framework'" >&2; exit 2 ;;
esac
base="${BASE_IMAGE:-}"
if [ -z "$base" ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 \
     || docker pull --quiet python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
  else
    echo "python:3.11-slim cannot be pulled: using a base built from Debian's packages"
    docker/base-image.sh fedhub-base:py311
    base=fedhub-base:py311
  fi
fi

docker/wheels.sh "$python" "$framework"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in server device dashboard; do
  image="fedhub-$target:$([ "$target" = dashboard ] && echo "$tag" || echo "$ml_tag")"
  start=$SECONDS
  if ! docker build --network none --build-arg BASE_IMAGE="$base" --build-arg FRAMEWORK="$framework" \
       --target "$target" \
       --tag "$image" . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "error: building $image failed" >&2
    exit 1
  fi
  size="$(docker image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
  echo "built $image on $base ($size, $((SECONDS - start))s)"
done
