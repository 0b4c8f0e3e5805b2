#!/usr/bin/env bash
# Refreshes the pinned onnxruntime-web files of the annotation tool from the npm registry.
#   bash pipeline/annotate/static/vendor/refresh.sh [VERSION]
# Copies only what the page loads: the ESM bundle of the WebAssembly backend (its
# Emscripten glue is inside) and the one .wasm it fetches, plus the licence.
set -euo pipefail
VERSION="${1:-1.22.0}"
HERE="$(cd "$(dirname "$0")" && pwd)"
DEST="$HERE/onnxruntime-web"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "onnxruntime-web@$VERSION" >/dev/null && tar xzf "onnxruntime-web-$VERSION.tgz")
rm -rf "$DEST" && mkdir -p "$DEST"
cp "$WORK/package/dist/ort.wasm.bundle.min.mjs" "$WORK/package/dist/ort-wasm-simd-threaded.wasm" "$DEST/"
# The npm package declares "license": "MIT" but ships no licence file; this is the
# text of the LICENSE file of the onnxruntime repository it is built from.
cp "$HERE/ONNXRUNTIME_LICENSE" "$DEST/LICENSE"
echo "$VERSION" > "$DEST/VERSION"
(cd "$DEST" && sha256sum ort.wasm.bundle.min.mjs ort-wasm-simd-threaded.wasm > SHA256SUMS)
du -sh "$DEST"
