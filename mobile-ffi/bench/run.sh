#!/usr/bin/env bash
# The mobile library's numbers for docs/BENCHMARKS.md: the size of the release library
# (x86_64-linux, stripped), then bench.py (open time, idle memory) through the Python bindings
# over the release library, against a local syncline-hub.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

cargo build --release -p syncline-ffi --lib --no-default-features --features encryption
cargo build -p syncline-ffi -p syncline-hub   # the bindings generator, and a hub to sync with
target="$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
lib="$target/release/libsyncline_ffi.so"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cp "$lib" "$out/unstripped.so"
strip -o "$out/libsyncline_ffi.so" "$lib"
gzip -9 -c "$out/libsyncline_ffi.so" > "$out/lib.gz"
echo "library (release, x86_64-linux): $(stat -c %s "$lib") bytes as built (debug = 1)," \
     "$(stat -c %s "$out/libsyncline_ffi.so") stripped, $(stat -c %s "$out/lib.gz") gzip -9"

"$target/debug/uniffi-bindgen" generate --library "$lib" --language python --no-format \
    --out-dir "$out" >/dev/null
python3 "$root/mobile-ffi/bench/bench.py" "$out" "$target/debug/syncline-hub"
