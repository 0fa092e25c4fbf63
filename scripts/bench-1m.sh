#!/usr/bin/env bash
# hoard with 1 million stored blobs (issue 4): fill rate, idle RSS, disk use, FindMissingBlobs
# latency, restart time (clean and after SIGKILL, with the crash clean-up pass), gc eviction
# throughput and background eviction between watermarks. Builds nothing: first
# `cargo build --release --workspace` (the server and the load generator, bench/).
#
#   scripts/bench-1m.sh [HOARD_BINARY]        (default: target/release/hoard)
#
# Environment: HOARD_BENCH (the load generator, default: hoard-bench beside HOARD_BINARY), BLOBS (small blobs to store, default 1000000, a multiple of PER_STEP),
# PER_STEP (small blobs per fill step, 1000), LARGE_EVERY (one 64 KiB..1 MiB file blob every
# this many steps, 1; 0 for none), CONCURRENCY (fill callers, 4), SEED (42), PARENT (where the
# data dir is made, /tmp), KEEP=1 (keep the data dir and logs), COLD=1 (also time a restart
# with the page cache dropped: needs root, and slows everything else on the machine briefly).
# Progress goes to stderr, the figures and a summary to stdout. Needs python3 (JSON parsing).
set -euo pipefail
HOARD=$(realpath "${1:-target/release/hoard}")
HOARD_BENCH=${HOARD_BENCH:-$(dirname "$HOARD")/hoard-bench}
BLOBS=${BLOBS:-1000000}
PER_STEP=${PER_STEP:-1000}
LARGE_EVERY=${LARGE_EVERY:-1}
CONCURRENCY=${CONCURRENCY:-4}
SEED=${SEED:-42}
PARENT=${PARENT:-/tmp}
STEPS=$((BLOBS / PER_STEP))
[ $((STEPS * PER_STEP)) -eq "$BLOBS" ] || { echo "BLOBS must be a multiple of PER_STEP" >&2; exit 2; }
[ -x "$HOARD" ] || { echo "no hoard binary at $HOARD (build with cargo build --release --workspace)" >&2; exit 2; }
[ -x "$HOARD_BENCH" ] || { echo "no hoard-bench binary at $HOARD_BENCH (build with cargo build --release --workspace)" >&2; exit 2; }

WORK=$(mktemp -d "$PARENT/hoard-1m.XXXXXX")
DATA=$WORK/data
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=grpc://127.0.0.1:$PORT
PID=
RUN=0
cleanup() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then kill -TERM "$PID"; wait "$PID" || true; fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

log() { echo "[$(date +%T)] $*" >&2; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$(now)"; }
rss_mib() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$PID/status"; }
# Seconds from $1 (epoch) to the tracing timestamp of the first log line matching $2 in $3.
log_at() {
    python3 - "$1" "$2" "$3" <<'EOF'
import datetime, re, sys
t0, pattern, path = float(sys.argv[1]), sys.argv[2], sys.argv[3]
for line in open(path, errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if pattern in line:
        stamp = line.split()[0].rstrip("Z")
        head, _, frac = stamp.partition(".")
        t = datetime.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
        print("%.3f" % (t.timestamp() + float("0." + (frac or "0")) - t0))
        break
EOF
}
# Waits (up to $3 s) for a log line matching $1 in $2.
wait_log() {
    local i
    for i in $(seq $(($3 * 20))); do grep -q "$1" "$2" && return 0; sleep 0.05; done
    echo "timed out waiting for '$1' in $2" >&2; tail -5 "$2" >&2; exit 1
}

# Starts the server (optionally with config $1); sets PID, LOG and STARTUP (s to "hoard is serving").
start() {
    RUN=$((RUN + 1))
    LOG=$WORK/server-$RUN.log
    local t0 cfg=()
    [ $# -gt 0 ] && cfg=(--config "$1")
    t0=$(now)
    "$HOARD" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" "${cfg[@]}" 2>"$LOG" &
    PID=$!
    wait_log "hoard is serving" "$LOG" 600
    STARTUP=$(log_at "$t0" "hoard is serving" "$LOG")
}
# SIGTERM and wait; sets SHUTDOWN (s until the process exited).
stop() {
    local t0
    t0=$(now)
    kill -TERM "$PID"
    wait "$PID" || true
    SHUTDOWN=$(since "$t0")
    PID=
}
stats() { "$HOARD" stats --server "$URL" --json; }
bench() { "$HOARD_BENCH" --target "$URL" --server-pid "$PID" --seed "$SEED" --json "$@"; }
# FindMissingBlobs of 1000 digests, $1 of them among the stored fill blobs, at concurrency $2.
find_missing() {
    local out
    out=$(bench --duration 10s --concurrency "$2" find-missing --digests 1000 \
        --present-fraction "$1" --from-fill "$BLOBS" 2>/dev/null) || true
    echo "$out" >"$WORK/fm-$RUN-$1-$2.json"
    echo "$out" | json '("%d of %d calls FAILED (%s) " % (d["error_count"], d["total"]["ok"] + d["total"]["errors"], d["first_errors"][:1]) if d["error_count"] else "") + "%8.0f calls/s  p50 %6.2f ms  p90 %6.2f ms  p99 %6.2f ms  server CPU %4.0f us/call" % (d["total"]["ops_per_sec"], d["total"]["latency_ms"]["p50"], d["total"]["latency_ms"]["p90"], d["total"]["latency_ms"]["p99"], d["server"]["cpu_ms_per_op"]*1000)'
}

GIB=$((1 << 30))
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem/ {print $2}') GiB; data dir on $(df -T "$PARENT" | awk 'NR==2 {print $2}')"
echo "== hoard: $HOARD ($("$HOARD" --version)); load generator: $HOARD_BENCH"
echo "== $BLOBS small blobs (100 B - 16 KiB, half < 1 KiB) in steps of $PER_STEP, $([ "$LARGE_EVERY" -gt 0 ] && echo "$((STEPS / LARGE_EVERY)) file blobs (64 KiB - 1 MiB)" || echo "no file blobs"), $CONCURRENCY callers, seed $SEED"

# 1. Fill.
start
log "server up (pid $PID); filling"
FILL=$(bench --count "$STEPS" --concurrency "$CONCURRENCY" --connections 2 \
    fill --blobs "$PER_STEP" --large-every "$LARGE_EVERY")
echo "$FILL" >"$WORK/fill.json"
echo
echo "## fill"
echo "$FILL" | json '"%.1f s, %.0f blobs/s, %.1f MB/s, %d RPCs (%d failed), BatchUpdateBlobs p50 %.1f ms p99 %.1f ms; server CPU %.1f s (%.0f us/blob), wrote %.2f GB to disk, peak RSS %.0f MiB" % (d["elapsed_secs"], '"$BLOBS"' / d["elapsed_secs"], d["total"]["mb_per_sec"], d["total"]["ok"] + d["total"]["errors"], d["total"]["errors"], d["kinds"][0]["latency_ms"]["p50"], d["kinds"][0]["latency_ms"]["p99"], d["server"]["cpu_secs"], d["server"]["cpu_secs"] * 1e6 / '"$BLOBS"', (d["server"]["disk_write_bytes"] or 0) / 1e9, d["server"]["peak_rss_bytes"] / 2**20)'
FILL_SECS=$(echo "$FILL" | json 'd["elapsed_secs"]')

# 2. Use every blob once more (the same fill again: each BatchUpdateBlobs entry is now only a use,
# as when builds touch the whole cache), then action-cache calls for 65 s, across the next
# once-a-minute persist of last-use times: it writes an atime entry per used blob.
FILLED_RSS=$(rss_mib)
# Idle means a few seconds without calls: the allocator hands freed pages back as workers park.
sleep 5
SETTLED_RSS=$(rss_mib)
log "the same blobs again (uses only)"
AGAIN=$(bench --count "$STEPS" --concurrency "$CONCURRENCY" --connections 2 \
    fill --blobs "$PER_STEP" --large-every "$LARGE_EVERY")
echo
echo "## every blob used once more (the same fill again), then action-cache calls for 65 s"
echo "$AGAIN" | json '"the same fill again: %.1f s, %.0f blobs/s, server CPU %.0f us/blob" % (d["elapsed_secs"], '"$BLOBS"' / d["elapsed_secs"], d["server"]["cpu_secs"] * 1e6 / '"$BLOBS"')'
log "UpdateActionResult/GetActionResult for 65 s (spans one last-use persist pass)"
AC=$(bench --duration 65s --concurrency 1 ac 2>/dev/null) || true
echo "$AC" >"$WORK/ac-after-fill.json"
echo "$AC" | json '"  ".join("%s: %d calls, p50 %.2f ms, p99 %.2f ms, max %.0f ms" % (k["kind"], k["ok"], k["latency_ms"]["p50"], k["latency_ms"]["p99"], k["latency_ms"]["max"]) for k in d["kinds"])'
echo "server RSS: $FILLED_RSS MiB right after the fill, $SETTLED_RSS MiB 5 s later, $(rss_mib) MiB now, peak (VmHWM) $(awk '/VmHWM/ {printf "%.0f", $2/1024}' /proc/$PID/status) MiB"
log "idle 10 s"
sleep 10
echo
echo "## idle 10 s later"
echo "server RSS: $(rss_mib) MiB (peak $(awk '/VmHWM/ {printf "%.0f", $2/1024}' /proc/$PID/status) MiB)"
STATS=$(stats)
echo "$STATS" >"$WORK/stats-filled.json"
echo "$STATS" | json '"hoard stats: blobs %d, blob_bytes %.2f GB, used_bytes %.2f GB, disk_bytes %.2f GB" % (d["blobs"], d["blob_bytes"]/1e9, d["used_bytes"]/1e9, d["disk_bytes"]/1e9)'
echo "du -sh data dir: $(du -sh "$DATA" | cut -f1) (sled $(du -sh "$DATA/sled" | cut -f1), cas files $(du -sh "$DATA/cas" | cut -f1))"
STORED=$(echo "$STATS" | json 'd["blobs"]')
USED=$(echo "$STATS" | json 'd["used_bytes"]')
IDLE_RSS=$(rss_mib)

# 3. FindMissingBlobs with 1M stored.
echo
echo "## FindMissingBlobs, 1000 digests (present ones drawn at random from the $BLOBS filled blobs)"
log "FindMissingBlobs"
echo "half present, concurrency 1:  $(find_missing 0.5 1)"
echo "all present, concurrency 1:   $(find_missing 1.0 1)"
echo "half present, concurrency 16: $(find_missing 0.5 16)"

# 4. Restarts.
echo
echo "## restarts"
log "clean restart"
stop
echo "graceful shutdown (SIGTERM to exit, incl. flush): $SHUTDOWN s"
start
CLEAN_START=$STARTUP
echo "clean restart (first since the fill): $STARTUP s from exec to 'hoard is serving'"
sleep 10
RESTART_RSS=$(rss_mib)
echo "idle RSS after the restart (before any request): $RESTART_RSS MiB"
echo "FindMissingBlobs after the restart, half present, concurrency 1: $(find_missing 0.5 1)"
echo "idle RSS after those calls: $(rss_mib) MiB"
log "SIGKILL restart"
kill -KILL "$PID"
{ wait "$PID"; } 2>/dev/null || true
start
KILL_START=$STARTUP
echo "restart after SIGKILL (second since the fill): $STARTUP s from exec to 'hoard is serving'"
T0=$(now)
wait_log "cleanup after an unclean shutdown" "$LOG" 900
CLEANUP=$(grep "cleanup after an unclean shutdown" "$LOG" | sed 's/\x1b\[[0-9;]*m//g' | grep -o 'took_ms=[0-9]*' | cut -d= -f2)
echo "crash clean-up pass: ${CLEANUP} ms in the background ($(grep "cleanup after an unclean shutdown" "$LOG" | sed 's/\x1b\[[0-9;]*m//g' | grep -o 'pieces=[0-9]*'))"
echo "RSS after the clean-up pass: $(rss_mib) MiB"
stop
COLD_START=
if [ "${COLD:-0}" = 1 ]; then
    sync
    echo 1 >/proc/sys/vm/drop_caches
    start
    COLD_START=$STARTUP
    echo "clean restart with the page cache dropped: $STARTUP s"
    stop
fi

# 5. Eviction by gc, down to half the used bytes.
cat >"$WORK/retention.toml" <<EOF
[storage]
min_retention = "1s"
EOF
start "$WORK/retention.toml"
GC_START=$STARTUP
log "gc to half"
sleep 2
HALF=$((USED / 2))
T0=$(now)
GC=$("$HOARD" gc --server "$URL" --target "$HALF" --json)
GC_SECS=$(since "$T0")
echo "$GC" >"$WORK/gc.json"
echo
echo "## eviction: hoard gc --target $HALF (half of used_bytes), min_retention 1s"
echo "(server restarted with min_retention 1s: $GC_START s)"
echo "$GC" | json '"%.2f s: evicted %d blobs, %.2f GB (%.0f blobs/s, %.0f MB/s); used_bytes after %.2f GB, reached_target %s" % ('"$GC_SECS"', d["evicted_blobs"], d["evicted_bytes"]/1e9, d["evicted_blobs"]/'"$GC_SECS"', d["evicted_bytes"]/1e6/'"$GC_SECS"', d["used_bytes"]/1e9, d["reached_target"])'
sleep 5
echo "RSS after gc: $(rss_mib) MiB"
echo "FindMissingBlobs after gc, half present, concurrency 1: $(find_missing 0.5 1)"
stats | json '"hoard stats: blobs %d, used_bytes %.2f GB, disk_bytes %.2f GB" % (d["blobs"], d["used_bytes"]/1e9, d["disk_bytes"]/1e9)'
echo "du -sh data dir: $(du -sh "$DATA" | cut -f1)"
stop

# 6. Background eviction: max_size at 70% of what is stored now; the server evicts from the
# high watermark (95%) down to the low one (90%) by itself.
USED2=$(echo "$GC" | json 'd["used_bytes"]')
MAX=$((USED2 * 7 / 10))
cat >"$WORK/bounded.toml" <<EOF
[storage]
min_retention = "1s"
max_size = "${MAX}B"
EOF
start "$WORK/bounded.toml"
log "background eviction"
wait_log "evicted least recently used blobs" "$LOG" 600
LINE=$(grep "evicted least recently used blobs" "$LOG" | head -1 | sed 's/\x1b\[[0-9;]*m//g')
EB=$(echo "$LINE" | grep -o ' blobs=[0-9]*' | cut -d= -f2)
EBY=$(echo "$LINE" | grep -o ' bytes=[0-9]*' | cut -d= -f2)
EMS=$(echo "$LINE" | grep -o 'took_ms=[0-9]*' | cut -d= -f2)
echo
echo "## background eviction: max_size $MAX B (70% of $USED2 used), watermarks 95/90%"
echo "restart (first since gc): $STARTUP s; first pass evicted $EB blobs, $EBY B in $EMS ms ($(python3 -c "print('%.0f blobs/s, %.0f MB/s' % ($EB/max($EMS,1)*1000, $EBY/1e3/max($EMS,1)))"))"
stats | json '"hoard stats: blobs %d, used_bytes %.2f GB (low watermark %.2f GB), evicted_blobs %d" % (d["blobs"], d["used_bytes"]/1e9, d["max_size"]*0.9/1e9, d["evicted_blobs"])'
stop

echo
echo "== summary"
echo "fill: $BLOBS small blobs in ${FILL_SECS%.*} s; $STORED blobs stored, used_bytes $USED"
echo "idle RSS: $FILLED_RSS MiB right after the fill, $SETTLED_RSS MiB 5 s later, $IDLE_RSS MiB after every blob was used again, $RESTART_RSS MiB after a restart ($(python3 -c "print('%.0f' % ($RESTART_RSS * 2**20 / $STORED))") B per blob, empty-server baseline included)"
echo "restart: clean $CLEAN_START s, after SIGKILL $KILL_START s (+ $CLEANUP ms clean-up in the background)${COLD_START:+, cold page cache $COLD_START s}"
echo "gc to half: $GC_SECS s"
