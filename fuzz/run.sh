#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each, one after the other, with the
# committed corpus as seeds and a scratch directory for what the fuzzer adds (the committed
# corpus stays seeds and regressions). Prints one line per target; exits non-zero on a crash,
# leaving the input in fuzz/artifacts/TARGET/. Needs the nightly toolchain and cargo-fuzz
# (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo +nightly fuzz build -O >/dev/null
status=0
for t in wire verify hub_session replica_session ops apply; do
  mkdir -p "$scratch/$t"
  log="$scratch/$t.log"
  if cargo +nightly fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see fuzz/artifacts/$t/; add the input to corpus/$t/regressions/)"
    status=1
    tail -40 "$log" >&2
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo '?')
  echo "$t: ${secs} s, $runs inputs, coverage $cov edges, $result"
done
exit $status
