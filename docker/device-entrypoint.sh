#!/bin/sh
# The device image's entrypoint: make this container's share of the data set once, then run
# a device (flags only: device/device.py with them) or the command given (the launcher's pool).
#
# FEDHUB_SPLIT_DEVICES=N    split the training set over N devices (unset: the data is there)
# FEDHUB_SPLIT_ONLY=NAME    write only NAME's share (one device per container); unset: all N
# FEDHUB_SPLIT_ARGS         more fedhub.split flags, e.g. "--split dirichlet --limit 2000"
# FEDHUB_DEVICES_ROOT       where device folders live (the image sets /var/lib/fedhub/devices)
# FEDHUB_DATASET            the data set to split: fashion-mnist (default) or cifar-10
# FEDHUB_DATA_DIR           the data set's folder (or a folder holding it), a read-only bind mount
# The split is skipped once partition.json is there, so a restarted container keeps its data.
set -eu

root="${FEDHUB_DEVICES_ROOT:-/var/lib/fedhub/devices}"
if [ -n "${FEDHUB_SPLIT_DEVICES:-}" ] && [ ! -f "$root/partition.json" ]; then
  # shellcheck disable=SC2086 # FEDHUB_SPLIT_ARGS is a list of flags
  python -m fedhub.split --out "$root" --devices "$FEDHUB_SPLIT_DEVICES" --quiet \
    --dataset "${FEDHUB_DATASET:-fashion-mnist}" \
    ${FEDHUB_SPLIT_ONLY:+--only "$FEDHUB_SPLIT_ONLY"} ${FEDHUB_SPLIT_ARGS:-}
fi

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- python device/device.py "$@"
fi
exec "$@"
