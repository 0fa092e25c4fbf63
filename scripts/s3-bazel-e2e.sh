#!/usr/bin/env bash
# End-to-end check of the object-store backend with a second implementation and a real client:
# three hoard nodes on one bucket of moto's S3 server (PyPI `moto[server]`, not the s3s-fs the
# integration tests embed), or with BUCKET_SERVER=azurite on one container of Azurite, Microsoft's
# Azure Blob Storage emulator (npm `azurite`; `storage.s3.provider = "azure"`), and Debian's
# Bazel 4.2.3.
#
# Usage: [BUCKET_SERVER=moto|azurite] scripts/s3-bazel-e2e.sh HOARD_BINARY
#
#   1. the bucket server on a free loopback port, a bucket (container) made by another client;
#   2. three hoard nodes, all `storage.backend = "s3"` on that bucket and one prefix;
#   3. a genrule workspace (ten small outputs, one of 12 MB: a multipart upload, and one rule
#      over all of them) is built through node 1, cold;
#   4. `bazel clean --expunge`, then the same build through node 2: every action must be a
#      remote cache hit, and the outputs byte-identical to the first build's;
#   5. the bucket holds the blobs under the documented layout (`prefix/cas/<2 hex>/...`);
#   6. an invalidation through node 3 is seen by `hoard watch` on node 1 and honoured by node 2
#      within the refresh (its clean build gets no remote cache hit);
#   7. two invalidations at once through nodes 1 and 3 are both kept (the epoch rises by two,
#      as node 2 reports).
#
# Environment: MOTO_VENV=DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/hoard-e2e/moto-venv),
# MOTO_VERSION (default 5.2.5), AZURITE_DIR=DIR (default .../hoard-e2e/azurite), AZURITE_VERSION
# (default 3.35.0), KEEP_TMP=1 keeps the temporary directory.
# Needs: python3 with venv and pip reaching PyPI, or node and npm reaching npm's registry (first
# run only; Debian's nodejs and npm are installed as root when missing), Debian's bazel-bootstrap
# (scripts/bazel-e2e.sh installs it).

set -uo pipefail

PASSED=0
FAILED=0
SERVER=${BUCKET_SERVER:-moto}
info() { echo "s3-bazel-e2e ($SERVER): $*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
die() { echo "s3-bazel-e2e: error: $*" >&2; exit 2; }

[ $# -eq 1 ] || { echo "usage: $0 HOARD_BINARY" >&2; exit 2; }
HOARD=$1
case "$HOARD" in /*) ;; *) HOARD="$PWD/$HOARD" ;; esac
[ -x "$HOARD" ] || die "hoard binary '$HOARD' does not exist or is not executable"
command -v bazel >/dev/null 2>&1 || die "bazel is not installed (scripts/bazel-e2e.sh installs Debian's bazel-bootstrap)"

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/hoard-e2e
case "$SERVER" in
moto)
  VENV=${MOTO_VENV:-$CACHE/moto-venv}
  MOTO_VERSION=${MOTO_VERSION:-5.2.5}
  if [ ! -x "$VENV/bin/moto_server" ]; then
    info "installing moto[server]==$MOTO_VERSION into $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
    "$VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION" ||
      die "pip install moto[server]==$MOTO_VERSION failed"
  fi
  ;;
azurite)
  AZURITE_DIR=${AZURITE_DIR:-$CACHE/azurite}
  AZURITE_VERSION=${AZURITE_VERSION:-3.35.0}
  if ! command -v npm >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "npm is not installed (and we are not root to apt-get install it)"
    info "installing Debian's nodejs and npm"
    { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y nodejs npm >/dev/null 2>&1 ||
      { apt-get -o DPkg::Lock::Timeout=900 update >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y nodejs npm >/dev/null; }; } ||
      die "apt-get install nodejs npm failed"
  fi
  if [ ! -x "$AZURITE_DIR/node_modules/.bin/azurite-blob" ] ||
    [ ! -d "$AZURITE_DIR/node_modules/@azure/storage-blob" ]; then
    info "installing azurite@$AZURITE_VERSION and @azure/storage-blob into $AZURITE_DIR"
    mkdir -p "$AZURITE_DIR" &&
      npm install --silent --no-audit --no-fund --prefix "$AZURITE_DIR" \
        "azurite@$AZURITE_VERSION" "@azure/storage-blob@12.32.0" >/dev/null ||
      die "npm install azurite@$AZURITE_VERSION failed"
  fi
  container() { NODE_PATH="$AZURITE_DIR/node_modules" node "$(dirname "$0")/azurite-container.js" "$S3_PORT" "$@"; }
  ;;
*) die "BUCKET_SERVER must be moto or azurite, not '$SERVER'" ;;
esac

TMP=$(mktemp -d "${TMPDIR:-/tmp}/hoard-s3-e2e.XXXXXX") || die "mktemp failed"
PIDS=()
BAZEL=(bazel --nohome_rc --noworkspace_rc --output_user_root="$TMP/bazel-root" --max_idle_secs=300)
cleanup() {
  (cd "$TMP/ws" 2>/dev/null && "${BAZEL[@]}" shutdown >/dev/null 2>&1) || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "${KEEP_TMP:-0}" = 1 ]; then echo "s3-bazel-e2e: keeping $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
wait_port() {
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  return 1
}

# 1. the bucket server and a bucket.
S3_PORT=$(free_port)
if [ "$SERVER" = moto ]; then
  "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$TMP/moto.log" 2>&1 &
  PIDS+=($!)
  wait_port "$S3_PORT" || die "moto did not start (see $TMP/moto.log)"
  python3 -c "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:$S3_PORT/e2e-cache', method='PUT'))" ||
    die "cannot create the bucket"
  info "moto $MOTO_VERSION on 127.0.0.1:$S3_PORT, bucket e2e-cache"
else
  "$AZURITE_DIR/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$S3_PORT" \
    --location "$TMP/azurite" --disableTelemetry --skipApiVersionCheck >"$TMP/azurite.log" 2>&1 &
  PIDS+=($!)
  wait_port "$S3_PORT" || die "azurite did not start (see $TMP/azurite.log)"
  container create e2e-cache || die "cannot create the container"
  info "azurite $AZURITE_VERSION on 127.0.0.1:$S3_PORT, container e2e-cache"
fi

# 2. three nodes on it.
if [ "$SERVER" = moto ]; then
  PROVIDER='endpoint = "http://127.0.0.1:'"$S3_PORT"'"'
else
  # As for a real account: its endpoint, name and key (Azurite's published development key).
  PROVIDER='provider = "azure"
endpoint = "http://127.0.0.1:'"$S3_PORT"'/devstoreaccount1"
[storage.s3.options]
azure_storage_account_name = "devstoreaccount1"
azure_storage_account_key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="'
fi
cat >"$TMP/hoard.toml" <<EOF
[storage]
backend = "s3"
[storage.s3]
bucket = "e2e-cache"
prefix = "ci"
allow_http = true
epoch_refresh = "500ms"
$PROVIDER
EOF
PORTS=()
for n in 1 2 3; do
  port=$(free_port)
  AWS_ACCESS_KEY_ID=e2e AWS_SECRET_ACCESS_KEY=e2e \
    "$HOARD" serve --config "$TMP/hoard.toml" --listen "127.0.0.1:$port" --data-dir "$TMP/node$n" \
    >"$TMP/node$n.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port" || { tail -n 20 "$TMP/node$n.log"; die "node $n did not start"; }
  PORTS+=("$port")
done
info "nodes on ports ${PORTS[*]}"

# 3. the workspace, built cold through node 1.
mkdir -p "$TMP/ws/lib"
: >"$TMP/ws/WORKSPACE"
cat >"$TMP/ws/lib/BUILD" <<'EOF'
[genrule(name = "g%d" % i, outs = ["g%d.txt" % i], cmd = "echo step %d > $@; date +%%N >> $@" % i) for i in range(1, 11)]
genrule(name = "big", outs = ["big.bin"], cmd = "head -c 12000000 /dev/urandom > $@")
genrule(name = "sum", srcs = [":g%d" % i for i in range(1, 11)] + [":big"], outs = ["sum.txt"], cmd = "sha256sum $(SRCS) > $@")
EOF
FLAGS=(--experimental_repository_disable_download --repository_cache= --noshow_progress --color=no --curses=no)
build() { (cd "$TMP/ws" && "${BAZEL[@]}" build "${FLAGS[@]}" --remote_cache="grpc://127.0.0.1:$1" //lib:all) >"$TMP/build-$1.log" 2>&1; }
# The remote cache hits the last build through port $1 reported (empty: none).
hits_of() { grep -o '[0-9]* remote cache hit' "$TMP/build-$1.log" | head -n1 | cut -d' ' -f1; }
if build "${PORTS[0]}"; then
  pass "cold build through node 1"
else
  tail -n 20 "$TMP/build-${PORTS[0]}.log"; fail "cold build through node 1"
fi
cp "$TMP/ws/bazel-bin/lib/sum.txt" "$TMP/sum-1.txt" 2>/dev/null
sha256sum "$TMP/ws/bazel-bin/lib/big.bin" 2>/dev/null | cut -c1-64 >"$TMP/big-1.txt"

# 4. a clean build through node 2 gets everything from the cache.
(cd "$TMP/ws" && "${BAZEL[@]}" clean --expunge) >/dev/null 2>&1
if build "${PORTS[1]}"; then
  pass "clean build through node 2"
else
  tail -n 20 "$TMP/build-${PORTS[1]}.log"; fail "clean build through node 2"
fi
hits=$(hits_of "${PORTS[1]}")
if [ "${hits:-0}" = 12 ]; then
  pass "node 2 served all 12 actions node 1 stored (12 remote cache hits)"
else
  grep 'processes' "$TMP/build-${PORTS[1]}.log"; fail "expected 12 remote cache hits, got '${hits:-none}'"
fi
if cmp -s "$TMP/ws/bazel-bin/lib/sum.txt" "$TMP/sum-1.txt" &&
  [ "$(sha256sum "$TMP/ws/bazel-bin/lib/big.bin" | cut -c1-64)" = "$(cat "$TMP/big-1.txt")" ]; then
  pass "outputs (the 12 MB one included) are byte-identical to the first build's"
else
  fail "outputs differ from the first build's"
fi

# 5. the layout in the bucket (moto lists it like S3: ListObjectsV2; Azurite through
# Microsoft's client).
big=$(cat "$TMP/big-1.txt")
if [ "$SERVER" = moto ]; then
  listing=$(python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$S3_PORT/e2e-cache?list-type=2&prefix=ci/cas/${big:0:2}/').read().decode())")
else
  listing=$(container list e2e-cache "ci/cas/${big:0:2}/")
fi
if echo "$listing" | grep -q "ci/cas/${big:0:2}/$big-12000000"; then
  pass "the 12 MB blob is at ci/cas/${big:0:2}/<hash>-12000000"
else
  fail "the 12 MB blob is not where the README says"
fi

# 6. an invalidation through node 3: seen on node 1's watch stream, honoured by node 2.
"$HOARD" watch --server "http://127.0.0.1:${PORTS[0]}" --from-now >"$TMP/watch-1.jsonl" 2>"$TMP/watch-1.err" &
PIDS+=($!)
sleep 1
"$HOARD" invalidate --server "http://127.0.0.1:${PORTS[2]}" --namespace "" --reason "toolchain bump via node 3" \
  >"$TMP/invalidate-3.log" 2>&1 || { cat "$TMP/invalidate-3.log"; fail "invalidation through node 3"; }
seen=0
for _ in $(seq 50); do
  grep -q "toolchain bump via node 3" "$TMP/watch-1.jsonl" 2>/dev/null && { seen=1; break; }
  sleep 0.1
done
if [ "$seen" = 1 ]; then
  pass "a watcher on node 1 saw the invalidation made through node 3"
else
  cat "$TMP/watch-1.err"; fail "node 1's watcher did not see node 3's invalidation within 5 s"
fi
sleep 1 # past node 2's refresh (500 ms)
(cd "$TMP/ws" && "${BAZEL[@]}" clean --expunge) >/dev/null 2>&1
if build "${PORTS[1]}"; then
  pass "build through node 2 after the invalidation"
else
  tail -n 20 "$TMP/build-${PORTS[1]}.log"; fail "build through node 2 after the invalidation"
fi
hits=$(hits_of "${PORTS[1]}")
if [ "${hits:-0}" = 0 ]; then
  pass "node 2 honoured node 3's invalidation (no remote cache hit)"
else
  fail "node 2 still served $hits invalidated results"
fi

# 7. two invalidations at once, through nodes 1 and 3: both kept.
epoch() {
  "$HOARD" namespaces --server "http://127.0.0.1:$1" --json |
    python3 -c 'import json, sys; print(next((int(n.get("epoch", 0)) for n in json.load(sys.stdin).get("namespaces", []) if n.get("name", "") == ""), 0))'
}
before=$(epoch "${PORTS[1]}")
"$HOARD" invalidate --server "http://127.0.0.1:${PORTS[0]}" --namespace "" --reason "at once, 1" >/dev/null 2>&1 &
one=$!
"$HOARD" invalidate --server "http://127.0.0.1:${PORTS[2]}" --namespace "" --reason "at once, 3" >/dev/null 2>&1 &
three=$!
# Both waited for, so the epoch is read only after both ended.
wait "$one"; one_rc=$?
wait "$three"; three_rc=$?
[ "$one_rc" = 0 ] && [ "$three_rc" = 0 ] || fail "a concurrent invalidation failed (exit $one_rc, $three_rc)"
sleep 1
after=$(epoch "${PORTS[1]}")
if [ "$after" = $((before + 2)) ]; then
  pass "two concurrent invalidations through two nodes are both kept (epoch $before -> $after on node 2)"
else
  fail "concurrent invalidations: epoch $before -> $after on node 2, expected +2"
fi

info "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
