#!/usr/bin/env bash
# Serves the inventory board on http://127.0.0.1:${PORT:-8080}/examples/web-board/ (building
# the browser package first if it is not built).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f wasm/pkg/syncline_wasm_bg.wasm ] || wasm/build.sh
port=${PORT:-8080}
echo "open http://127.0.0.1:$port/examples/web-board/?hub=ws://127.0.0.1:4480/v1/sync&key=HUB_KEY"
exec python3 -m http.server --bind 127.0.0.1 "$port"
