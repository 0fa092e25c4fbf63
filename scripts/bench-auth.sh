#!/usr/bin/env bash
# What authentication costs per call, and whether a flood of bad tokens slows good callers.
# A release server on 127.0.0.1 with [auth] (anonymous none, 32 tokens, so every check compares
# 32 hashes) is driven by `hoard-bench find-missing --digests 1` (one digest per call: the
# per-call cost dominates) from 8 good callers for 10 s:
#   1. against the same server without [auth] (the baseline);
#   2. with [auth], alone;
#   3. with [auth], beside a flood: 32 more callers with a wrong token, started first;
#   4. with [auth], beside 32 more callers with the good token (the same load, accepted).
# Everything (server, callers, flood) shares this machine's cores, so 3 and 4 show what the
# flood's own CPU takes; the question is whether refusing costs more than serving.
#   scripts/bench-auth.sh            (prints one line per run; BENCHMARKS.md records them)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --workspace
HOARD=target/release/hoard
BENCH=target/release/hoard-bench
DATA=$(mktemp -d /tmp/hoard-bench-auth.XXXXXX)
PID=""
trap '[ -n "$PID" ] && kill -TERM $PID 2>/dev/null; wait 2>/dev/null; rm -rf "$DATA"' EXIT

GOOD=$("$HOARD" token new | head -n1)
{
  printf '[auth]\nanonymous = "none"\n'
  for i in $(seq 31); do
    printf '[[auth.token]]\nname = "other-%s"\nhash = "%s"\ngrants = ["read:**"]\n' \
      "$i" "$("$HOARD" token new | sed -n 's/^hash = "\(.*\)"$/\1/p')"
  done
  printf '[[auth.token]]\nname = "bench"\nhash = "%s"\ngrants = ["write:**"]\n' \
    "$(printf '%s\n' "$GOOD" | "$HOARD" token hash)"
} >"$DATA/auth.toml"
: >"$DATA/open.toml"

start() { # CONFIG
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$HOARD" serve --config "$1" --listen "127.0.0.1:$PORT" --data-dir "$DATA/data-$PORT" 2>"$DATA/server.log" &
  PID=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
}
stop() { kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; PID=""; }

# good LABEL: the 8 good callers for 10 s, summarised on one line.
good() {
  "$BENCH" --target "grpc://127.0.0.1:$PORT" --server-pid "$PID" --token "$GOOD" --json \
    --duration 10s --concurrency 8 find-missing --digests 1 2>/dev/null >"$DATA/good.json" || true
  python3 - "$1" "$DATA/good.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
t = r["total"]; l = t["latency_ms"]; s = r.get("server") or {}
cpu = 100 * s.get("cpu_secs", 0) / r["elapsed_secs"]
print("%-46s %8.0f calls/s  p50 %.2f ms  p99 %.2f ms  errors %d  server CPU %.0f%%" % (
    sys.argv[1], t["ops_per_sec"], l["p50"], l["p99"], t["errors"], cpu))
PY
}

# flood TOKEN: 32 more callers for 14 s, in the background; prints its calls/s when done.
flood() {
  "$BENCH" --target "grpc://127.0.0.1:$PORT" --token "$1" --json --duration 14s \
    --concurrency 32 find-missing --digests 1 --present-fraction 0 >"$DATA/flood.json" 2>/dev/null &
  FLOOD=$!
  sleep 2
}
flood_done() { # LABEL
  wait "$FLOOD" || true
  python3 - "$1" "$DATA/flood.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
t = r["total"]
print("  %-44s %8.0f calls/s (%d ok, %d refused)" % (
    sys.argv[1], (t["ok"] + t["errors"]) / r["elapsed_secs"], t["ok"], t["errors"]))
PY
}

echo "== $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
start "$DATA/open.toml"
good "1. no [auth]"
stop
start "$DATA/auth.toml"
good "2. [auth], 32 tokens"
flood "not-a-token-$RANDOM"
good "3. [auth], beside a bad-token flood"
flood_done "the flood (wrong token)"
flood "$GOOD"
good "4. [auth], beside as many good callers"
flood_done "the extra good callers"
stop
