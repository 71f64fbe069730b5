#!/usr/bin/env bash
# The engine benchmarks of docs/benchmarks.md ("Durable messages"): the memory engine against
# the file engine (--data-dir, --fsync batch) on direct messages, and start-up time with
# 1,000,000 retained messages. Loopback only; every server this script starts is stopped by
# its own PID.
#
# Needs: cargo build --release --bin wsrelay --example dm_bench
# Usage: benches/engine.sh [seconds per run, default 10] [data dir parent, default a mktemp dir]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
PARENT=${2:-$(mktemp -d)}
BIN=target/release/wsrelay
DM=target/release/examples/dm_bench
# Room for every queued message: the per-id and global bounds must not refuse any.
BOUNDS=(--offline-max 2000000 --offline-max-bytes 4G)

server_pid=
start() { # start ARGS...: a server on a free port; sets ADDR
  local out
  out=$(mktemp)
  "$BIN" serve --listen 127.0.0.1:0 "$@" >"$out" 2>/dev/null &
  server_pid=$!
  for _ in $(seq 1 600); do # up to 60 s: start-up reads the whole log
    ADDR=$(awk '/listening/{print $4; exit}' "$out")
    [ -n "$ADDR" ] && return 0
    sleep 0.1
  done
  echo "server did not start" >&2
  exit 1
}
stop() { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
trap stop EXIT
metric() { curl -s "http://$ADDR/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

for mode in live queued; do
  echo "== $mode, memory engine"
  start "${BOUNDS[@]}"
  "$DM" "$ADDR" "$mode" --conns 100 --window 16 --seconds "$SECS"
  stop
  echo "== $mode, file engine, --fsync batch"
  rm -rf "$PARENT/data-$mode"
  start "${BOUNDS[@]}" --data-dir "$PARENT/data-$mode" --fsync batch
  "$DM" "$ADDR" "$mode" --conns 100 --window 16 --seconds "$SECS"
  echo "fsync: $(metric wsrelay_engine_fsync_seconds_count) fsyncs, $(metric wsrelay_engine_fsync_seconds_sum) s in all"
  stop
done

echo "== start-up with 1,000,000 retained messages"
rm -rf "$PARENT/data-1m"
start "${BOUNDS[@]}" --data-dir "$PARENT/data-1m" --fsync never
"$DM" "$ADDR" queued --conns 100 --window 64 --messages 10000
echo "retained: $(metric wsrelay_engine_messages) messages, $(metric wsrelay_engine_disk_bytes) bytes on disk"
kill -9 "$server_pid"
wait "$server_pid" 2>/dev/null || true
t0=$(date +%s.%N)
start "${BOUNDS[@]}" --data-dir "$PARENT/data-1m"
t1=$(date +%s.%N)
echo "restart to listening: $(echo "$t1 - $t0" | bc) s; the engine's own count: $(metric wsrelay_engine_startup_seconds) s for $(metric wsrelay_engine_startup_records) records; retained $(metric wsrelay_engine_messages); RSS $(awk '/VmRSS/{print $2, $3}' /proc/$server_pid/status)"
stop
