#!/usr/bin/env bash
# Real Bazel (Debian's bazel-bootstrap, 4.2.x) fetching an http_archive through hoard's Remote
# Asset API (--experimental_remote_downloader), with [asset.fetch] on:
#   1. the first fetch goes through hoard (the origin sees hoard's User-Agent, not Bazel's);
#   2. with the origin stopped, a clean fetch still succeeds: hoard serves it from its cache;
#   3. a wrong sha256 in the WORKSPACE fails with a checksum error.
# Bazel's own caches are out of play: --repository_cache= and --disk_cache= are empty, and
# every run starts after `bazel clean --expunge`.
#
# Usage: scripts/bazel-downloader-e2e.sh path/to/hoard
set -uo pipefail

HOARD=${1:?usage: $0 path/to/hoard}
HOARD=$(cd "$(dirname "$HOARD")" && pwd)/$(basename "$HOARD")
PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
info() { echo "bazel-downloader-e2e: $*"; }
die() { echo "bazel-downloader-e2e: error: $*" >&2; exit 2; }

if ! command -v bazel >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || die "bazel is not installed (and we are not root to apt-get install bazel-bootstrap)"
  info "installing Debian's bazel-bootstrap"
  apt-get -o DPkg::Lock::Timeout=900 update >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y bazel-bootstrap >/dev/null \
    || die "apt-get install bazel-bootstrap failed"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/hoard-downloader-e2e.XXXXXX") || die "mktemp failed"
SERVER_PID=""
ORIGIN_PID=""
cleanup() {
  [ -n "$ORIGIN_PID" ] && kill "$ORIGIN_PID" 2>/dev/null
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi
  [ -d "$TMP/ws" ] && (cd "$TMP/ws" && "${BAZEL[@]}" shutdown >/dev/null 2>&1)
  rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 300); do port_open "$1" && return 0; sleep 0.1; done; return 1; }

# The archive and the origin that serves it; every request's User-Agent goes to origin.log.
mkdir -p "$TMP/src/greeting" "$TMP/www" "$TMP/ws"
echo "hello from an archive" >"$TMP/src/greeting/msg.txt"
printf 'exports_files(["msg.txt"])\n' >"$TMP/src/greeting/BUILD.bazel"
tar -C "$TMP/src" -czf "$TMP/www/greeting.tar.gz" greeting
SHA=$(sha256sum "$TMP/www/greeting.tar.gz" | cut -d' ' -f1)
cat >"$TMP/origin.py" <<'EOF'
import http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        with open(sys.argv[2], "a") as log:
            log.write("%s %s\n" % (self.path, self.headers.get("User-Agent", "-")))
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])),
    lambda *a: Handler(*a, directory=sys.argv[3])).serve_forever()
EOF
ORIGIN_PORT=$(free_port)
start_origin() {
  python3 "$TMP/origin.py" "$ORIGIN_PORT" "$TMP/origin.log" "$TMP/www" >/dev/null 2>&1 &
  ORIGIN_PID=$!
  wait_port "$ORIGIN_PORT" || die "the origin HTTP server did not start"
}
stop_origin() { kill "$ORIGIN_PID" 2>/dev/null; wait "$ORIGIN_PID" 2>/dev/null; ORIGIN_PID=""; }
start_origin

PORT=$(free_port)
OPS=$(free_port)
cat >"$TMP/hoard.toml" <<EOF
ops_listen = "127.0.0.1:$OPS"
[asset.fetch]
enabled = true
allowed_hosts = ["127.0.0.1"]
EOF
"$HOARD" serve --config "$TMP/hoard.toml" --listen "127.0.0.1:$PORT" --data-dir "$TMP/data" >"$TMP/hoard.log" 2>&1 &
SERVER_PID=$!
wait_port "$PORT" || { cat "$TMP/hoard.log"; die "hoard did not start"; }
pass "hoard serving on 127.0.0.1:$PORT with [asset.fetch] enabled"

workspace() { # SHA256
  cat >"$TMP/ws/WORKSPACE" <<EOF
load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive")
http_archive(
    name = "greeting",
    urls = ["http://127.0.0.1:$ORIGIN_PORT/greeting.tar.gz"],
    sha256 = "$1",
    strip_prefix = "greeting",
)
EOF
  cat >"$TMP/ws/BUILD.bazel" <<'EOF'
genrule(
    name = "out",
    srcs = ["@greeting//:msg.txt"],
    outs = ["out.txt"],
    cmd = "tr a-z A-Z < $< > $@",
)
EOF
}

BAZEL=(bazel --nohome_rc --noworkspace_rc --output_user_root="$TMP/bazel-root" --max_idle_secs=300)
FLAGS=(
  --noshow_progress --color=no --curses=no
  --remote_cache="grpc://127.0.0.1:$PORT"
  --experimental_remote_downloader="grpc://127.0.0.1:$PORT"
  --repository_cache= --disk_cache=
  --nosandbox_debug
)
build() { # N
  (cd "$TMP/ws" && "${BAZEL[@]}" clean --expunge >/dev/null 2>&1)
  (cd "$TMP/ws" && "${BAZEL[@]}" build "${FLAGS[@]}" //:out) >"$TMP/build$1.log" 2>&1
}
fetch_calls() { # CODE: FetchBlob calls answered with CODE so far (hoard's /metrics)
  curl -sf "http://127.0.0.1:$OPS/metrics" 2>/dev/null \
    | awk -v code="$1" '/^hoard_requests_total\{/ && /method="FetchBlob"/ && $0 ~ "code=\"" code "\"" { n += $NF } END { print n + 0 }'
}
command -v curl >/dev/null 2>&1 || { [ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y curl >/dev/null 2>&1; }

workspace "$SHA"
info "build 1: the http_archive through hoard, the origin up"
if build 1 && [ "$(cat "$TMP/ws/bazel-bin/out.txt" 2>/dev/null)" = "HELLO FROM AN ARCHIVE" ]; then
  pass "build 1 succeeded with the archive's content"
else
  tail -n 30 "$TMP/build1.log"; fail "build 1 failed"
fi
if grep -q '^/greeting.tar.gz hoard/' "$TMP/origin.log" && ! grep -qv ' hoard/' "$TMP/origin.log"; then
  pass "build 1: the origin was asked by hoard only ($(wc -l <"$TMP/origin.log") request)"
else
  fail "build 1: the origin saw other clients than hoard: $(cat "$TMP/origin.log" 2>/dev/null)"
fi
if [ "$(fetch_calls Ok)" -ge 1 ]; then pass "build 1: hoard answered FetchBlob OK"; else fail "build 1: no FetchBlob answered OK in /metrics"; fi

stop_origin
: >"$TMP/origin.log"
info "build 2: the origin stopped, Bazel's caches expunged"
if build 2 && [ "$(cat "$TMP/ws/bazel-bin/out.txt" 2>/dev/null)" = "HELLO FROM AN ARCHIVE" ]; then
  pass "build 2 succeeded from hoard's cache with the origin down"
else
  tail -n 30 "$TMP/build2.log"; fail "build 2 failed with the origin down"
fi
if [ "$(fetch_calls Ok)" -ge 2 ]; then pass "build 2: FetchBlob answered from the cache"; else fail "build 2: FetchBlob was not answered OK again"; fi

start_origin
workspace "0000000000000000000000000000000000000000000000000000000000000000"
info "build 3: a wrong sha256 in the WORKSPACE"
if build 3; then
  fail "build 3 succeeded with a wrong sha256"
elif grep -qi 'checksum' "$TMP/build3.log"; then
  pass "build 3 failed with a checksum error: $(grep -io 'checksum mismatch[^:]*' "$TMP/build3.log" | head -n1)"
else
  tail -n 30 "$TMP/build3.log"; fail "build 3 failed, but not with a checksum error"
fi

echo "bazel-downloader-e2e: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
