#!/usr/bin/env bash
# Builds the npm package in wasm/: the engine compiled to WebAssembly (pkg/), its JS glue
# and TypeScript types (wasm-bindgen), size-optimized with wasm-opt (binaryen from npm).
# Works on a fresh machine of this kind: it installs what is missing (clang 19 for SQLite's C
# sources, the wasm32 target, the wasm-bindgen CLI matching Cargo.lock, the npm packages).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if ! command -v clang-19 >/dev/null 2>&1; then
  echo "== installing clang 19 (SQLite's C sources for wasm32)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-19 llvm-19 lld-19 >/dev/null
fi
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "== adding the wasm32-unknown-unknown target" >&2
  rustup target add wasm32-unknown-unknown
fi
want=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)
if ! wasm-bindgen --version 2>/dev/null | grep -q " $want\$"; then
  echo "== installing wasm-bindgen-cli $want (a few minutes)" >&2
  cargo install wasm-bindgen-cli --version "$want"
fi

echo "== cargo build (wasm32, profile wasm)" >&2
cargo build -p syncline-wasm --lib --target wasm32-unknown-unknown --profile wasm --locked
wasm="$root/target/wasm32-unknown-unknown/wasm/syncline_wasm.wasm"

echo "== wasm-bindgen" >&2
rm -rf wasm/pkg
wasm-bindgen --target web --out-dir wasm/pkg "$wasm"

cd wasm
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
  echo "== npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error
  touch node_modules
fi
echo "== wasm-opt -Oz" >&2
npx --no-install wasm-opt -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
  --enable-sign-ext --enable-mutable-globals --enable-reference-types \
  pkg/syncline_wasm_bg.wasm -o pkg/syncline_wasm_bg.opt.wasm
mv pkg/syncline_wasm_bg.opt.wasm pkg/syncline_wasm_bg.wasm
rm -f pkg/.gitignore pkg/package.json
raw=$(stat -c %s pkg/syncline_wasm_bg.wasm)
gz=$(gzip -9 -c pkg/syncline_wasm_bg.wasm | wc -c)
echo "built wasm/pkg: syncline_wasm_bg.wasm $raw bytes, $gz gzipped" >&2
