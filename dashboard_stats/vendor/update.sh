#!/usr/bin/env bash
# Re-vendor Chart.js from the npm registry: `bash dashboard_stats/vendor/update.sh [VERSION]`.
# The stats page must work offline (no CDN), so the UMD build and its licence live here.
set -euo pipefail
VERSION="${1:-4.6.1}"
HERE="$(cd "$(dirname "$0")" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "chart.js@${VERSION}" >/dev/null && tar xzf chart.js-*.tgz)
# The source map is not vendored, so its reference goes too (no 404 for it in devtools).
grep -v '^//# sourceMappingURL=' "$TMP/package/dist/chart.umd.min.js" > "$HERE/chart.umd.min.js"
cp "$TMP/package/LICENSE.md" "$HERE/LICENSE.md"
echo "chart.js ${VERSION} (npm: dist/chart.umd.min.js, LICENSE.md)" > "$HERE/VERSION"
echo "vendored chart.js ${VERSION} into ${HERE}"
