#!/usr/bin/env bash
# Build a Python 3.11 base image from Debian's packages, for machines that cannot pull
# python:3.11-slim from an image registry but reach Debian's archive (CI here).
#
#   docker/base-image.sh [TAG]        (default fedhub-base:py311; does nothing if TAG exists)
#
# Debian bookworm's python3 is 3.11. The archive is the one this machine's apt already uses
# (DEBIAN_MIRROR overrides it). Needs root, debootstrap and a running Docker engine.
set -euo pipefail

tag="${1:-fedhub-base:py311}"
suite=bookworm

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already present"
  exit 0
fi

mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  # The first Debian archive apt is configured with (deb822 "URIs:" or one-line "deb" form),
  # leaving out the security archive.
  mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' \
            | grep -v security | head -n 1 || true)"
fi
if [ -z "$mirror" ]; then
  mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
            | grep -v security | head -n 1 || true)"
fi
if [ -z "$mirror" ]; then
  echo "error: no Debian archive found in apt's sources; set DEBIAN_MIRROR" >&2
  exit 2
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2
  exit 2
fi

rootfs="$(mktemp -d /tmp/fedhub-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
echo "building $tag: Debian $suite (minbase + python3, python3-venv) from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
# What a container never needs: downloaded packages, package lists, documentation, translations.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}'))"
