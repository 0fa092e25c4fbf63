#!/usr/bin/env bash
# End-to-end check: an unmodified Bazel uses hoard as its remote cache.
#
# Usage: scripts/bazel-e2e.sh HOARD_BINARY
#        HOARD_BACKEND=memory scripts/bazel-e2e.sh HOARD_BINARY   (storage.backend; default sled)
#
# It starts `HOARD_BINARY serve --listen 127.0.0.1:PORT --data-dir DIR` on a
# free port with a temporary data dir, generates a small C++ workspace that
# builds fully offline, and runs three builds with
# --remote_cache=grpc://127.0.0.1:PORT:
#
#   1. cold build: everything runs locally and is uploaded (0 cache hits);
#   2. after `bazel clean --expunge`: every spawn must be a remote cache hit,
#      and the binaries / genrule outputs fetched from the cache must be
#      correct;
#   3. after editing tools/magic.cc: exactly the spawns downstream of that
#      file run again, every other spawn is a remote cache hit.
#
# Then the branch-cache scenario of README "Branch caches in CI" (the server's
# config lets ci/branches/* read ci/main and write only themselves), with a
# `hoard watch` running throughout:
#
#   4. main build (--remote_instance_name=ci/main): its own namespace is cold;
#   5. first build of a branch (ci/branches/feature-x): every spawn is a hit
#      from main;
#   6. the branch edits tools/magic.cc: exactly the downstream spawns run, and
#      their results land in the branch (watch events) ...
#   7. ... and not in main: main building the same edit misses them;
#   8. after `hoard invalidate --namespace ci/main`: the branch re-runs every
#      action it got from main; the watcher saw the invalidation.
#
# Then (sled run only) access control and TLS, on a fresh data dir with
# [auth] anonymous = "none", a "ci" token that writes, a "laptop" token that
# reads, and a client-certificate subject that writes:
#
#   9. no token: Bazel is refused (UNAUTHENTICATED);
#  10. --remote_header=Authorization=Bearer <ci token>: fills the cache;
#  11. laptop token, --remote_upload_local_results=false: every spawn a hit;
#  12. laptop token with uploads on: update_enabled is false for it, and Bazel
#      4.x stops before building (newer Bazel warns and builds on);
#  13. over TLS (grpcs://, --tls_certificate): every spawn a hit;
#  14. a plaintext client on the TLS port fails;
#  15. over mTLS (--tls_client_certificate/--tls_client_key, no token: the
#      certificate's subject has the grants): every spawn a hit;
#  16. mTLS without a client certificate fails.
#
# Hits are read from Bazel's --execution_log_json_file ("remoteCacheHit").
#
# Needs: bazel (Debian's bazel-bootstrap 4.2.3 is enough; installed with apt if
# missing and running as root), a C++ compiler, python3, openssl. No network access: the
# workspace points the repositories Bazel would otherwise download (rules_cc,
# rules_java, remote_coverage_tools) at local stubs, and the run fails if Bazel
# tries to download anything.
#
# Environment: KEEP_TMP=1 keeps the temporary directory for debugging.

set -uo pipefail

PASSED=0
FAILED=0
SERVER_PID=""
TMP=""
WS=""
BAZEL_STARTED=0

pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
info() { echo "bazel-e2e: $*"; }
die() { echo "bazel-e2e: error: $*" >&2; exit 2; }

if [ $# -ne 1 ]; then
  echo "usage: $0 HOARD_BINARY" >&2
  exit 2
fi
HOARD=$1
case "$HOARD" in /*) ;; *) HOARD="$PWD/$HOARD" ;; esac
[ -x "$HOARD" ] || die "hoard binary '$HOARD' does not exist or is not executable"

command -v python3 >/dev/null 2>&1 || die "python3 is required"
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || die "a C/C++ compiler is required"

# --- bazel -------------------------------------------------------------------
if ! command -v bazel >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || die "bazel is not installed (and we are not root to apt-get install bazel-bootstrap)"
  info "bazel not found; installing Debian's bazel-bootstrap"
  # Wait for a concurrently running apt/dpkg instead of failing on its lock.
  if ! apt-get -o DPkg::Lock::Timeout=900 update >/dev/null; then
    die "apt-get update failed"
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y bazel-bootstrap >/dev/null; then
    die "apt-get install bazel-bootstrap failed"
  fi
  command -v bazel >/dev/null 2>&1 || die "bazel still missing after installing bazel-bootstrap"
fi
# apt_install PACKAGE: installs a Debian package, refreshing the package lists once if
# the first try fails (a fresh machine's lists may be missing or stale).
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y "$1" >/dev/null 2>&1 && return 0
  apt-get -o DPkg::Lock::Timeout=900 update >/dev/null 2>&1 || return 1
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y "$1" >/dev/null
}

# openssl makes the certificates of the TLS builds.
if ! command -v openssl >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || die "openssl is not installed (and we are not root to apt-get install it)"
  info "openssl not found; installing Debian's openssl"
  apt_install openssl || die "apt-get install openssl failed"
fi
info "using $(command -v bazel) ($(bazel --version 2>/dev/null | head -n1))"

# --- temp dirs & cleanup ---------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/hoard-bazel-e2e.XXXXXX") || die "mktemp failed"
WS="$TMP/ws"
OUTPUT_ROOT="$TMP/bazel-root"
DATA_DIR="$TMP/hoard-data"
SERVER_LOG="$TMP/hoard.log"
CONFIG="$TMP/hoard.toml"
WATCH_PID=""
mkdir -p "$WS" "$OUTPUT_ROOT" "$DATA_DIR"
cat >"$CONFIG" <<'EOF'
# Branch caches: a branch reads itself, then main; it writes only itself.
[[namespaces.rule]]
pattern = "ci/branches/*"
read = ["ci/main"]
EOF
BACKEND=${HOARD_BACKEND:-sled}
case "$BACKEND" in sled|memory) ;; *) die "HOARD_BACKEND must be sled or memory, not '$BACKEND'" ;; esac
printf '[storage]\nbackend = "%s"\n' "$BACKEND" >>"$CONFIG"
info "storage.backend = $BACKEND"

# The system rc (Debian: /etc/bazel/bazelrc sets --install_base) is needed;
# user and workspace rc files are not.
BAZEL=(bazel --nohome_rc --noworkspace_rc --output_user_root="$OUTPUT_ROOT" --max_idle_secs=600)

# shellcheck disable=SC2329 # invoked via trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$BAZEL_STARTED" = 1 ] && [ -d "$WS" ]; then
    (cd "$WS" && "${BAZEL[@]}" shutdown >/dev/null 2>&1) || true
  fi
  if [ -n "$WATCH_PID" ]; then
    kill "$WATCH_PID" 2>/dev/null || true
    wait "$WATCH_PID" 2>/dev/null || true
  fi
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ -n "$TMP" ] && [ -d "$TMP" ]; then
    if [ "${KEEP_TMP:-0}" = 1 ]; then
      echo "bazel-e2e: keeping $TMP" >&2
    else
      chmod -R u+w "$TMP" 2>/dev/null || true
      rm -rf "$TMP"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

server_log_tail() {
  echo "----- hoard server log (last 40 lines) -----"
  tail -n 40 "$SERVER_LOG" 2>/dev/null || true
  echo "--------------------------------------------"
}

finish() {
  [ "$FAILED" -eq 0 ] || server_log_tail
  info "total time ${SECONDS}s"
  echo "bazel-e2e: $PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ] || exit 1
  exit 0
}

# Aborts the run after a failure that makes the following steps meaningless.
fatal() {
  fail "$*"
  finish
}

# --- start hoard -------------------------------------------------------------
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_server() {
  local attempt port
  for attempt in 1 2 3 4 5; do
    port=$(free_port) || port=$((20000 + RANDOM % 40000))
    "$HOARD" serve --config "$CONFIG" --listen "127.0.0.1:$port" --data-dir "$DATA_DIR" >>"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    # Up to 30s for the server to accept connections.
    for _ in $(seq 300); do
      if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
      if port_open "$port"; then
        PORT=$port
        return 0
      fi
      sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null
      echo "bazel-e2e: hoard did not accept connections on port $port within 30s" >>"$SERVER_LOG"
    else
      wait "$SERVER_PID" 2>/dev/null
      echo "bazel-e2e: hoard exited (attempt $attempt, port $port); retrying" >>"$SERVER_LOG"
    fi
    SERVER_PID=""
  done
  return 1
}

PORT=""
if start_server; then
  pass "hoard server listening on 127.0.0.1:$PORT (pid $SERVER_PID)"
else
  fatal "could not start '$HOARD serve' (5 attempts)"
fi

# --- workspace -----------------------------------------------------------------
# Bazel 4.x implicitly depends on a few external repositories even for a plain
# C++ workspace (rules_cc: @bazel_tools//tools/cpp loads @rules_cc//cc:defs.bzl;
# rules_java: loaded by @bazel_tools//tools/jdk, which toolchain resolution
# touches; remote_coverage_tools: referenced by the test rules' implicit
# coverage attributes). Offline, they are replaced by tiny local stubs.
generate_workspace() {
  local w=$1
  mkdir -p "$w"/third_party/stubs/{rules_cc/cc,rules_java/java,remote_coverage_tools} \
    "$w"/greet "$w"/tools "$w"/app

  cat >"$w/WORKSPACE" <<'EOF'
workspace(name = "hoard_e2e")

# Offline stand-ins for repositories Bazel would otherwise download.
local_repository(name = "rules_cc", path = "third_party/stubs/rules_cc")
local_repository(name = "rules_java", path = "third_party/stubs/rules_java")
local_repository(name = "remote_coverage_tools", path = "third_party/stubs/remote_coverage_tools")
EOF
  : >"$w/BUILD"
  # Keep Bazel from descending into the stub repositories for //...
  printf 'third_party\n' >"$w/.bazelignore"

  # rules_cc: re-export the native rules.
  echo 'workspace(name = "rules_cc")' >"$w/third_party/stubs/rules_cc/WORKSPACE"
  : >"$w/third_party/stubs/rules_cc/BUILD"
  cat >"$w/third_party/stubs/rules_cc/cc/BUILD" <<'EOF'
package(default_visibility = ["//visibility:public"])

alias(
    name = "toolchain_type",
    actual = "@bazel_tools//tools/cpp:toolchain_type",
)
EOF
  cat >"$w/third_party/stubs/rules_cc/cc/defs.bzl" <<'EOF'
cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
fdo_prefetch_hints = native.fdo_prefetch_hints
fdo_profile = native.fdo_profile
objc_import = native.objc_import
objc_library = native.objc_library
EOF

  # rules_java: re-export the native rules.
  echo 'workspace(name = "rules_java")' >"$w/third_party/stubs/rules_java/WORKSPACE"
  : >"$w/third_party/stubs/rules_java/BUILD"
  : >"$w/third_party/stubs/rules_java/java/BUILD"
  cat >"$w/third_party/stubs/rules_java/java/defs.bzl" <<'EOF'
java_binary = native.java_binary
java_import = native.java_import
java_library = native.java_library
java_lite_proto_library = native.java_lite_proto_library
java_package_configuration = native.java_package_configuration
java_plugin = native.java_plugin
java_proto_library = native.java_proto_library
java_runtime = native.java_runtime
java_test = native.java_test
java_toolchain = native.java_toolchain
EOF

  # remote_coverage_tools: only used by `bazel coverage`, which we never run.
  echo 'workspace(name = "remote_coverage_tools")' >"$w/third_party/stubs/remote_coverage_tools/WORKSPACE"
  cat >"$w/third_party/stubs/remote_coverage_tools/BUILD" <<'EOF'
package(default_visibility = ["//visibility:public"])

sh_binary(name = "coverage_report_generator", srcs = ["unavailable.sh"])

sh_binary(name = "lcov_merger", srcs = ["unavailable.sh"])
EOF
  printf '#!/bin/sh\necho "coverage tools are stubbed out in this offline workspace" >&2\nexit 1\n' \
    >"$w/third_party/stubs/remote_coverage_tools/unavailable.sh"
  chmod +x "$w/third_party/stubs/remote_coverage_tools/unavailable.sh"

  # //greet: two libraries, one depending on the other, and a test.
  cat >"$w/greet/BUILD" <<'EOF'
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "strutil",
    srcs = ["strutil.cc"],
    hdrs = ["strutil.h"],
)

cc_library(
    name = "greet",
    srcs = ["greet.cc"],
    hdrs = ["greet.h"],
    deps = [":strutil"],
)

cc_test(
    name = "greet_test",
    size = "small",
    srcs = ["greet_test.cc"],
    deps = [":greet"],
)
EOF
  cat >"$w/greet/strutil.h" <<'EOF'
#pragma once
#include <string>
std::string shout(const std::string& s);
EOF
  cat >"$w/greet/strutil.cc" <<'EOF'
#include "greet/strutil.h"
#include <cctype>
std::string shout(const std::string& s) {
  std::string r;
  for (char c : s) r += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return r + "!";
}
EOF
  cat >"$w/greet/greet.h" <<'EOF'
#pragma once
#include <string>
std::string greeting(const std::string& who);
EOF
  cat >"$w/greet/greet.cc" <<'EOF'
#include "greet/greet.h"
#include "greet/strutil.h"
std::string greeting(const std::string& who) { return shout("hello " + who); }
EOF
  cat >"$w/greet/greet_test.cc" <<'EOF'
#include "greet/greet.h"
#include <cstdio>
int main() {
  std::string g = greeting("test");
  if (g != "HELLO TEST!") {
    std::fprintf(stderr, "unexpected greeting: %s\n", g.c_str());
    return 1;
  }
  std::printf("greet_test ok\n");
  return 0;
}
EOF

  # //tools: a library and a code generator binary built from it.
  cat >"$w/tools/BUILD" <<'EOF'
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "magic",
    srcs = ["magic.cc"],
    hdrs = ["magic.h"],
)

cc_binary(
    name = "gen_header",
    srcs = ["gen_header.cc"],
    deps = [":magic"],
)
EOF
  cat >"$w/tools/magic.h" <<'EOF'
#pragma once
int magic_number();
EOF
  cat >"$w/tools/magic.cc" <<'EOF'
#include "tools/magic.h"
static const int kMagic = 42;
int magic_number() { return kMagic; }
EOF
  cat >"$w/tools/gen_header.cc" <<'EOF'
#include "tools/magic.h"
#include <cstdio>
int main(int argc, char** argv) {
  if (argc != 2) return 2;
  std::FILE* f = std::fopen(argv[1], "w");
  if (!f) return 1;
  std::fprintf(f, "#pragma once\n#define MAGIC %d\n", magic_number());
  return std::fclose(f) == 0 ? 0 : 1;
}
EOF

  # //app: two binaries and three genrules (one runs a workspace-built tool to
  # generate a header, one runs a built binary, one is plain shell).
  cat >"$w/app/BUILD" <<'EOF'
genrule(
    name = "magic_h",
    outs = ["magic_gen.h"],
    cmd = "$(location //tools:gen_header) $@",
    tools = ["//tools:gen_header"],
)

cc_binary(
    name = "magic_app",
    srcs = [
        "magic_app.cc",
        ":magic_h",
    ],
)

cc_binary(
    name = "hello",
    srcs = ["hello.cc"],
    deps = ["//greet"],
)

genrule(
    name = "hello_out",
    outs = ["hello_out.txt"],
    cmd = "$(location :hello) > $@",
    tools = [":hello"],
)

genrule(
    name = "banner",
    srcs = ["banner.txt"],
    outs = ["banner_upper.txt"],
    cmd = "tr a-z A-Z < $< > $@",
)
EOF
  echo 'hoard remote cache e2e' >"$w/app/banner.txt"
  cat >"$w/app/hello.cc" <<'EOF'
#include "greet/greet.h"
#include <cstdio>
int main() {
  std::printf("%s\n", greeting("bazel").c_str());
  return 0;
}
EOF
  cat >"$w/app/magic_app.cc" <<'EOF'
#include "app/magic_gen.h"
#include <cstdio>
int main() {
  std::printf("magic=%d\n", MAGIC);
  return 0;
}
EOF
}

generate_workspace "$WS"
cat >"$TMP/spawns.py" <<'EOF'
# Reads a Bazel --execution_log_json_file (a stream of JSON SpawnExec objects)
# and prints one line per spawn: HIT<TAB>MNEMONIC<TAB>OUTPUT[,OUTPUT...]
# HIT is 1 for a remote cache hit, else 0. Output paths lose their
# bazel-out/<config>/{bin,genfiles,testlogs}/ prefix; host outputs get "host:".
import json, re, sys

text = open(sys.argv[1]).read()
dec = json.JSONDecoder()
pos = 0
while True:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        break
    spawn, pos = dec.raw_decode(text, pos)
    outs = []
    for o in spawn.get("listedOutputs", []) or []:
        host = "/host/" in o
        o = re.sub(r"^bazel-out/[^/]+/(bin|genfiles|testlogs)/", "", o)
        outs.append(("host:" if host else "") + o)
    hit = 1 if spawn.get("remoteCacheHit", False) else 0
    print("%d\t%s\t%s" % (hit, spawn.get("mnemonic", "?") or "?", ",".join(outs) or "-"))
EOF

# --- builds ------------------------------------------------------------------
BAZEL_FLAGS=(
  --noshow_progress
  --color=no
  --curses=no
  --jobs=4
  --remote_cache="grpc://127.0.0.1:$PORT"
  --remote_timeout=60
  --disk_cache=
  # Offline guard: any repository download is an error, not a retry.
  --experimental_repository_disable_download
  --repository_cache=
  --incompatible_strict_action_env
  # Debian's /etc/bazel/bazelrc turns on the very chatty --sandbox_debug.
  --nosandbox_debug
  --test_output=errors
)

# Per-build flags (the branch scenario sets --remote_instance_name).
EXTRA_FLAGS=()

# run_build N: bazel test //... with an execution log; aborts the run if the
# build fails, else leaves a spawn table in $TMP/spawnsN.tsv.
run_build() {
  local n=$1 start=$SECONDS
  info "build $n: bazel test //... (remote cache grpc://127.0.0.1:$PORT)"
  BAZEL_STARTED=1
  (cd "$WS" && "${BAZEL[@]}" test "${BAZEL_FLAGS[@]}" "${EXTRA_FLAGS[@]}" \
    --execution_log_json_file="$TMP/exec$n.json" //...) >"$TMP/build$n.log" 2>&1
  BUILD_RC=$?
  info "build $n finished in $((SECONDS - start))s (exit $BUILD_RC); $(grep -E '^INFO: [0-9]+ processes' "$TMP/build$n.log" | tail -n1)"
  if [ "$BUILD_RC" -ne 0 ]; then
    echo "----- build $n output (last 60 lines) -----"
    tail -n 60 "$TMP/build$n.log"
    echo "-------------------------------------------"
    check_downloads "$n"
    fatal "build $n failed (bazel exit code $BUILD_RC)"
  fi
  pass "build $n succeeded"
  python3 "$TMP/spawns.py" "$TMP/exec$n.json" >"$TMP/spawns$n.tsv" 2>"$TMP/spawns$n.err" \
    || { cat "$TMP/spawns$n.err"; fatal "build $n: could not parse the execution log"; }
}

check_downloads() {
  local n=$1
  if grep -qiE 'download(ing)? from|error downloading|download is disabled|failed to download' "$TMP/build$n.log"; then
    grep -iE 'download' "$TMP/build$n.log" | head -n 5
    fail "build $n: Bazel tried to download something (the workspace must build offline)"
  else
    pass "build $n: no download attempts"
  fi
}

check_common() {
  local n=$1
  check_downloads "$n"
  if grep -qE '(Reading from|Writing to) Remote Cache|[Rr]emote [Cc]ache.*(failed|error)|UNAVAILABLE|DEADLINE_EXCEEDED' "$TMP/build$n.log"; then
    # Bazel prints the reason on the line after "WARNING: ... Remote Cache:".
    grep -A1 -E '(Reading from|Writing to) Remote Cache|[Rr]emote [Cc]ache.*(failed|error)|UNAVAILABLE|DEADLINE_EXCEEDED' "$TMP/build$n.log" | head -n 12
    fail "build $n: Bazel reported remote cache errors"
  else
    pass "build $n: no remote cache errors reported by Bazel"
  fi
}

# spawn_count N / hit_count N: spawns / remote cache hits in build N's log.
spawn_count() { wc -l <"$TMP/spawns$1.tsv" | tr -d ' '; }
hit_count() { awk -F'\t' '$1 == 1' "$TMP/spawns$1.tsv" | wc -l | tr -d ' '; }

# spawn_hits N REGEX: prints the hit flags (one per line) of build N's spawns
# whose outputs match REGEX.
# (The regex goes through the environment: awk -v would mangle backslashes.)
spawn_hits() { RE="$2" awk -F'\t' '$3 ~ ENVIRON["RE"] { print $1 }' "$TMP/spawns$1.tsv"; }

expect_hit() { # N DESCRIPTION REGEX
  local h
  h=$(spawn_hits "$1" "$3")
  if [ -z "$h" ]; then
    fail "build $1: no spawn for $2 found in the execution log"
  elif echo "$h" | grep -q 0; then
    fail "build $1: $2 was executed, expected a remote cache hit"
  else
    pass "build $1: $2 was a remote cache hit"
  fi
}

expect_miss() { # N DESCRIPTION REGEX
  local h
  h=$(spawn_hits "$1" "$3")
  if [ -z "$h" ]; then
    fail "build $1: no spawn for $2 found in the execution log"
  elif echo "$h" | grep -q 1; then
    fail "build $1: $2 was a cache hit, but its inputs changed"
  else
    pass "build $1: $2 was re-executed (inputs changed)"
  fi
}

expect_output() { # DESCRIPTION EXPECTED COMMAND...
  local desc=$1 want=$2 got
  shift 2
  got=$("$@" 2>&1)
  if [ "$got" = "$want" ]; then
    pass "$desc: '$got'"
  else
    fail "$desc: expected '$want', got '$got'"
  fi
}

BIN="$WS/bazel-bin"

# Build 1: cold.
run_build 1
check_common 1
TOTAL1=$(spawn_count 1)
HITS1=$(hit_count 1)
info "build 1: $TOTAL1 spawns, $HITS1 remote cache hits"
[ "$TOTAL1" -ge 10 ] || fatal "build 1: expected at least 10 spawns in the execution log, got $TOTAL1"
if [ "$HITS1" -eq 0 ]; then
  pass "build 1: $TOTAL1 spawns executed, none served from the (empty) cache"
else
  fail "build 1: $HITS1 of $TOTAL1 spawns were cache hits although the cache started empty"
fi

# Build 2: everything from the remote cache.
info "bazel clean --expunge"
(cd "$WS" && "${BAZEL[@]}" clean --expunge --color=no) >"$TMP/clean.log" 2>&1 \
  || { cat "$TMP/clean.log"; fatal "bazel clean --expunge failed"; }
run_build 2
check_common 2
TOTAL2=$(spawn_count 2)
HITS2=$(hit_count 2)
info "build 2: $TOTAL2 spawns, $HITS2 remote cache hits"
if [ "$TOTAL2" -eq "$TOTAL1" ]; then
  pass "build 2: same number of spawns as build 1 ($TOTAL2)"
else
  fail "build 2: $TOTAL2 spawns, build 1 had $TOTAL1"
fi
if [ "$TOTAL2" -ge 10 ] && [ "$HITS2" -eq "$TOTAL2" ]; then
  pass "build 2: all $TOTAL2 spawns were remote cache hits"
else
  fail "build 2: only $HITS2 of $TOTAL2 spawns were remote cache hits; not hits:"
  awk -F'\t' '$1 == 0 { print "    " $2 "  " $3 }' "$TMP/spawns2.tsv"
fi
SUMMARY_HITS=$(grep -E '^INFO: [0-9]+ processes' "$TMP/build2.log" | grep -oE '[0-9]+ remote cache hit' | grep -oE '^[0-9]+')
if [ "${SUMMARY_HITS:-0}" = "$TOTAL2" ]; then
  pass "build 2: Bazel's summary reports $SUMMARY_HITS remote cache hits"
else
  fail "build 2: Bazel's summary reports '${SUMMARY_HITS:-no}' remote cache hits, expected $TOTAL2"
fi
if grep -qE '^//greet:greet_test +(\(cached\) +)?PASSED' "$TMP/build2.log"; then
  pass "build 2: //greet:greet_test PASSED (result from the cache)"
else
  fail "build 2: //greet:greet_test did not report PASSED"
fi
# Outputs fetched from the cache must be intact (and executable).
expect_output "build 2: bazel-bin/app/hello (downloaded binary) prints" "HELLO BAZEL!" "$BIN/app/hello"
expect_output "build 2: bazel-bin/app/magic_app prints" "magic=42" "$BIN/app/magic_app"
expect_output "build 2: genrule output app/hello_out.txt" "HELLO BAZEL!" cat "$BIN/app/hello_out.txt"
expect_output "build 2: genrule output app/banner_upper.txt" "HOARD REMOTE CACHE E2E" cat "$BIN/app/banner_upper.txt"
expect_output "build 2: generated header app/magic_gen.h" "#define MAGIC 42" grep MAGIC "$BIN/app/magic_gen.h"

# Build 3: change one library source; only its dependents may run again.
sed -i 's/kMagic = 42;/kMagic = 1337;/' "$WS/tools/magic.cc"
grep -q 'kMagic = 1337;' "$WS/tools/magic.cc" || fatal "could not edit tools/magic.cc"
info "edited tools/magic.cc (kMagic 42 -> 1337)"
# Drop local outputs and the local action cache so that every spawn consults
# the remote cache again (an incremental build would skip unchanged actions).
info "bazel clean"
(cd "$WS" && "${BAZEL[@]}" clean --color=no) >"$TMP/clean3.log" 2>&1 \
  || { cat "$TMP/clean3.log"; fatal "bazel clean failed"; }
run_build 3
check_common 3
TOTAL3=$(spawn_count 3)
HITS3=$(hit_count 3)
info "build 3: $TOTAL3 spawns, $HITS3 remote cache hits, $((TOTAL3 - HITS3)) executed:"
awk -F'\t' '$1 == 0 { print "    executed: " $2 "  " $3 }' "$TMP/spawns3.tsv"

# Everything that (transitively) depends on tools/magic.cc, for the target and
# the host (exec) configuration: its compile, the libmagic archive/shared
# library, the gen_header link, the genrule running gen_header, and the compile
# and link of magic_app which includes the generated header.
DIRTY='(^|,)(host:)?(tools/_objs/magic/|tools/libmagic\.|tools/gen_header(,|$)|app/magic_gen\.h|app/_objs/magic_app/|app/magic_app(,|$))'
expect_miss 3 "compile of tools/magic.cc" '(^|,)(host:)?tools/_objs/magic/magic\.(pic\.)?o'
expect_miss 3 "genrule //app:magic_h (runs gen_header)" '(^|,)app/magic_gen\.h'
expect_miss 3 "link of //app:magic_app" '(^|,)app/magic_app(,|$)'
expect_hit 3 "compile of greet/strutil.cc" '(^|,)(host:)?greet/_objs/strutil/strutil\.(pic\.)?o'
expect_hit 3 "compile of greet/greet.cc" '(^|,)(host:)?greet/_objs/greet/greet\.(pic\.)?o'
expect_hit 3 "compile of app/hello.cc" '(^|,)(host:)?app/_objs/hello/hello\.(pic\.)?o'
expect_hit 3 "compile of tools/gen_header.cc" '(^|,)(host:)?tools/_objs/gen_header/gen_header\.(pic\.)?o'
expect_hit 3 "link of //app:hello" '(^|,)(host:)?app/hello(,|$)'
expect_hit 3 "genrule //app:hello_out" '(^|,)app/hello_out\.txt'
expect_hit 3 "genrule //app:banner" '(^|,)app/banner_upper\.txt'
expect_hit 3 "test run of //greet:greet_test" '(^|,)greet/greet_test/test\.xml(,|$)'
UNEXPECTED=$(RE="$DIRTY" awk -F'\t' '$1 == 0 && $3 !~ ENVIRON["RE"] { print "    " $2 "  " $3 }' "$TMP/spawns3.tsv")
MISSED=$(RE="$DIRTY" awk -F'\t' '$1 == 1 && $3 ~ ENVIRON["RE"] { print "    " $2 "  " $3 }' "$TMP/spawns3.tsv")
if [ -z "$UNEXPECTED" ] && [ -z "$MISSED" ]; then
  pass "build 3: exactly the $((TOTAL3 - HITS3)) spawns downstream of tools/magic.cc ran; the other $HITS3 were remote cache hits"
else
  [ -n "$UNEXPECTED" ] && printf 'executed although independent of tools/magic.cc:\n%s\n' "$UNEXPECTED"
  [ -n "$MISSED" ] && printf 'cache hit although downstream of tools/magic.cc:\n%s\n' "$MISSED"
  fail "build 3: executed spawns are not exactly those downstream of tools/magic.cc"
fi
expect_output "build 3: bazel-bin/app/magic_app prints" "magic=1337" "$BIN/app/magic_app"
expect_output "build 3: bazel-bin/app/hello prints" "HELLO BAZEL!" "$BIN/app/hello"

# --- branch caches -----------------------------------------------------------
URL="http://127.0.0.1:$PORT"
MAIN=ci/main
BRANCH=ci/branches/feature-x
"$HOARD" watch --server "$URL" --from-now \
  --kinds action-result-stored,action-invalidated,namespace-invalidated,namespace-dropped \
  >"$TMP/watch.jsonl" 2>"$TMP/watch.err" &
WATCH_PID=$!
sleep 1
kill -0 "$WATCH_PID" 2>/dev/null || { cat "$TMP/watch.err"; fatal "hoard watch exited at once"; }

clean_build() { # N INSTANCE
  (cd "$WS" && "${BAZEL[@]}" clean --color=no) >"$TMP/clean$1.log" 2>&1 \
    || { cat "$TMP/clean$1.log"; fatal "bazel clean before build $1 failed"; }
  EXTRA_FLAGS=(--remote_instance_name="$2")
  run_build "$1"
  check_common "$1"
}

# Build 4: main's namespace starts empty (the earlier builds used the default
# instance): everything runs and is stored in ci/main.
clean_build 4 "$MAIN"
TOTAL4=$(spawn_count 4)
HITS4=$(hit_count 4)
if [ "$HITS4" -eq 0 ] && [ "$TOTAL4" -ge 10 ]; then
  pass "build 4 ($MAIN): all $TOTAL4 spawns executed; an instance's action cache is its own"
else
  fail "build 4 ($MAIN): $HITS4 of $TOTAL4 spawns were hits in a fresh namespace"
fi

# Build 5: the branch's first build gets every result from main.
clean_build 5 "$BRANCH"
TOTAL5=$(spawn_count 5)
HITS5=$(hit_count 5)
if [ "$HITS5" -eq "$TOTAL5" ] && [ "$TOTAL5" -eq "$TOTAL4" ]; then
  pass "build 5 ($BRANCH): all $TOTAL5 spawns were hits from $MAIN"
else
  fail "build 5 ($BRANCH): $HITS5 of $TOTAL5 spawns were hits, expected all $TOTAL4 from $MAIN"
fi

# Build 6: the branch changes tools/magic.cc; its new results go to the branch.
sed -i 's/kMagic = 1337;/kMagic = 7;/' "$WS/tools/magic.cc"
grep -q 'kMagic = 7;' "$WS/tools/magic.cc" || fatal "could not edit tools/magic.cc"
EVENTS_BEFORE6=$(wc -l <"$TMP/watch.jsonl")
clean_build 6 "$BRANCH"
sleep 1 # the watcher gets events after their group commit
EVENTS_AFTER6=$(wc -l <"$TMP/watch.jsonl")
TOTAL6=$(spawn_count 6)
HITS6=$(hit_count 6)
UNEXPECTED=$(RE="$DIRTY" awk -F'\t' '$1 == 0 && $3 !~ ENVIRON["RE"] { print "    " $2 "  " $3 }' "$TMP/spawns6.tsv")
MISSED=$(RE="$DIRTY" awk -F'\t' '$1 == 1 && $3 ~ ENVIRON["RE"] { print "    " $2 "  " $3 }' "$TMP/spawns6.tsv")
if [ -z "$UNEXPECTED" ] && [ -z "$MISSED" ] && [ "$HITS6" -lt "$TOTAL6" ]; then
  pass "build 6 ($BRANCH): exactly the $((TOTAL6 - HITS6)) spawns downstream of the edit ran; $HITS6 hits from $MAIN"
else
  [ -n "$UNEXPECTED" ] && printf 'executed although independent of tools/magic.cc:\n%s\n' "$UNEXPECTED"
  [ -n "$MISSED" ] && printf 'cache hit although downstream of tools/magic.cc:\n%s\n' "$MISSED"
  fail "build 6 ($BRANCH): executed spawns are not exactly those downstream of the edit"
fi
expect_output "build 6: bazel-bin/app/magic_app prints" "magic=7" "$BIN/app/magic_app"
STORED6=$(sed -n "$((EVENTS_BEFORE6 + 1)),${EVENTS_AFTER6}p" "$TMP/watch.jsonl" \
  | python3 -c '
import json, sys
ns = [json.loads(l)["namespace"] for l in sys.stdin if "ACTION_RESULT_STORED" in l]
print(len(ns), " ".join(sorted(set(ns))))')
if [ "${STORED6%% *}" -ge 1 ] && [ "${STORED6#* }" = "$BRANCH" ]; then
  pass "build 6: the watcher saw ${STORED6%% *} results stored, all in $BRANCH"
else
  fail "build 6: stored-result events during the branch build: '$STORED6' (expected only $BRANCH)"
fi

# Build 7: main builds the same edit: the branch's results are not in main.
clean_build 7 "$MAIN"
expect_miss 7 "compile of tools/magic.cc (stored only in the branch)" '(^|,)(host:)?tools/_objs/magic/magic\.(pic\.)?o'
expect_miss 7 "link of //app:magic_app (stored only in the branch)" '(^|,)app/magic_app(,|$)'
expect_hit 7 "compile of greet/greet.cc (main's own)" '(^|,)(host:)?greet/_objs/greet/greet\.(pic\.)?o'

# Build 8: back to main's source; a toolchain bump invalidates main; the
# branch's next build re-runs everything it would have taken from main.
sed -i 's/kMagic = 7;/kMagic = 1337;/' "$WS/tools/magic.cc"
if "$HOARD" invalidate --server "$URL" --namespace "$MAIN" --reason "toolchain bump (e2e)" \
  >"$TMP/invalidate.out" 2>&1; then
  pass "hoard invalidate --namespace $MAIN: $(head -n1 "$TMP/invalidate.out")"
else
  cat "$TMP/invalidate.out"
  fail "hoard invalidate --namespace $MAIN failed"
fi
clean_build 8 "$BRANCH"
TOTAL8=$(spawn_count 8)
HITS8=$(hit_count 8)
if [ "$HITS8" -eq 0 ] && [ "$TOTAL8" -eq "$TOTAL4" ]; then
  pass "build 8 ($BRANCH): all $TOTAL8 spawns re-ran after $MAIN was invalidated"
else
  fail "build 8 ($BRANCH): $HITS8 of $TOTAL8 spawns were still hits after $MAIN was invalidated"
  awk -F'\t' '$1 == 1 { print "    hit: " $2 "  " $3 }' "$TMP/spawns8.tsv"
fi
expect_output "build 8: bazel-bin/app/magic_app prints" "magic=1337" "$BIN/app/magic_app"

# The watcher saw every event once, in order, including the invalidation.
sleep 1
if python3 - "$TMP/watch.jsonl" "$MAIN" >"$TMP/watch.check" 2>&1 <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
seqs = [e["sequence"] for e in events]
assert seqs == sorted(set(seqs)), "sequences not strictly increasing: %s" % seqs
inv = [e for e in events if e["kind"] == "NAMESPACE_INVALIDATED"]
assert len(inv) == 1 and inv[0]["namespace"] == sys.argv[2], inv
assert inv[0]["reason"] == "toolchain bump (e2e)", inv
stored = {}
for e in events:
    if e["kind"] == "ACTION_RESULT_STORED":
        stored[e["namespace"]] = stored.get(e["namespace"], 0) + 1
print("%d events, strictly increasing; stored results per namespace: %s; invalidation of %s "
      "with its reason" % (len(events), stored, sys.argv[2]))
PY
then
  pass "watch stream: $(cat "$TMP/watch.check")"
else
  cat "$TMP/watch.check" "$TMP/watch.err"
  fail "watch stream: events missing, repeated or out of order"
fi

# --- access control and TLS (sled run only: the policy is the same for every backend) ----
# The server restarts on a fresh data dir with [auth]: no anonymous access, a
# "ci" token that writes, a "laptop" token that only reads, and a client
# certificate subject that writes. Then TLS, then mTLS, on the same data.
if [ "$BACKEND" = sled ]; then
  stop_server() {
    if [ -n "$WATCH_PID" ]; then kill "$WATCH_PID" 2>/dev/null; wait "$WATCH_PID" 2>/dev/null; WATCH_PID=""; fi
    kill -TERM "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
  }
  # secure_build N DESCRIPTION FLAGS...: a `bazel clean`, then build N with
  # FLAGS appended (they override --remote_cache); aborts the run on failure.
  secure_build() {
    local n=$1 desc=$2
    shift 2
    (cd "$WS" && "${BAZEL[@]}" clean --color=no) >"$TMP/clean$n.log" 2>&1 \
      || { cat "$TMP/clean$n.log"; fatal "bazel clean before build $n failed"; }
    EXTRA_FLAGS=("$@")
    info "build $n: $desc"
    run_build "$n"
    check_common "$n"
  }
  # refused_build N DESCRIPTION PATTERN FLAGS...: the build must fail, saying PATTERN.
  refused_build() {
    local n=$1 desc=$2 pattern=$3
    shift 3
    (cd "$WS" && "${BAZEL[@]}" clean --color=no) >"$TMP/clean$n.log" 2>&1 || true
    (cd "$WS" && "${BAZEL[@]}" build "${BAZEL_FLAGS[@]}" "$@" //...) >"$TMP/build$n.log" 2>&1
    local rc=$?
    if [ "$rc" -ne 0 ] && grep -qE "$pattern" "$TMP/build$n.log"; then
      pass "build $n ($desc) was refused: $(grep -m1 -oE "$pattern.{0,80}" "$TMP/build$n.log")"
    else
      tail -n 20 "$TMP/build$n.log"
      fail "build $n ($desc): expected a failure mentioning '$pattern', got exit $rc"
    fi
  }
  all_hits() { # N DESCRIPTION
    local total hits
    total=$(spawn_count "$1")
    hits=$(hit_count "$1")
    if [ "$total" -eq "$TOTAL1" ] && [ "$hits" -eq "$total" ]; then
      pass "build $1 ($2): all $total spawns were remote cache hits"
    else
      fail "build $1 ($2): $hits of $total spawns were hits, expected all $TOTAL1"
    fi
  }

  stop_server
  # The magic.cc edits of the branch builds are undone, so the workspace is build 1's.
  sed -i 's/kMagic = 1337;/kMagic = 42;/' "$WS/tools/magic.cc"
  CI_TOKEN=$("$HOARD" token new | head -n1)
  LAPTOP_TOKEN=$("$HOARD" token new | head -n1)
  CI_HASH=$(printf '%s\n' "$CI_TOKEN" | "$HOARD" token hash)
  LAPTOP_HASH=$(printf '%s\n' "$LAPTOP_TOKEN" | "$HOARD" token hash)
  AUTH_TOML="$TMP/auth.toml"
  cat >"$AUTH_TOML" <<EOF
[auth]
anonymous = "none"
[[auth.token]]
name = "ci"
hash = "$CI_HASH"
grants = ["write:**"]
[[auth.token]]
name = "laptop"
hash = "$LAPTOP_HASH"
grants = ["read:**"]
[[auth.client_cert]]
subject = "e2e-runner"
grants = ["write:**"]
EOF
  CONFIG="$TMP/secure.toml"
  cp "$AUTH_TOML" "$CONFIG"
  DATA_DIR="$TMP/hoard-secure"
  mkdir -p "$DATA_DIR"
  start_server || fatal "could not restart hoard with [auth]"
  pass "hoard restarted with [auth] on 127.0.0.1:$PORT"
  CACHE="--remote_cache=grpc://127.0.0.1:$PORT"

  refused_build 9 "no token" 'UNAUTHENTICATED' "$CACHE"
  secure_build 10 "CI token fills the cache" "$CACHE" "--remote_header=Authorization=Bearer $CI_TOKEN"
  if [ "$(hit_count 10)" -eq 0 ]; then
    pass "build 10 (ci token): every spawn ran and was uploaded (fresh data dir)"
  else
    fail "build 10 (ci token): $(hit_count 10) hits on a fresh data dir"
  fi
  secure_build 11 "read-only token, uploads off" "$CACHE" \
    "--remote_header=Authorization=Bearer $LAPTOP_TOKEN" --remote_upload_local_results=false
  all_hits 11 "read-only token"
  # A laptop with uploads left on: GetCapabilities tells it the truth
  # (update_enabled = false for this token), and Bazel 4.x stops before
  # building with its own advice; newer Bazel only warns and builds on.
  refused_build 12 "read-only token with uploads on (Bazel 4.x)" \
    'not authorized to write local results' "$CACHE" "--remote_header=Authorization=Bearer $LAPTOP_TOKEN"

  # TLS: a CA, a server certificate for localhost/127.0.0.1, a client certificate.
  CERTS="$TMP/certs"
  mkdir -p "$CERTS"
  (
    cd "$CERTS" || exit 1
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=hoard e2e CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext
    # Bazel reads the client key as PKCS#8 (BEGIN PRIVATE KEY), which genpkey writes.
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out client.key
    openssl req -new -key client.key -out client.csr -subj "/CN=e2e-runner"
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext
  ) >"$TMP/openssl.log" 2>&1 || { cat "$TMP/openssl.log"; fatal "openssl could not make the test certificates"; }

  # Debian's Bazel has no TLS of its own: its Netty is built without ALPN for the JDK's TLS
  # ("JDK provider does not support ALPN protocol"), so it needs OpenSSL through
  # netty-tcnative (Debian's libnetty-tcnative-jni), under the file name Netty looks for.
  TCNATIVE=/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so
  if [ ! -f "$TCNATIVE" ]; then
    [ "$(id -u)" -eq 0 ] || fatal "libnetty-tcnative-jni is not installed (and we are not root to install it)"
    info "installing Debian's libnetty-tcnative-jni (OpenSSL for Bazel's Netty)"
    apt_install libnetty-tcnative-jni || fatal "apt-get install libnetty-tcnative-jni failed"
  fi
  mkdir -p "$TMP/jni"
  cp "$TCNATIVE" "$TMP/jni/libnetty_tcnative.so" || fatal "cannot copy $TCNATIVE"
  BAZEL+=(--host_jvm_args=-Djava.library.path="$TMP/jni")

  stop_server
  { cat "$AUTH_TOML"; printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$CERTS/server.pem" "$CERTS/server.key"; } >"$CONFIG"
  start_server || fatal "could not restart hoard with [tls]"
  pass "hoard restarted with [tls] on port $PORT"
  TLS_CACHE="--remote_cache=grpcs://localhost:$PORT"
  secure_build 13 "over TLS with the read-only token" "$TLS_CACHE" "--tls_certificate=$CERTS/ca.pem" \
    "--remote_header=Authorization=Bearer $LAPTOP_TOKEN" --remote_upload_local_results=false
  all_hits 13 "TLS"
  # grpc:// to the TLS port (the port this server listens on now).
  refused_build 14 "plaintext client on the TLS port" 'Failed to query remote execution capabilities: INTERNAL: http2 exception' \
    "--remote_cache=grpc://127.0.0.1:$PORT" \
    "--remote_header=Authorization=Bearer $LAPTOP_TOKEN"

  stop_server
  { cat "$AUTH_TOML"; printf '[tls]\ncert = "%s"\nkey = "%s"\nclient_ca = "%s"\n' \
      "$CERTS/server.pem" "$CERTS/server.key" "$CERTS/ca.pem"; } >"$CONFIG"
  start_server || fatal "could not restart hoard with mTLS"
  pass "hoard restarted with mTLS (client_ca) on port $PORT"
  TLS_CACHE="--remote_cache=grpcs://localhost:$PORT"
  # No token: the client certificate's subject (e2e-runner) has the grants.
  secure_build 15 "over mTLS with a client certificate" "$TLS_CACHE" "--tls_certificate=$CERTS/ca.pem" \
    "--tls_client_certificate=$CERTS/client.pem" "--tls_client_key=$CERTS/client.key"
  all_hits 15 "mTLS"
  refused_build 16 "mTLS without a client certificate" 'certificate required' \
    "$TLS_CACHE" "--tls_certificate=$CERTS/ca.pem" "--remote_header=Authorization=Bearer $CI_TOKEN"
fi

finish
