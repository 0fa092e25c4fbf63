#!/usr/bin/env bash
# Regional replicas on a simulated three-region network (issue 16), with Debian's Bazel 4.2.3.
#
# Usage (as root): scripts/topology.sh HOARD_BINARY HOARD_BENCH_BINARY
#
# The network: three network namespaces, a centre and regions A and B, each region linked to the
# centre by a veth pair. The links get a delay of 40 ms (A) and 80 ms (B) round trip: with
# `tc qdisc netem` where the kernel has sch_netem, else with scripts/delay-proxy.py (a TCP proxy in
# the centre's namespace that holds every byte for half the round trip each way; the centre then
# listens on its loopback only, so the proxy is the only way in). A hoard in each namespace: the
# centre, and in each region a replica (`[upstream]`) of it across the link.
#
#   1. region A builds a generated genrule workspace cold through its replica: the centre fills;
#   2. region B's clean builds: through its replica (cold, then warm) and straight to the centre
#      across the link; each must be all remote cache hits;
#   3. GetActionResult hit latency in region B: its replica against the centre across the link
#      (hoard-bench ac --hits);
#   4. 60 invalidations at the centre; a `hoard watch` in each region, on its replica, must see all
#      of them in order; propagation = arrival minus the centre's event time (one clock);
#   5. an invalidation of the builds' instance at the centre: region B's next clean build through
#      its replica gets no remote cache hit.
#
# Prints PASS/FAIL lines, then the figures as markdown (also in $TMP/report.md). Environment:
# RULES (120), REPEATS (3), KEEP_TMP=1. Needs: root, iproute2, python3, bazel (bazel-bootstrap;
# scripts/bazel-e2e.sh installs it).
set -uo pipefail

PASSED=0
FAILED=0
info() { echo "topology: $*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
die() { echo "topology: error: $*" >&2; exit 2; }

[ $# -eq 2 ] || { echo "usage: $0 HOARD_BINARY HOARD_BENCH_BINARY" >&2; exit 2; }
HOARD=$(realpath "$1")
BENCH=$(realpath "$2")
HERE=$(cd "$(dirname "$0")" && pwd)
[ -x "$HOARD" ] && [ -x "$BENCH" ] || die "no binaries at $1 / $2"
[ "$(id -u)" -eq 0 ] || die "needs root (ip netns)"
command -v ip >/dev/null || die "ip (iproute2) is not installed"
command -v bazel >/dev/null || die "bazel is not installed (scripts/bazel-e2e.sh installs bazel-bootstrap)"
RULES=${RULES:-120}
REPEATS=${REPEATS:-3}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/hoard-topology.XXXXXX") || die "mktemp failed"
ID=$$
C=hoard-c-$ID
A=hoard-a-$ID
B=hoard-b-$ID
PIDS=()
cleanup() {
  for ns in A B; do
    ws=$TMP/ws$ns
    [ -d "$ws" ] && (cd "$ws" && ip netns exec "${!ns}" bazel --output_user_root="$TMP/bazel-$ns" shutdown >/dev/null 2>&1) || true
  done
  # Everything started in the namespaces (servers, proxies, watchers), whatever its parent.
  for ns in "$C" "$A" "$B"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  sleep 0.5
  for ns in "$C" "$A" "$B"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ "${KEEP_TMP:-0}" = 1 ]; then echo "topology: keeping $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# The network.
for ns in "$C" "$A" "$B"; do
  ip netns add "$ns" || die "ip netns add $ns failed"
  in_ns "$ns" ip link set lo up
done
link() { # link NS CENTRE_IF REGION_IF SUBNET
  ip link add "$2" type veth peer name "$3" || die "ip link add $2 failed"
  ip link set "$2" netns "$C"
  ip link set "$3" netns "$1"
  in_ns "$C" ip addr add "$4.1/24" dev "$2"
  in_ns "$1" ip addr add "$4.2/24" dev "$3"
  in_ns "$C" ip link set "$2" up
  in_ns "$1" ip link set "$3" up
}
link "$A" "hc-a$ID" "ha$ID" 10.71.1
link "$B" "hc-b$ID" "hb$ID" 10.71.2
wait_port() { # wait_port NS HOST PORT
  for _ in $(seq 300); do
    in_ns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
if in_ns "$C" tc qdisc add dev "hc-a$ID" root netem delay 20ms 2>/dev/null; then
  { in_ns "$A" tc qdisc add dev "ha$ID" root netem delay 20ms &&
    in_ns "$C" tc qdisc add dev "hc-b$ID" root netem delay 40ms &&
    in_ns "$B" tc qdisc add dev "hb$ID" root netem delay 40ms; } || die "tc netem on the links failed"
  LINK="tc netem on the veth pairs"
  CENTRE_LISTEN=0.0.0.0:9092
  CENTRE_A=10.71.1.1:9092
  CENTRE_B=10.71.2.1:9092
else
  LINK="scripts/delay-proxy.py in the centre's namespace (this kernel has no sch_netem)"
  CENTRE_LISTEN=127.0.0.1:9092
  CENTRE_A=10.71.1.1:9192
  CENTRE_B=10.71.2.1:9192
  in_ns "$C" python3 "$HERE/delay-proxy.py" "$CENTRE_A" 127.0.0.1:9092 20 >"$TMP/proxy-a.log" 2>&1 &
  PIDS+=($!)
  in_ns "$C" python3 "$HERE/delay-proxy.py" "$CENTRE_B" 127.0.0.1:9092 40 >"$TMP/proxy-b.log" 2>&1 &
  PIDS+=($!)
fi
info "links: A 40 ms, B 80 ms round trip, by $LINK"

# The servers.
in_ns "$C" "$HOARD" serve --listen "$CENTRE_LISTEN" --data-dir "$TMP/centre" >"$TMP/centre.log" 2>&1 &
PIDS+=($!)
wait_port "$C" 127.0.0.1 9092 || { tail "$TMP/centre.log"; die "the centre did not start"; }
for ns in A B; do
  up=CENTRE_$ns
  cat >"$TMP/replica-$ns.toml" <<EOF
ops_listen = "127.0.0.1:9093"
[upstream]
endpoint = "grpc://${!up}"
EOF
  in_ns "${!ns}" "$HOARD" serve --config "$TMP/replica-$ns.toml" --listen 127.0.0.1:9092 \
    --data-dir "$TMP/replica-$ns" >"$TMP/replica-$ns.log" 2>&1 &
  PIDS+=($!)
  wait_port "${!ns}" 127.0.0.1 9092 || { tail "$TMP/replica-$ns.log"; die "replica $ns did not start"; }
  wait_port "${!ns}" "${!up%:*}" "${!up#*:}" || die "region $ns cannot reach the centre at ${!up}"
done
info "centre and replicas serving"

# The workspace: RULES genrules in 10 packages, each over the one before it in its package.
mkdir -p "$TMP/wsA"
: >"$TMP/wsA/WORKSPACE"
per=$((RULES / 10))
for p in $(seq 0 9); do
  mkdir -p "$TMP/wsA/p$p"
  {
    echo "genrule(name = \"r0\", outs = [\"r0.txt\"], cmd = \"echo p$p r0 > \$@; printf '%20000s' '' | tr ' ' x >> \$@\")"
    for i in $(seq 1 $((per - 1))); do
      echo "genrule(name = \"r$i\", srcs = [\":r$((i - 1))\"], outs = [\"r$i.txt\"], cmd = \"sha256sum \$(SRCS) > \$@; echo p$p r$i >> \$@\")"
    done
  } >"$TMP/wsA/p$p/BUILD"
done
cp -r "$TMP/wsA" "$TMP/wsB"
FLAGS=(--experimental_repository_disable_download --repository_cache= --noshow_progress --color=no
  --curses=no --remote_instance_name=ci/main --jobs=16)
# build NS LABEL ENDPOINT: a clean build of //...; its wall seconds in $SECS, hits in $HITS.
build() {
  local ns=$1 label=$2 endpoint=$3 ws=$TMP/ws$1 log=$TMP/build-$2.log
  (cd "$ws" && in_ns "${!ns}" bazel --output_user_root="$TMP/bazel-$ns" clean --expunge) >/dev/null 2>&1
  local t0 t1
  t0=$(date +%s.%N)
  (cd "$ws" && in_ns "${!ns}" bazel --output_user_root="$TMP/bazel-$ns" build "${FLAGS[@]}" \
    --remote_cache="grpc://$endpoint" //...) >"$log" 2>&1
  local rc=$?
  t1=$(date +%s.%N)
  SECS=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  HITS=$(grep -o '[0-9]* remote cache hit' "$log" | head -n1 | cut -d' ' -f1)
  HITS=${HITS:-0}
  return $rc
}
# The bazel server stays up between builds; warm it once per region so startup is not timed.
for ns in A B; do
  (cd "$TMP/ws$ns" && in_ns "${!ns}" bazel --output_user_root="$TMP/bazel-$ns" info >/dev/null 2>&1)
done

# 1. region A fills the centre through its replica.
if build A a-cold 127.0.0.1:9092; then
  pass "region A's cold build through its replica (${SECS}s)"
else
  tail -n 20 "$TMP/build-a-cold.log"; fail "region A's cold build"
fi
actions=$(grep -o '[0-9]* processes' "$TMP/build-a-cold.log" | head -n1 | cut -d' ' -f1)
info "$actions actions"

# 2. region B's clean builds.
median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" "$@"; }
check_hits() { # check_hits WHAT
  if [ "$HITS" = "$RULES" ]; then pass "$1: all $RULES actions were remote cache hits (${SECS}s)"
  else fail "$1: $HITS remote cache hits, expected $RULES"; fi
}
build B b-first 127.0.0.1:9092; check_hits "region B's first build through its replica"
B_FIRST=$SECS
warm=() direct=() awarm=() adirect=()
for r in $(seq "$REPEATS"); do
  build B "b-warm-$r" 127.0.0.1:9092; check_hits "region B through its warm replica (run $r)"; warm+=("$SECS")
  build B "b-direct-$r" "$CENTRE_B"; check_hits "region B straight to the centre (run $r)"; direct+=("$SECS")
  build A "a-warm-$r" 127.0.0.1:9092; check_hits "region A through its replica (run $r)"; awarm+=("$SECS")
  build A "a-direct-$r" "$CENTRE_A"; check_hits "region A straight to the centre (run $r)"; adirect+=("$SECS")
done

# 3. hit latency in region B.
lat() { # lat ENDPOINT COUNT -> "p50 p99" of GetActionResult, ms
  in_ns "$B" "$BENCH" --target "grpc://$1" --seed 16 --count "$2" --json ac --hits 100 >"$TMP/lat.json" 2>"$TMP/lat.err" ||
    { cat "$TMP/lat.err"; return 1; }
  python3 - "$TMP/lat.json" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
for r in report["kinds"]:
    if r["kind"] == "GetActionResult":
        l = r["latency_ms"]
        print(f"{l['p50']:.2f} {l['p99']:.2f}")
        break
else:
    sys.exit("no GetActionResult figures in " + sys.argv[1])
PYEOF
}
LAT_LOCAL=$(lat 127.0.0.1:9092 20000) || fail "hit latency through region B's replica"
LAT_REMOTE=$(lat "$CENTRE_B" 300) || fail "hit latency across region B's link"

# 4. invalidation propagation: a watcher per region, on its replica.
stamp() { python3 -u -c '
import sys, time
for line in sys.stdin:
    print(int(time.time() * 1000), line.strip(), flush=True)'; }
for ns in A B; do
  (in_ns "${!ns}" "$HOARD" watch --server grpc://127.0.0.1:9092 --from-now 2>"$TMP/watch-$ns.err" | stamp >"$TMP/watch-$ns.log") &
  PIDS+=($!)
done
sleep 2
N=60
for i in $(seq $N); do
  in_ns "$C" "$HOARD" invalidate --server grpc://127.0.0.1:9092 --namespace "topo/ns$((i % 5))" \
    --reason "topology $i" >/dev/null 2>&1 || fail "invalidation $i at the centre"
  sleep 0.1
done
sleep 3
PROP=()
for ns in A B; do
  out=$(python3 - "$TMP/watch-$ns.log" "$N" <<'PYEOF'
import json, statistics, sys
rows = []
for line in open(sys.argv[1]):
    at, _, body = line.partition(" ")
    e = json.loads(body)
    if e.get("reason", "").startswith("topology "):
        rows.append((int(e["reason"].split()[1]), int(at) - int(e["time_unix_ms"])))
n = int(sys.argv[2])
order = [r[0] for r in rows]
if order != list(range(1, n + 1)):
    print(f"BAD {len(rows)} events, order {order[:10]}...")
    sys.exit(0)
d = sorted(r[1] for r in rows)
p99 = d[min(len(d) - 1, int(round(0.99 * (len(d) - 1))))]
print(f"OK {statistics.median(d):.0f} {p99} {max(d)}")
PYEOF
)
  case "$out" in
  OK*) pass "region $ns's watcher saw all $N invalidations once, in order"; PROP+=("$ns ${out#OK }") ;;
  *) cat "$TMP/watch-$ns.err"; fail "region $ns's watcher: $out" ;;
  esac
done

# 5. an invalidation of the builds' instance reaches region B's replica: no stale hit.
in_ns "$C" "$HOARD" invalidate --server grpc://127.0.0.1:9092 --namespace ci/main --reason "toolchain bump" >/dev/null 2>&1 ||
  fail "invalidating ci/main at the centre"
for _ in $(seq 50); do grep -q "toolchain bump" "$TMP/watch-B.log" && break; sleep 0.1; done
ran() { grep -o '[0-9]* processes' "$TMP/build-$1.log" | head -n1 | cut -d' ' -f1; }
if ! grep -q "toolchain bump" "$TMP/watch-B.log"; then
  fail "region B's watcher did not see the invalidation of ci/main within 5 s"
elif ! build B b-after-invalidation 127.0.0.1:9092; then
  tail -n 20 "$TMP/build-b-after-invalidation.log"; fail "region B's build after the invalidation"
elif [ "$HITS" = 0 ] && [ "$(ran b-after-invalidation)" -gt "$RULES" ]; then
  pass "after the centre invalidated ci/main, region B's build got no stale hit (all $RULES actions ran)"
else
  grep processes "$TMP/build-b-after-invalidation.log"
  fail "region B's build after the invalidation: $HITS remote cache hits"
fi

{
  echo "Link: $LINK. $RULES genrule actions, Bazel 4.2.3, --jobs=16, clean build (\`clean --expunge\`) each time; median of $REPEATS."
  echo
  echo "| region (round trip to the centre) | through its replica, warm | straight to the centre | through its replica, first build (replica cold) |"
  echo "|---|---|---|---|"
  echo "| A (40 ms) | $(median "${awarm[@]}") s | $(median "${adirect[@]}") s | (wrote the cache) |"
  echo "| B (80 ms) | $(median "${warm[@]}") s | $(median "${direct[@]}") s | $B_FIRST s |"
  echo
  echo "GetActionResult hits in region B (hoard-bench ac --hits 100, one connection, one call at a time): through the replica p50/p99 ${LAT_LOCAL/ / / } ms over 20000 lookups (the first of each of the 100 results goes upstream); straight to the centre ${LAT_REMOTE/ / / } ms over 300."
  echo
  echo "| invalidation at the centre → a region's watcher ($N invalidations) | p50 | p99 | max |"
  echo "|---|---|---|---|"
  for row in "${PROP[@]}"; do
    set -- $row
    echo "| region $1 | $2 ms | $3 ms | $4 ms |"
  done
} >"$TMP/report.md"
cat "$TMP/report.md"
info "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
