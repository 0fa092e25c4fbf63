#!/usr/bin/env bash
# What metrics cost: server CPU per call with `[telemetry] metrics = true` (the default) and with
# `metrics = false`, on the small-call workloads where a per-call cost shows most:
#   ac               UpdateActionResult + GetActionResult of a new action (3 outputs)
#   find-missing 1   FindMissingBlobs of 1 digest (per-call cost dominates)
#   find-missing 1000  FindMissingBlobs of 1000 digests (the usual Bazel batch)
# Two release servers on 127.0.0.1 run side by side (one each way, each on its own data dir), and
# each workload is run against one then the other, ROUNDS times, the order swapped every round,
# so drift of this noisy shared machine falls on both alike. hoard-bench reads each server's CPU
# from /proc during the timed phase; the figure is server CPU per RPC, median over the rounds.
#   scripts/bench-metrics.sh                      (ROUNDS=5 DURATION=8s CONCURRENCY=8 by default)
#   ROUNDS=9 DURATION=10s scripts/bench-metrics.sh
# Prints one line per run, then a Markdown table to paste into BENCHMARKS.md ("Metrics").
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8s}
CONCURRENCY=${CONCURRENCY:-8}
cargo build --release --quiet --workspace
HOARD=target/release/hoard
BENCH=target/release/hoard-bench
DATA=$(mktemp -d /tmp/hoard-bench-metrics.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$DATA"' EXIT


free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A PORT PID
start() { # MODE (on|off)
  local port ops
  port=$(free_port)
  ops=$(free_port)
  local enabled=true
  [ "$1" = off ] && enabled=false
  printf 'ops_listen = "127.0.0.1:%s"\n[telemetry]\nmetrics = %s\n' "$ops" "$enabled" >"$DATA/$1.toml"
  "$HOARD" serve --config "$DATA/$1.toml" --listen "127.0.0.1:$port" \
    --data-dir "$DATA/data-$1" 2>"$DATA/server-$1.log" &
  PID[$1]=$!
  PIDS+=("$!")
  PORT[$1]=$port
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  # The switch took: /metrics is served with metrics on, 404 with them off.
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ops/metrics" || true)
  echo "== metrics $1: pid ${PID[$1]}, port $port, GET /metrics -> $code" >&2
}

WORKLOADS=("ac" "find-missing --digests 1" "find-missing --digests 1000")

# run MODE WORKLOAD...: one timed run; appends "workload<TAB>mode<TAB>µs per RPC<TAB>calls/s".
run() {
  local mode=$1
  shift
  "$BENCH" --target "grpc://127.0.0.1:${PORT[$mode]}" --server-pid "${PID[$mode]}" --json \
    --duration "$DURATION" --concurrency "$CONCURRENCY" "$@" 2>/dev/null >"$DATA/run.json" || true
  python3 - "$*" "$mode" "$DATA/run.json" <<'PY' | tee -a "$DATA/results.tsv"
import json, sys
name, mode, path = sys.argv[1:]
r = json.load(open(path))
s = r.get("server") or {}
us = 1000 * (s.get("cpu_ms_per_op") or float("nan"))
t = r["total"]
if t["errors"]:
    sys.stderr.write("%s (%s): %d errors, first: %s\n" % (name, mode, t["errors"], r["first_errors"][:1]))
print("%s\t%s\t%.2f\t%.0f" % (name, mode, us, t["ops_per_sec"]))
PY
}

echo "== $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" >&2
start on
start off
: >"$DATA/results.tsv"
for round in $(seq "$ROUNDS"); do
  if ((round % 2)); then order=(on off); else order=(off on); fi
  for w in "${WORKLOADS[@]}"; do
    for mode in "${order[@]}"; do
      # shellcheck disable=SC2086 # the workload's words are its arguments
      run "$mode" $w >/dev/null
      tail -n1 "$DATA/results.tsv" | awk -F'\t' -v r="$round" \
        '{ printf "round %s  %-28s metrics %-3s  %8.2f µs server CPU per RPC  %8.0f calls/s\n", r, $1, $2, $3, $4 }' >&2
    done
  done
done

python3 - "$DATA/results.tsv" "$ROUNDS" "$DURATION" "$CONCURRENCY" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
rounds, duration, concurrency = sys.argv[2:]
by = {}
for name, mode, us, rate in rows:
    by.setdefault(name, {}).setdefault(mode, []).append((float(us), float(rate)))
print()
print("%s rounds of %s per run, concurrency %s; medians of server CPU per RPC (and calls/s)" % (rounds, duration, concurrency))
print()
print("| workload | metrics on | metrics off | overhead | rounds where on > off |")
print("|---|---|---|---|---|")
for name, modes in by.items():
    on = [u for u, _ in modes.get("on", [])]
    off = [u for u, _ in modes.get("off", [])]
    if not on or not off:
        continue
    m_on, m_off = statistics.median(on), statistics.median(off)
    r_on = statistics.median([r for _, r in modes["on"]])
    r_off = statistics.median([r for _, r in modes["off"]])
    worse = sum(1 for a, b in zip(on, off) if a > b)
    print("| %s | %.1f µs (%.0f/s) | %.1f µs (%.0f/s) | %+.1f%% | %d of %d |" % (
        name, m_on, r_on, m_off, r_off, 100 * (m_on - m_off) / m_off, worse, len(on)))
PY
