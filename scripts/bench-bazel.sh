#!/usr/bin/env bash
# Real-client benchmark (issue 14): a Bazel warm build from hoard against the same build from a
# local --disk_cache, same workspace, same flags, one run.
#
#   scripts/bench-bazel.sh [HOARD_BINARY]        (default: target/release/hoard)
#
# It generates a C++ workspace (LIBS cc_library targets of 2-4 sources each in layers of 15, each
# library depending on 2-4 of the layer below, seeded; 4 cc_binary on top), starts HOARD_BINARY on a
# temporary data dir (ops port on, for /metrics), and builds //... with Debian's Bazel 4.2.3
# (bazel-bootstrap, installed with apt if missing):
#   cold          empty cache, everything runs and fills it (once per backend);
#   warm          `bazel clean --expunge` first, so every action comes from the cache;
#   warm-minimal  the same with --remote_download_minimal (if Bazel accepts it with the disk cache);
#   warm-server   a plain `bazel clean` first: outputs gone, the Bazel server and its JIT-compiled
#                 code kept (after one untimed pair), so what is left is each cache's per-action cost.
# The warm phases repeat REPEATS times, interleaved (disk, hoard, disk, hoard, ...). Each warm run
# must be all cache hits (Bazel's "N processes: ... N remote/disk cache hit" line), else the script
# fails. Figures: wall time of `bazel build`, the execution phase ("Build artifacts" marker to the
# next one in --profile), and each action's cache check ("check cache hit" spans), cross-checked
# with hoard's hoard_request_duration_seconds{method="GetActionResult"} from /metrics; the CPU
# time of the Bazel server and of hoard over each build (/proc), and how idle the machine was.
# Bazel 4.2.3 takes --remote_download_minimal with only --disk_cache (if a Bazel refuses it, that
# phase is skipped for the disk cache and the summary says why), and counts disk cache hits as
# "remote cache hit" too.
#
# Environment: LIBS (150), REPEATS (10), JOBS (16), SEED (14), KEEP=1 (keep the temp dirs),
# BAZEL_ROOT_DIR (where Bazel's output root goes; /dev/shm if it is there, else the temp dir).
# Progress to stderr, the summary (markdown) to stdout. Needs python3, a C++ compiler. A benchmark,
# not part of scripts/test or CI.
set -euo pipefail
HOARD=$(realpath "${1:-target/release/hoard}")
LIBS=${LIBS:-150}
REPEATS=${REPEATS:-10}
JOBS=${JOBS:-16}
SEED=${SEED:-14}
HERE=$(cd "$(dirname "$0")" && pwd)
PY="$HERE/bench-bazel.py"
log() { echo "bench-bazel: $*" >&2; }
die() { log "error: $*"; exit 1; }
[ -x "$HOARD" ] || die "no hoard binary at $HOARD"
command -v python3 >/dev/null || die "python3 is required"

if ! command -v bazel >/dev/null; then
  [ "$(id -u)" -eq 0 ] || die "bazel is missing (apt-get install bazel-bootstrap needs root)"
  log "installing Debian's bazel-bootstrap"
  apt-get -o DPkg::Lock::Timeout=900 update >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y bazel-bootstrap >/dev/null
fi
BAZEL_VERSION=$(dpkg-query -W -f '${Version}' bazel-bootstrap 2>/dev/null || bazel --version)
log "Bazel $BAZEL_VERSION, $(nproc) cores, LIBS=$LIBS REPEATS=$REPEATS JOBS=$JOBS"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/hoard-bench-bazel.XXXXXX")
BROOT=""
SERVER_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$BROOT" ]; then (cd "$WS" && "${BAZEL[@]}" shutdown >/dev/null 2>&1) || true; fi
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    log "keeping $TMP ${BROOT:+and $BROOT}"
  else
    chmod -R u+w "$TMP" ${BROOT:+"$BROOT"} 2>/dev/null || true
    rm -rf "$TMP" ${BROOT:+"$BROOT"}
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
WS=$TMP/ws
RUNS=$TMP/runs
DISK_CACHE=$TMP/disk-cache
mkdir -p "$WS" "$RUNS" "$DISK_CACHE" "$TMP/hoard-data"
# Bazel's own output root (sandboxes and outputs: thousands of files made and deleted per build)
# goes on tmpfs when there is one with room (4 GiB free in it and 8 GiB of memory available: tmpfs
# is memory). On ext4 without a journal, as on this project's
# machines, every new inode is looked for past the inodes freed in the last minutes
# (recently_deleted), so a build's time depended on how recently the build before it had deleted
# its files: the second of two back-to-back cold builds was the slower whichever cache it used
# (BENCHMARKS.md). The two caches stay on disk, under TMP. BAZEL_ROOT_DIR=DIR puts it elsewhere.
if [ -z "${BAZEL_ROOT_DIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ] &&
  [ "$(df --output=avail -k /dev/shm 2>/dev/null | tail -n1)" -gt $((4 << 20)) ] 2>/dev/null &&
  [ "$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null)" -gt $((8 << 20)) ] 2>/dev/null; then
  BAZEL_ROOT_DIR=/dev/shm
fi
BROOT=$(mktemp -d "${BAZEL_ROOT_DIR:-$TMP}/hoard-bench-bazel-root.XXXXXX")
BAZEL=(bazel --nohome_rc --noworkspace_rc --output_user_root="$BROOT" --max_idle_secs=900)

# --- hoard ---------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
OPS=$(free_port)
printf 'ops_listen = "127.0.0.1:%s"\n' "$OPS" >"$TMP/hoard.toml"
"$HOARD" serve --config "$TMP/hoard.toml" --listen "127.0.0.1:$PORT" --data-dir "$TMP/hoard-data" >"$TMP/hoard.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 300); do
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$TMP/hoard.log" >&2; die "hoard exited"; }
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$OPS/readyz', timeout=1)" 2>/dev/null && break
  sleep 0.1
done
log "hoard $("$HOARD" --version 2>/dev/null | head -n1) on 127.0.0.1:$PORT (ops port $OPS)"
scrape() { python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$OPS/metrics', timeout=10).read().decode())" >"$1"; }

# --- workspace -----------------------------------------------------------------------------
# Bazel 4.x loads rules_cc, rules_java and remote_coverage_tools even for plain C++; offline,
# they are local stubs (the approach of scripts/bazel-e2e.sh).
mkdir -p "$WS"/stubs/{rules_cc/cc,rules_java/java,remote_coverage_tools}
cat >"$WS/WORKSPACE" <<'EOF'
workspace(name = "bench_bazel")
local_repository(name = "rules_cc", path = "stubs/rules_cc")
local_repository(name = "rules_java", path = "stubs/rules_java")
local_repository(name = "remote_coverage_tools", path = "stubs/remote_coverage_tools")
EOF
: >"$WS/BUILD"
echo stubs >"$WS/.bazelignore"
for r in rules_cc rules_java remote_coverage_tools; do
  echo "workspace(name = \"$r\")" >"$WS/stubs/$r/WORKSPACE"
  : >"$WS/stubs/$r/BUILD"
done
printf 'package(default_visibility = ["//visibility:public"])\nalias(name = "toolchain_type", actual = "@bazel_tools//tools/cpp:toolchain_type")\n' \
  >"$WS/stubs/rules_cc/cc/BUILD"
for n in cc_binary cc_import cc_library cc_proto_library cc_test cc_toolchain cc_toolchain_suite \
  fdo_prefetch_hints fdo_profile objc_import objc_library; do echo "$n = native.$n"; done >"$WS/stubs/rules_cc/cc/defs.bzl"
: >"$WS/stubs/rules_java/java/BUILD"
for n in java_binary java_import java_library java_lite_proto_library java_package_configuration \
  java_plugin java_proto_library java_runtime java_test java_toolchain; do echo "$n = native.$n"; done >"$WS/stubs/rules_java/java/defs.bzl"
printf '#!/bin/sh\nexit 1\n' >"$WS/stubs/remote_coverage_tools/none.sh"
chmod +x "$WS/stubs/remote_coverage_tools/none.sh"
printf 'package(default_visibility = ["//visibility:public"])\nsh_binary(name = "coverage_report_generator", srcs = ["none.sh"])\nsh_binary(name = "lcov_merger", srcs = ["none.sh"])\n' \
  >"$WS/stubs/remote_coverage_tools/BUILD"
log "workspace: $(python3 "$PY" gen "$WS" "$LIBS" "$SEED")"

# --- builds --------------------------------------------------------------------------------
COMMON=(--jobs="$JOBS" --noshow_progress --color=no --curses=no --experimental_repository_disable_download
  --repository_cache= --incompatible_strict_action_env --nosandbox_debug)
DISK=(--disk_cache="$DISK_CACHE")
HOARD_FLAGS=(--disk_cache= --remote_cache="grpc://127.0.0.1:$PORT" --remote_timeout=60)

# CPU seconds (user + system) a process has used so far, 0 if there is none.
cpu_s() {
  local ticks=0
  if [ -n "$1" ] && [ -r "/proc/$1/stat" ]; then
    ticks=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}') || ticks=0
  fi
  python3 -c "print(${ticks:-0} / $(getconf CLK_TCK))"
}
bazel_pid() { cat "$BROOT"/*/server/server.pid.txt 2>/dev/null | head -n1 || true; }

# build BACKEND PHASE N FLAGS...: one `bazel build //...` after `bazel clean --expunge` (a plain
# `bazel clean` for warm-server and its warm-up); its figures appended to runs.jsonl. A warm run
# that is not all cache hits fails the script.
build() {
  local backend=$1 phase=$2 n=$3 tag="$1-$2-$3" t0 t1 line clean=(--expunge) bp0 bp1 b0 b1 h0 h1 s0 s1
  shift 3
  case "$phase" in warm-server | warm-up) clean=() ;; esac
  (cd "$WS" && "${BAZEL[@]}" clean "${clean[@]}" --color=no) >"$RUNS/clean-$tag.log" 2>&1 || true
  if [ "$backend" = hoard ]; then scrape "$RUNS/before-$tag.prom"; fi
  bp0=$(bazel_pid)
  b0=$(cpu_s "$bp0")
  h0=$(cpu_s "$SERVER_PID")
  s0=$(head -n1 /proc/stat)
  t0=$(date +%s.%N)
  if ! (cd "$WS" && "${BAZEL[@]}" build "${COMMON[@]}" "$@" --profile="$RUNS/$tag.json.gz" //...) >"$RUNS/$tag.log" 2>&1; then
    tail -n 30 "$RUNS/$tag.log" >&2
    die "$tag: bazel build failed (log above)"
  fi
  t1=$(date +%s.%N)
  s1=$(head -n1 /proc/stat)
  bp1=$(bazel_pid)
  b1=$(cpu_s "$bp1")
  [ "$bp1" = "$bp0" ] || b0=0  # a new server: all its CPU is this build's
  h1=$(cpu_s "$SERVER_PID")
  if [ "$backend" = hoard ]; then
    scrape "$RUNS/after-$tag.prom"
    python3 "$PY" metrics "$RUNS/before-$tag.prom" "$RUNS/after-$tag.prom" "$RUNS/metrics-$phase-$n.json"
  fi
  line=$(grep -E '^INFO: [0-9]+ processes' "$RUNS/$tag.log" | tail -n1)
  if [ "$phase" != cold ]; then
    # "INFO: 160 processes: 107 remote cache hit, 53 internal.": every non-internal one a hit
    # (Bazel 4.2.3 counts disk cache hits as "remote cache hit" too).
    python3 - "$line" <<'EOF' || { grep -E 'WARNING|ERROR' "$RUNS/$tag.log" | head -n 5 >&2; die "$tag was not all cache hits: $line"; }
import re, sys
total, rest = re.match(r"INFO: (\d+) processes: (.*)\.$", sys.argv[1]).groups()
parts = {k: int(v) for v, k in (p.split(" ", 1) for p in rest.split(", "))}
hits = parts.pop("remote cache hit", 0) + parts.pop("disk cache hit", 0)
sys.exit(0 if hits > 0 and hits + parts.pop("internal", 0) == int(total) and not parts else 1)
EOF
  fi
  python3 "$PY" profile "$RUNS/$tag.json.gz" "$RUNS/$tag.prof.json"
  python3 - "$RUNS/$tag.prof.json" "$backend" "$phase" "$n" "$t0" "$t1" "$b0" "$b1" "$h0" "$h1" "$s0" "$s1" \
    >>"$RUNS/runs.jsonl" <<'EOF'
import json, sys
a = sys.argv
p = json.load(open(a[1]))
# /proc/stat's cpu line: user nice system idle iowait ...; idle is the 4th.
s0, s1 = ([int(x) for x in line.split()[1:]] for line in (a[11], a[12]))
ds = [y - x for x, y in zip(s0, s1)]
p.update(backend=a[2], phase=a[3], n=int(a[4]), wall_s=float(a[6]) - float(a[5]),
         bazel_cpu_s=float(a[8]) - float(a[7]), hoard_cpu_s=float(a[10]) - float(a[9]),
         idle=ds[3] / max(sum(ds), 1))
print(json.dumps(p))
EOF
  log "$tag: $(python3 -c "import json,sys; r=json.loads(open(sys.argv[1]).readlines()[-1]); print('wall %.2fs, execution %.2fs, %d checks, CPU Bazel %.2fs hoard %.2fs, idle %.0f%%' % (r['wall_s'], r['exec_s'], len(r['checks_ms']), r['bazel_cpu_s'], r['hoard_cpu_s'], 100 * r['idle']))" "$RUNS/runs.jsonl"); ${line#INFO: }"
}

build disk cold 0 "${DISK[@]}"
build hoard cold 0 "${HOARD_FLAGS[@]}"
(cd "$WS" && ./bazel-bin/bins/app0) >"$TMP/app0.out" 2>&1 || die "bazel-bin/bins/app0 did not run"

# Does Bazel 4.2.3 take --remote_download_minimal with only a disk cache?
DISK_MINIMAL=1
(cd "$WS" && "${BAZEL[@]}" clean --expunge --color=no) >/dev/null 2>&1 || true
if ! (cd "$WS" && "${BAZEL[@]}" build "${COMMON[@]}" "${DISK[@]}" --remote_download_minimal //...) >"$RUNS/disk-minimal-probe.log" 2>&1; then
  DISK_MINIMAL=0
  echo "Bazel $BAZEL_VERSION refuses it: $(grep -m1 -E 'ERROR' "$RUNS/disk-minimal-probe.log" | cut -c1-200)" \
    >"$RUNS/disk-minimal-note.txt"
  log "disk cache + --remote_download_minimal: $(cat "$RUNS/disk-minimal-note.txt")"
fi

for i in $(seq "$REPEATS"); do
  build disk warm "$i" "${DISK[@]}"
  build hoard warm "$i" "${HOARD_FLAGS[@]}"
  if [ "$DISK_MINIMAL" = 1 ]; then build disk warm-minimal "$i" "${DISK[@]}" --remote_download_minimal; fi
  build hoard warm-minimal "$i" "${HOARD_FLAGS[@]}" --remote_download_minimal
done

# warm-server: one Bazel server for all of it; the first pair only warms its JIT.
build disk warm-up 0 "${DISK[@]}"
build hoard warm-up 0 "${HOARD_FLAGS[@]}"
for i in $(seq "$REPEATS"); do
  build disk warm-server "$i" "${DISK[@]}"
  build hoard warm-server "$i" "${HOARD_FLAGS[@]}"
done

echo "Bazel $BAZEL_VERSION, LIBS=$LIBS ($(grep -c '^' <(ls "$WS"/libs/*/*.cc)) sources), REPEATS=$REPEATS, --jobs=$JOBS, $(nproc) cores, $(date -u +%Y-%m-%d); Bazel's output root on $(df --output=fstype "$BROOT" | tail -n1), the caches on $(df --output=fstype "$TMP" | tail -n1)"
echo
python3 "$PY" summary "$RUNS" "$JOBS"
