#!/usr/bin/env bash
# The end-to-end benchmark suite in one command: builds the release binaries, installs the
# Automerge reference server (npm ci), and runs both side by side. Arguments go to
# syncline-bench (e.g. --scale full --json result.json).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p syncline-hub -p syncline-edge -p syncline-bench
npm ci --prefix bench/reference --no-audit --no-fund
exec target/release/syncline-bench --reference "$@"
