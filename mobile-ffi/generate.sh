#!/usr/bin/env bash
# Builds syncline-ffi and generates its bindings with uniffi-bindgen in library mode (the
# bindings are read from the built library's metadata, so they always match the Rust surface).
#
#   mobile-ffi/generate.sh            Kotlin and Swift into mobile-ffi/bindings/ (committed)
#   mobile-ffi/generate.sh DIR LANG…  the given languages (kotlin, swift, python) into DIR/LANG
#
# `--no-format`: ktlint and swift-format are not installed here. The test suite regenerates
# Kotlin and Swift and fails if they differ from the committed ones: run this script then.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

out="${1:-mobile-ffi/bindings}"
shift || true
languages=("$@")
if [ ${#languages[@]} -eq 0 ]; then
    languages=(kotlin swift)
fi

cargo build -p syncline-ffi --lib --bin uniffi-bindgen
target="$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
lib="$target/debug/libsyncline_ffi.so"
bindgen="$target/debug/uniffi-bindgen"

for language in "${languages[@]}"; do
    rm -rf "${out:?}/$language"
    "$bindgen" generate --library "$lib" --language "$language" --no-format \
        --out-dir "$out/$language"
done
# The Python module loads the library from its own folder.
if [ -d "$out/python" ]; then
    cp "$lib" "$out/python/"
fi
