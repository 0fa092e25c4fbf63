#!/usr/bin/env bash
# The OCI registry front with real clients, against a hoard it starts (oci_listen):
#   1. skopeo copies an OCI image layout into hoard and back out: byte-identical;
#   2. oras (PyPI's oras client) pushes a file and pulls it back;
#   3. buildah's registry cache, the branch recipe: a build on main exports to
#      cache/app/main; a branch build (local storage wiped) imports main and the branch and
#      exports the branch, rebuilding no layer; a second branch build reuses its own; pruning
#      the branch's namespace leaves main's cache intact and the branch's gone;
#   4. a differential run: one scripted request sequence against hoard and against Debian's
#      docker-registry (the reference Distribution implementation), on loopback; the status
#      codes and the headers clients rely on must match.
#
# Usage: scripts/oci-e2e.sh HOARD_BINARY
# Needs root for apt (skopeo, buildah, docker-registry) and buildah's chroot isolation;
# python3 with venv (oras goes into ~/.cache/hoard-e2e/oci-venv). Only 127.0.0.1 is contacted.
# Environment: KEEP_TMP=1 keeps the temporary directory.

set -uo pipefail

HOARD=${1:?usage: scripts/oci-e2e.sh HOARD_BINARY}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PASSED=0
FAILED=0
info() { echo "oci-e2e: $*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
die() { echo "oci-e2e: $*" >&2; exit 1; }

[ -x "$HOARD" ] || die "hoard binary '$HOARD' is not executable"
HOARD=$(cd "$(dirname "$HOARD")" && pwd)/$(basename "$HOARD")

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y "$@" >/dev/null 2>&1 && return 0
  apt-get -o DPkg::Lock::Timeout=900 update >/dev/null 2>&1 || return 1
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y "$@" >/dev/null
}
for tool in skopeo buildah docker-registry; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "$tool is not installed (and we are not root to apt-get install it)"
    info "$tool not found; installing Debian's $tool"
    apt_install "$tool" || die "apt-get install $tool failed"
  fi
done
VENV="$HOME/.cache/hoard-e2e/oci-venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import oras' 2>/dev/null; then
  info "installing oras (PyPI) into $VENV"
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q 'oras==0.2.*' || die "pip install oras failed"
fi
info "skopeo $(skopeo --version | awk '{print $3}'), buildah $(buildah --version | awk '{print $3}'), oras $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("oras"))')"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/hoard-oci-e2e.XXXXXX") || die "mktemp failed"
HOARD_PID=""
REG_PID=""
cleanup() {
  for pid in $HOARD_PID $REG_PID; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  if [ "${KEEP_TMP:-0}" = 1 ]; then info "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

GRPC=$(free_port); OCI=$(free_port)
cat > "$TMP/hoard.toml" <<EOF
listen = "127.0.0.1:$GRPC"
oci_listen = "127.0.0.1:$OCI"
data_dir = "$TMP/data"
# Branch caches read main's (buildah 1.28 imports one --cache-from only: the last).
[[namespaces.rule]]
pattern = "oci/cache/app/*"
read = ["oci/cache/app/main"]
EOF
RUST_LOG=warn "$HOARD" serve --config "$TMP/hoard.toml" > "$TMP/hoard.log" 2>&1 &
HOARD_PID=$!
wait_port "$OCI" || { cat "$TMP/hoard.log"; die "hoard did not listen on $OCI"; }
REGISTRY="127.0.0.1:$OCI"
info "hoard: gRPC $GRPC, OCI $OCI"

# --- 1. skopeo ---------------------------------------------------------------------------
# A small OCI image layout made here: one gzip layer with two files, a config, a manifest.
python3 - "$TMP/layout" <<'PYEOF'
import gzip, hashlib, io, json, os, sys, tarfile
root = sys.argv[1]
os.makedirs(f"{root}/blobs/sha256", exist_ok=True)
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{root}/blobs/sha256/{d}", "wb").write(data)
    return {"digest": f"sha256:{d}", "size": len(data)}
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w") as t:
    for name, text in [("hello.txt", b"hello from hoard\n"), ("big.bin", os.urandom(300_000))]:
        info = tarfile.TarInfo(name); info.size = len(text); info.mtime = 0
        t.addfile(info, io.BytesIO(text))
layer = gzip.compress(raw.getvalue(), mtime=0)
diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
manifest = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(layer)}],
}).encode()
m = blob(manifest)
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
           "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}, open(f"{root}/index.json", "w"))
json.dump({"imageLayoutVersion": "1.0.0"}, open(f"{root}/oci-layout", "w"))
PYEOF
if skopeo copy --quiet --dest-tls-verify=false "oci:$TMP/layout:v1" "docker://$REGISTRY/test/tiny:v1" > "$TMP/skopeo.log" 2>&1; then
  pass "skopeo copy of an OCI layout into hoard"
else
  fail "skopeo copy into hoard: $(tail -n 3 "$TMP/skopeo.log")"
fi
if skopeo copy --quiet --src-tls-verify=false "docker://$REGISTRY/test/tiny:v1" "oci:$TMP/out:v1" >> "$TMP/skopeo.log" 2>&1; then
  same=1
  for f in "$TMP"/layout/blobs/sha256/*; do
    cmp -s "$f" "$TMP/out/blobs/sha256/$(basename "$f")" || same=0
  done
  [ "$same" = 1 ] && pass "skopeo copy back out: every blob (manifest, config, layer) byte-identical" \
    || fail "skopeo copy back out: blobs differ"
else
  fail "skopeo copy out of hoard: $(tail -n 3 "$TMP/skopeo.log")"
fi
if skopeo inspect --raw --tls-verify=false "docker://$REGISTRY/test/tiny:v1" > "$TMP/raw.json" 2>>"$TMP/skopeo.log" \
   && [ "sha256:$(sha256sum < "$TMP/raw.json" | cut -d' ' -f1)" = "$(python3 -c "import json; print(json.load(open('$TMP/layout/index.json'))['manifests'][0]['digest'])")" ]; then
  pass "skopeo inspect --raw: the manifest's bytes as pushed"
else
  fail "skopeo inspect --raw"
fi

# --- 2. oras -----------------------------------------------------------------------------
mkdir -p "$TMP/oras/in" "$TMP/oras/out"
head -c 100000 /dev/urandom > "$TMP/oras/in/artifact.bin"
if (cd "$TMP/oras/in" && "$VENV/bin/python" - "$REGISTRY" <<'PYEOF'
import sys, oras.client
registry = sys.argv[1]
client = oras.client.OrasClient(hostname=registry, insecure=True)
client.push(target=f"{registry}/oras/demo:v1", files=["artifact.bin"])
client.pull(target=f"{registry}/oras/demo:v1", outdir="../out")
assert "v1" in client.get_tags(f"{registry}/oras/demo"), "tag listed"
PYEOF
) > "$TMP/oras.log" 2>&1 && cmp -s "$TMP/oras/in/artifact.bin" "$TMP/oras/out/artifact.bin"; then
  pass "oras push and pull: byte-identical, tag listed"
else
  fail "oras push/pull: $(tail -n 5 "$TMP/oras.log")"
fi

# --- 3. buildah's registry cache: the branch recipe --------------------------------------
mkdir -p "$TMP/ctx"
echo one > "$TMP/ctx/a"; echo two > "$TMP/ctx/b"
printf 'FROM scratch\nCOPY a /a\nCOPY b /b\n' > "$TMP/ctx/Dockerfile"
build() { # NAME STORAGE ARGS...: a build in its own local storage, log in $TMP/NAME.log
  local name=$1 storage=$2; shift 2
  buildah --root "$TMP/$storage/root" --runroot "$TMP/$storage/run" --storage-driver vfs \
    build --isolation chroot --layers --tls-verify=false "$@" -t "localhost/app:$name" "$TMP/ctx" \
    > "$TMP/$name.log" 2>&1
}
steps_cached() { grep -c -- '--> Using cache' "$TMP/$1.log"; }
if build main s1 --cache-to "$REGISTRY/cache/app/main"; then
  pass "buildah build on main exports its cache to cache/app/main"
else
  fail "buildah build on main: $(tail -n 5 "$TMP/main.log")"
fi
# A fresh runner: no local layers. Import main (and the branch, empty yet), export the branch.
# One --cache-from: the branch's cache, which falls back to main's through the namespace
# rule's read chain.
BRANCH=(--cache-from "$REGISTRY/cache/app/feature" --cache-to "$REGISTRY/cache/app/feature")
if build branch1 s2 "${BRANCH[@]}"; then
  n=$(steps_cached branch1)
  pulled=$(grep -c "Cache pulled from remote $REGISTRY/cache/app/feature:" "$TMP/branch1.log")
  [ "$n" -ge 2 ] && [ "$pulled" -ge 2 ] && ! grep -q "Pushing cache" "$TMP/branch1.log" \
    && pass "branch build on a fresh runner: both steps pulled from main's cache, no layer rebuilt" \
    || fail "branch build ($n steps from the cache, $pulled pulled from main): $(grep -E 'STEP|cache' "$TMP/branch1.log" | head)"
else
  fail "buildah branch build: $(tail -n 5 "$TMP/branch1.log")"
fi
# The branch changes b: its build exports that layer to the branch's cache only.
echo three > "$TMP/ctx/b"
if build branch2 s3 "${BRANCH[@]}" && grep -q "Pushing cache $REGISTRY/cache/app/feature:" "$TMP/branch2.log" \
   && build branch3 s4 "${BRANCH[@]}"; then
  n=$(steps_cached branch3)
  own=$(grep -c "Cache pulled from remote $REGISTRY/cache/app/feature:" "$TMP/branch3.log")
  [ "$n" -ge 2 ] && [ "$own" -ge 1 ] && ! grep -q "Pushing cache" "$TMP/branch3.log" \
    && pass "a second branch build reuses the branch's own cache (its changed layer from cache/app/feature)" \
    || fail "second branch build: $n steps from the cache, $own from the branch's"
else
  fail "buildah branch builds: $(tail -n 5 "$TMP/branch3.log" "$TMP/branch2.log")"
fi
tags() { python3 -c "import json,urllib.request,sys
try: print(len(json.load(urllib.request.urlopen('http://$REGISTRY/v2/$1/tags/list'))['tags']))
except Exception as e: print(0)"; }
main_tags=$(tags cache/app/main); feature_tags=$(tags cache/app/feature)
[ "$main_tags" -gt 0 ] && [ "$feature_tags" -gt 0 ] && pass "cache tags: $main_tags on main, $feature_tags on the branch" \
  || fail "cache tags: $main_tags on main, $feature_tags on the branch"
sleep 2 # the shortest --idle is 1s
if RUST_LOG=off "$HOARD" prune-namespaces --server "grpc://127.0.0.1:$GRPC" --idle 1s \
     --pattern 'oci/cache/app/feature' --reason "branch merged" > "$TMP/prune.log" 2>&1 \
   && [ "$(tags cache/app/feature)" = 0 ] && [ "$(tags cache/app/main)" = "$main_tags" ]; then
  pass "pruning the branch: its cache is gone, main's intact ($main_tags tags)"
else
  fail "pruning the branch: $(cat "$TMP/prune.log")"
fi
if build main2 s5 --cache-from "$REGISTRY/cache/app/main" && [ "$(steps_cached main2)" -ge 1 ]; then
  pass "main's cache still serves a fresh build after the prune"
else
  fail "main's cache after the prune: $(tail -n 5 "$TMP/main2.log")"
fi

# --- 4. differential: hoard and docker-registry answer one sequence alike -----------------
REG=$(free_port)
mkdir -p "$TMP/registry"
cat > "$TMP/registry/config.yml" <<EOF
version: 0.1
log: {level: error}
storage:
  filesystem: {rootdirectory: $TMP/registry/data}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$REG}
EOF
docker-registry serve "$TMP/registry/config.yml" > "$TMP/registry.log" 2>&1 &
REG_PID=$!
wait_port "$REG" || die "docker-registry did not listen on $REG: $(tail -n 5 "$TMP/registry.log")"
if python3 "$ROOT/scripts/oci-differential.py" "http://$REGISTRY" "http://127.0.0.1:$REG" > "$TMP/diff.log" 2>&1; then
  pass "differential: $(tail -n 1 "$TMP/diff.log")"
else
  fail "differential:"; cat "$TMP/diff.log"
fi

if [ "$FAILED" -ne 0 ]; then
  echo "--- hoard log (tail) ---"; tail -n 30 "$TMP/hoard.log"
fi
info "total time ${SECONDS}s"
echo "oci-e2e: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
