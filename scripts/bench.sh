#!/usr/bin/env bash
# Measures hoard on this machine: the machine's own ceilings, then large and small calls
# against a fresh release server on 127.0.0.1, driven by the load generator `hoard-bench` (the
# workspace member in bench/). Figures go to stdout; BENCHMARKS.md records them.
#   scripts/bench.sh [DATA_PARENT_DIR]     (default: a temp dir under /tmp)
# Environment: HOARD, the server binary to measure (default: target/release/hoard, built here;
# e.g. an older release binary to compare with, driven by the same hoard-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --workspace
HOARD=${HOARD:-target/release/hoard}
BENCH=target/release/hoard-bench
PARENT=${1:-/tmp}
DATA=$(mktemp -d "$PARENT/hoard-bench.XXXXXX")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$HOARD" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA/data" 2>"$DATA/server.log" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

run() { echo; echo "\$ hoard-bench $*"; "$BENCH" --target "grpc://127.0.0.1:$PORT" --server-pid "$PID" "$@"; }

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem/ {print $2}') GiB"
echo; echo "\$ hoard-bench ceilings --dir $PARENT --size 1GiB"
"$BENCH" ceilings --dir "$PARENT" --size 1GiB
echo; echo "idle server RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$PID/status)"

run --count 3 write-large --size 1GiB
run --count 3 write-large --size 1GiB --chunk-size 64KiB
run --count 5 read-large --size 1GiB
run --count 1 write-large --size 4GiB
run --count 1 read-large --size 4GiB
run --duration 10s --concurrency 1 find-missing --digests 1000
run --duration 10s --concurrency 16 find-missing --digests 1000
run --duration 10s --concurrency 1 ac
run --duration 10s --concurrency 16 ac
run --duration 10s --concurrency 1 batch-update --blobs 100 --blob-size 10KiB
run --duration 10s --concurrency 1 batch-read --blobs 100 --blob-size 10KiB
run --duration 10s --concurrency 16 batch-update --blobs 100 --blob-size 10KiB
run --duration 10s --concurrency 16 batch-read --blobs 100 --blob-size 10KiB
run --duration 10s --concurrency 8 --connections 2 mix
