#!/usr/bin/env bash
# A walkthrough of Syncline on one machine: a hub, two gateways, sensor readings written on
# one and watched on the other, one gateway taken offline and brought back.
#
#   examples/gateway-walkthrough.sh            # builds the binaries (debug) and runs
#   SYNCLINE_BIN=target/release examples/gateway-walkthrough.sh
#
# Everything lives in a temporary directory and every process is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${SYNCLINE_BIN:-target/debug}
if [ -z "${SYNCLINE_BIN:-}" ]; then
  echo "== building syncline-hub and syncline-edge"
  cargo build -q -p syncline-hub -p syncline-edge
fi
hub="$bin/syncline-hub"
edge="$bin/syncline-edge"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Waits until FILE has a line matching PATTERN (10 s at most), then prints that line.
wait_line() {
  for _ in $(seq 100); do
    if grep -m1 "$2" "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2
  return 1
}

field() { sed -n "s/.*\"$1\": *\"\\([^\"]*\\)\".*/\\1/p"; }

echo "== 1. a hub on its embedded SQLite store"
"$hub" run --data "$work/hub" --listen 127.0.0.1:0 >"$work/hub.out" 2>"$work/hub.log" &
pids+=($!)
line=$(wait_line "$work/hub.out" "listening on")
echo "   $line"
hub_addr=$(echo "$line" | awk '{print $3}')
fingerprint=$(echo "$line" | awk '{print $5}')

echo "== 2. two gateways, granted on the hub"
start_gateway() { # name
  "$edge" run --data "$work/$1" --api 127.0.0.1:0 >"$work/$1.out" 2>"$work/$1.log" &
  pids+=($!)
  wait_line "$work/$1.out" "api on" >/dev/null
}
for g in north south; do
  key=$("$edge" init --data "$work/$g" --hub "$hub_addr" --hub-fingerprint "$fingerprint" --json \
        | field public_key)
  "$hub" grant --data "$work/hub" "$key" "" rw >/dev/null
  echo "   gateway $g: key $key"
  start_gateway $g
done
north="--data $work/north"
south="--data $work/south"
"$edge" subscribe $south "sensors/" >/dev/null

echo "== 3. north writes sensor readings; south watches them arrive"
"$edge" watch $south sensors/hall >"$work/watch.out" 2>/dev/null &
pids+=($!)
"$edge" put $north sensors/hall --ops '[{"op":"put","path":["temp"],"value":21.5},
  {"op":"put","path":["readings"],"value":{"$counter":0}}]' >/dev/null
for t in 21.7 22.0 22.4; do
  "$edge" put $north sensors/hall --ops "[{\"op\":\"put\",\"path\":[\"temp\"],\"value\":$t},
    {\"op\":\"increment\",\"path\":[\"readings\"],\"by\":1}]" >/dev/null
done
wait_line "$work/watch.out" '"origin":"remote"' >/dev/null
for _ in $(seq 100); do
  "$edge" get $south sensors/hall | grep -q '"readings": *3' && break
  sleep 0.1
done
echo "   south sees: $("$edge" get $south sensors/hall | tr -d '\n' | tr -s ' ')"
echo "   south's watch received $(grep -c '"origin":"remote"' "$work/watch.out") remote change events"

echo "== 4. south goes down; north keeps writing"
kill -TERM "${pids[2]}"   # the south daemon
wait "${pids[2]}" 2>/dev/null || true
for t in 23.1 23.5; do
  "$edge" put $north sensors/hall --ops "[{\"op\":\"put\",\"path\":[\"temp\"],\"value\":$t},
    {\"op\":\"increment\",\"path\":[\"readings\"],\"by\":1}]" >/dev/null
done
echo "   north: $("$edge" get $north sensors/hall | tr -d '\n' | tr -s ' ')"

echo "== 5. south comes back, writes, and both converge"
start_gateway south
"$edge" put $south sensors/hall --ops '[{"op":"increment","path":["readings"],"by":1},
  {"op":"put","path":["note"],"value":"south was offline"}]' >/dev/null
converged=no
for _ in $(seq 200); do
  a=$("$edge" get $north sensors/hall | tr -d '\n' | tr -s ' ')
  b=$("$edge" get $south sensors/hall | tr -d '\n' | tr -s ' ')
  if [ "$a" = "$b" ] && echo "$a" | grep -q '"readings": 6'; then converged=yes; break; fi
  sleep 0.1
done
echo "   north: $a"
echo "   south: $b"
if [ "$converged" != yes ]; then
  echo "the gateways did not converge" >&2
  exit 1
fi
echo "== the same document, the same heads on both gateways: 6 readings, no write lost"
