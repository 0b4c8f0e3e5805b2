#!/usr/bin/env bash
# Refreshes the pinned onnxruntime-web files of the annotation tool from the npm registry.
#   bash pipeline/annotate/static/vendor/refresh.sh [VERSION]
# Copies only what the page loads: the ES module of the WebAssembly backend, the
# Emscripten glue module it imports and the one .wasm that glue fetches, plus the licence.
set -euo pipefail
VERSION="${1:-1.22.0}"
HERE="$(cd "$(dirname "$0")" && pwd)"
DEST="$HERE/onnxruntime-web"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "onnxruntime-web@$VERSION" >/dev/null && tar xzf "onnxruntime-web-$VERSION.tgz")
rm -rf "$DEST" && mkdir -p "$DEST"
FILES="ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm"
for f in $FILES; do cp "$WORK/package/dist/$f" "$DEST/"; done
# The npm package declares "license": "MIT" but ships no licence file; this is the
# text of the LICENSE file of the onnxruntime repository it is built from.
cp "$HERE/ONNXRUNTIME_LICENSE" "$DEST/LICENSE"
echo "$VERSION" > "$DEST/VERSION"
(cd "$DEST" && sha256sum $FILES > SHA256SUMS)
du -sh "$DEST"
