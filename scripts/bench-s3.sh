#!/usr/bin/env bash
# The object-store backends against sled, on this machine, with the load generator
# (BENCHMARKS.md, "Object-store backends"). The bucket is s3s-fs (S3 over a directory, the
# server the integration tests embed; examples/s3_bucket.rs), on loopback and sharing the cores with hoard, so the
# figures show what hoard adds per call and how a bucket's round trips change the latency,
# not what AWS S3 would take.
#
# Usage: scripts/bench-s3.sh HOARD HOARD_BENCH [DURATION]   (release builds; DURATION 10s)
#
# For each of sled, s3 and tiered (sled fast tier, write-through), one fresh server, then:
# FindMissingBlobs of 1000 digests (half present), UpdateActionResult+GetActionResult,
# GetActionResult alone, BatchUpdateBlobs and BatchReadBlobs of 100 x 10 KiB, ByteStream
# Write and Read of 64 MiB. Then the existence cache: s3 FindMissingBlobs of 1000 present
# digests with it on and off. Prints one table; server CPU is from /proc (--server-pid).
#
# Environment: KEEP_TMP=1. The bucket server is examples/s3_bucket.rs (built here, release).
set -uo pipefail

die() { echo "bench-s3: error: $*" >&2; exit 2; }
[ $# -ge 2 ] || { echo "usage: $0 HOARD HOARD_BENCH [DURATION]" >&2; exit 2; }
HOARD=$(realpath "$1") BENCH=$(realpath "$2") DURATION=${3:-10s}
[ -x "$HOARD" ] && [ -x "$BENCH" ] || die "hoard or hoard-bench binary missing"
cd "$(dirname "$0")/.."
cargo build -q --release --example s3_bucket || die "building examples/s3_bucket.rs failed"
S3S=$PWD/target/release/examples/s3_bucket

TMP=$(mktemp -d "${TMPDIR:-/tmp}/hoard-bench-s3.XXXXXX") || die "mktemp failed"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  [ "${KEEP_TMP:-0}" = 1 ] && echo "bench-s3: keeping $TMP" >&2 || rm -rf "$TMP"
}
trap cleanup EXIT
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
wait_port() {
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  return 1
}

S3_PORT=$(free_port)
mkdir -p "$TMP/s3/bench"
"$S3S" "$TMP/s3" "$S3_PORT" bench bench-secret >"$TMP/s3s.log" 2>&1 &
PIDS+=($!)
S3S_PID=$!
wait_port "$S3_PORT" || die "s3s-fs did not start"
# CPU seconds the bucket server has used so far.
bucket_cpu() { python3 -c "import os; f = open('/proc/$S3S_PID/stat').read().rsplit(')', 1)[1].split(); print((int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK'))"; }
printf '[default]\naws_access_key_id = bench\naws_secret_access_key = bench-secret\n' >"$TMP/keys"

config() { # NAME BACKEND [EXTRA TOML]
  cat >"$TMP/$1.toml" <<EOF
[storage]
backend = "$2"
[storage.s3]
bucket = "bench"
prefix = "$1"
endpoint = "http://127.0.0.1:$S3_PORT"
allow_http = true
credentials_file = "$TMP/keys"
${3:-}
EOF
}

SERVER=
serve() { # NAME
  [ -n "$SERVER" ] && { kill "$SERVER"; wait "$SERVER" 2>/dev/null; }
  PORT=$(free_port)
  "$HOARD" serve --config "$TMP/$1.toml" --listen "127.0.0.1:$PORT" --data-dir "$TMP/data-$1" \
    >"$TMP/$1.log" 2>&1 &
  SERVER=$!
  PIDS+=("$SERVER")
  wait_port "$PORT" || die "hoard ($1) did not start; see $TMP/$1.log"
}

ROWS="$TMP/rows.jsonl"
run() { # LABEL BACKEND WORKLOAD ARGS...
  local label=$1 backend=$2
  shift 2
  local before
  before=$(bucket_cpu)
  "$BENCH" --target "grpc://127.0.0.1:$PORT" --server-pid "$SERVER" --duration "$DURATION" --json "$@" \
    >"$TMP/out.json" 2>"$TMP/err.log" || { cat "$TMP/err.log" >&2; die "$label on $backend failed"; }
  python3 - "$label" "$backend" "$TMP/out.json" "$before" "$(bucket_cpu)" >>"$ROWS" <<'PYEOF'
import json, sys
label, backend, path, before, after = sys.argv[1:]
print(json.dumps({"label": label, "backend": backend, "report": json.load(open(path)),
                  "bucket_cpu": float(after) - float(before)}))
PYEOF
}

workloads() { # BACKEND
  run "FindMissingBlobs 1000 (half present)" "$1" find-missing --digests 1000
  run "Update+GetActionResult" "$1" ac
  run "GetActionResult (hit)" "$1" ac --hits 1000
  run "BatchUpdateBlobs 100 x 10 KiB" "$1" batch-update
  run "BatchReadBlobs 100 x 10 KiB" "$1" batch-read
  run "ByteStream Write 64 MiB" "$1" write-large --size 64MiB
  run "ByteStream Read 64 MiB" "$1" read-large --size 64MiB
}

config sled sled
config s3 s3
config tiered tiered "[storage.tiered]
fast = \"sled\""
config nocache s3 "existence_cache_entries = 0"
for b in sled s3 tiered; do
  serve "$b"
  echo "bench-s3: $b" >&2
  workloads "$b"
done
serve s3
run "FindMissingBlobs 1000 present, cache on" s3 find-missing --digests 1000 --present-fraction 1
serve nocache
run "FindMissingBlobs 1000 present, cache off" s3 find-missing --digests 1000 --present-fraction 1

# The table: the timed phase's calls (every call of the workload), latency, and CPU per call
# (per GiB for streams) of hoard and of the bucket server. The bucket's CPU includes the
# untimed set-up of read workloads (one upload), so it is an upper bound there.
python3 - "$ROWS" <<'PYEOF'
import json, sys
print("| workload | backend | calls/s | p50 ms | p99 ms | MB/s | hoard CPU | bucket CPU |")
print("|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    row = json.loads(line)
    r, server = row["report"], row["report"]["server"]
    t = r["total"]
    if r["workload"] in ("write-large", "read-large"):
        gib = t["bytes"] / 2**30
        hoard = f'{server["cpu_secs"] / gib:.2f} s/GiB'
        bucket = f'{row["bucket_cpu"] / gib:.2f} s/GiB'
    else:
        hoard = f'{server["cpu_ms_per_op"]:.3f} ms/call'
        bucket = f'{row["bucket_cpu"] * 1000 / max(t["ok"], 1):.3f} ms/call'
    lat = t["latency_ms"]
    print(f'| {row["label"]} | {row["backend"]} | {t["ops_per_sec"]:.0f} | {lat["p50"]:.2f} | '
          f'{lat["p99"]:.2f} | {t["mb_per_sec"]:.0f} | {hoard} | {bucket} |')
PYEOF
