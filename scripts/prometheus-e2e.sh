#!/usr/bin/env bash
# End-to-end check of the dashboard and the alert rules against a real Prometheus.
#
# Usage: scripts/prometheus-e2e.sh HOARD_BINARY HOARD_BENCH_BINARY
#
# 1. `promtool check rules` on deploy/prometheus/hoard-rules.yml, and `promtool check config`
#    on a temporary copy of deploy/prometheus/prometheus.yml pointed at this run's hoard
#    (1 s scrape and evaluation intervals);
# 2. starts hoard (temporary data dir, ops_listen, a small storage.max_size and a 1s
#    min_retention so that eviction happens) and Prometheus (free port, temporary storage);
# 3. drives load with hoard-bench in two instance names (ac, find-missing, mix with misses,
#    so NotFound replies), one call with an invalid instance name (an error reply), an
#    invalidation, and a fill past max_size (evictions);
# 4. runs every PromQL expression of deploy/grafana/hoard.json (each target's `expr`;
#    `$namespace` once as `.*` and once as a real name, `$__rate_interval` as `1m`) and of
#    the rules (as Prometheus loaded them, from /api/v1/rules) through /api/v1/query: each
#    must succeed with a non-empty result. An alert's expr is a condition that is normally
#    false, so its `OP NUMBER` comparisons are removed first (`a < 0.5 and b > 1` is run as
#    `a and b`): what is checked is that the figures it compares exist.
#
# Needs: Debian's prometheus package (promtool comes with it; installed with apt if missing and
# running as root), python3. Only 127.0.0.1 is contacted.
# Environment: KEEP_TMP=1 keeps the temporary directory for debugging.

set -uo pipefail

HOARD=${1:?usage: scripts/prometheus-e2e.sh HOARD_BINARY HOARD_BENCH_BINARY}
BENCH=${2:?usage: scripts/prometheus-e2e.sh HOARD_BINARY HOARD_BENCH_BINARY}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DASHBOARD="$ROOT/deploy/grafana/hoard.json"
RULES="$ROOT/deploy/prometheus/hoard-rules.yml"
PROM_CONFIG="$ROOT/deploy/prometheus/prometheus.yml"

PASSED=0
FAILED=0
info() { echo "prometheus-e2e: $*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
die() { echo "prometheus-e2e: $*" >&2; exit 1; }

[ -x "$HOARD" ] || die "hoard binary '$HOARD' is not executable"
[ -x "$BENCH" ] || die "hoard-bench binary '$BENCH' is not executable"
HOARD=$(cd "$(dirname "$HOARD")" && pwd)/$(basename "$HOARD")
BENCH=$(cd "$(dirname "$BENCH")" && pwd)/$(basename "$BENCH")
command -v python3 >/dev/null 2>&1 || die "python3 is needed"

# apt_install PACKAGE: installs a Debian package, refreshing the package lists once if
# the first try fails (a fresh machine's lists may be missing or stale).
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y "$1" >/dev/null 2>&1 && return 0
  apt-get -o DPkg::Lock::Timeout=900 update >/dev/null 2>&1 || return 1
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y "$1" >/dev/null
}

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || die "prometheus is not installed (and we are not root to apt-get install it)"
  info "prometheus not found; installing Debian's prometheus"
  apt_install prometheus || die "apt-get install prometheus failed"
fi
info "using $(prometheus --version 2>&1 | head -n1)"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/hoard-prom-e2e.XXXXXX") || die "mktemp failed"
HOARD_PID=""
PROM_PID=""
cleanup() {
  for pid in $PROM_PID $HOARD_PID; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  if [ "${KEEP_TMP:-0}" = 1 ]; then info "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

finish() {
  if [ "$FAILED" -ne 0 ]; then
    echo "--- hoard log (tail) ---"; tail -n 20 "$TMP/hoard.log" 2>/dev/null
    echo "--- prometheus log (tail) ---"; tail -n 20 "$TMP/prometheus.log" 2>/dev/null
  fi
  info "total time ${SECONDS}s"
  echo "prometheus-e2e: $PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ] || exit 1
  exit 0
}
fatal() { fail "$*"; finish; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
# http_ok URL: true when GET URL answers 200.
http_ok() {
  python3 - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}
# wait_for CMD...: retries CMD every 0.2 s for up to 30 s.
wait_for() {
  local _
  for _ in $(seq 150); do "$@" && return 0; sleep 0.2; done
  return 1
}

# --- 1. promtool -------------------------------------------------------------
if out=$(promtool check rules "$RULES" 2>&1); then
  pass "promtool check rules $(basename "$RULES"): $(echo "$out" | grep -o '[0-9]* rules found')"
else
  echo "$out"; fail "promtool check rules $RULES"
fi

# --- 2. hoard ----------------------------------------------------------------
GRPC_PORT=$(free_port) || die "no free port"
OPS_PORT=$(free_port) || die "no free port"
cat >"$TMP/hoard.toml" <<EOF
listen = "127.0.0.1:$GRPC_PORT"
ops_listen = "127.0.0.1:$OPS_PORT"
data_dir = "$TMP/hoard-data"
[storage]
# Small, so that the fill below evicts (and may refuse writes, which the rules watch).
max_size = "48MiB"
min_retention = "1s"
EOF
"$HOARD" serve --config "$TMP/hoard.toml" >"$TMP/hoard.log" 2>&1 &
HOARD_PID=$!
wait_for http_ok "http://127.0.0.1:$OPS_PORT/readyz" || fatal "hoard did not become ready on 127.0.0.1:$OPS_PORT"
pass "hoard serving on 127.0.0.1:$GRPC_PORT, metrics on 127.0.0.1:$OPS_PORT"

# --- Prometheus config: the shipped one, pointed at this hoard -----------------
PROM_PORT=$(free_port) || die "no free port"
mkdir -p "$TMP/prom/data"
cp "$RULES" "$TMP/prom/hoard-rules.yml"
sed -e "s/hoard\.example:9093/127.0.0.1:$OPS_PORT/" \
  -e 's/scrape_interval: 15s/scrape_interval: 1s/' \
  -e 's/evaluation_interval: 15s/evaluation_interval: 1s/' "$PROM_CONFIG" >"$TMP/prom/prometheus.yml"
for want in "127.0.0.1:$OPS_PORT" "scrape_interval: 1s" "evaluation_interval: 1s" "- hoard-rules.yml"; do
  grep -qF -- "$want" "$TMP/prom/prometheus.yml" || fatal "could not point the config at the test: '$want' missing (did prometheus.yml change?)"
done
if out=$(promtool check config "$TMP/prom/prometheus.yml" 2>&1); then
  pass "promtool check config (prometheus.yml pointed at 127.0.0.1:$OPS_PORT)"
else
  echo "$out"; fail "promtool check config"
fi

prometheus --config.file="$TMP/prom/prometheus.yml" --storage.tsdb.path="$TMP/prom/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!
wait_for http_ok "http://127.0.0.1:$PROM_PORT/-/ready" || fatal "prometheus did not become ready on 127.0.0.1:$PROM_PORT"
pass "prometheus ready on 127.0.0.1:$PROM_PORT"

# --- 3. load -----------------------------------------------------------------
TARGET="grpc://127.0.0.1:$GRPC_PORT"
bench() { "$BENCH" --target "$TARGET" "$@" >>"$TMP/bench.log" 2>&1; }
# Two instance names, so per-namespace series exist. Counted, so that all of it fits in
# max_size until the fill.
bench --instance e2e/main --concurrency 4 --count 1500 ac || fail "hoard-bench ac (e2e/main)"
bench --instance e2e/branch --concurrency 4 --count 1000 ac || fail "hoard-bench ac (e2e/branch)"
bench --instance e2e/main --duration 3s find-missing --digests 100 || fail "hoard-bench find-missing (e2e/main)"
bench --instance e2e/branch --duration 3s find-missing --digests 100 || fail "hoard-bench find-missing (e2e/branch)"
# Misses: GetActionResult NOT_FOUND (normal, not an error).
bench --instance e2e/branch --count 150 mix --hit-ratio 0.5 --pool 10 --large-output-size 64KiB \
  || fail "hoard-bench mix (e2e/branch)"
# An error reply: an invalid instance name is INVALID_ARGUMENT (the bench is expected to fail).
if bench --instance "bad name" --count 1 ac; then fail "an invalid instance name was accepted"; fi
"$HOARD" invalidate --server "$TARGET" --namespace e2e/branch --reason "prometheus-e2e" >>"$TMP/bench.log" 2>&1 \
  || fail "hoard invalidate"
# Past max_size: evictions, so hoard_youngest_evicted_age_seconds exists. With writes faster
# than eviction some may be refused; the bench's exit status is not the point here.
bench --instance e2e/main --count 400 --duration 15s fill --blobs 100 --large-every 4 --large-max 1MiB || true
# Eviction runs in the background: wait for its gauge.
evicted() {
  python3 -c "import urllib.request,sys; sys.exit('hoard_youngest_evicted_age_seconds ' not in urllib.request.urlopen('http://127.0.0.1:$OPS_PORT/metrics', timeout=5).read().decode())" 2>/dev/null
}
wait_for evicted || fail "the fill evicted nothing (no hoard_youngest_evicted_age_seconds)"
pass "load driven (bench log: $(wc -l <"$TMP/bench.log") lines)"

# --- 4. every expression through the query API ----------------------------------
# Wait until the recording rules have been evaluated on data scraped after the load.
sleep 3
python3 - "$PROM_PORT" "$DASHBOARD" "$RULES" <<'EOF' | tee "$TMP/queries.log"
import json, re, sys, time, urllib.parse, urllib.request

port, dashboard_path, rules_path = sys.argv[1], sys.argv[2], sys.argv[3]
base = f"http://127.0.0.1:{port}/api/v1"

def get(path, **params):
    url = f"{base}/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)

def query(expr):
    return get("query", query=expr)

passed = failed = 0
def check(label, expr):
    global passed, failed
    r = query(expr)
    if r.get("status") != "success":
        failed += 1
        print(f"FAIL: {label}: {r.get('errorType')}: {r.get('error')}\n      {expr}")
        return
    res = r["data"]["result"]
    if not res:
        failed += 1
        print(f"FAIL: {label}: empty result\n      {expr}")
        return
    passed += 1
    first = res[0].get("value", ["", "?"])[1] if isinstance(res, list) else res
    print(f"PASS: {label}: {len(res)} series (first {first})")

# Recording rules are evaluated every second; wait for the last one to have a value.
for _ in range(60):
    if query("hoard:requests:rate5m")["data"]["result"]:
        break
    time.sleep(0.5)

# The dashboard: every target's expr, with Grafana's variables substituted.
dash = json.load(open(dashboard_path))
def targets(panels):
    for p in panels:
        yield from ((p["title"], t) for t in p.get("targets", []))
        yield from targets(p.get("panels", []))
exprs = [(title, t["expr"]) for title, t in targets(dash["panels"]) if "expr" in t]
if not exprs:
    failed += 1
    print("FAIL: the dashboard has no expressions")
for title, expr in exprs:
    for ns in ([".*", "e2e/branch"] if "$namespace" in expr else [None]):
        e = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "5m")
        if ns is not None:
            e = e.replace("$namespace", ns)
        label = f"dashboard '{title}'" + (f" (namespace {ns})" if ns else "")
        if "$" in e:
            failed += 1
            print(f"FAIL: {label}: unsubstituted variable\n      {e}")
            continue
        check(label, e)

# The namespace variable: label_values(hoard_ac_lookups_total, namespace) must offer both names.
var = next(v for v in dash["templating"]["list"] if v["name"] == "namespace")
m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
values = get("label/" + m.group(2) + "/values", **{"match[]": m.group(1)})["data"] if m else []
if {"e2e/main", "e2e/branch"} <= set(values):
    passed += 1
    print(f"PASS: dashboard variable namespace offers {values}")
else:
    failed += 1
    print(f"FAIL: dashboard variable namespace ({var['definition']}) offers {values}")

# The rules, as Prometheus loaded them from rule_files.
loaded = [r for g in get("rules")["data"]["groups"] for r in g["rules"]]
in_file = len(re.findall(r"^\s*- (?:alert|record):", open(rules_path).read(), re.M))
if len(loaded) == in_file and in_file > 0:
    passed += 1
    print(f"PASS: prometheus loaded all {in_file} rules of hoard-rules.yml")
else:
    failed += 1
    print(f"FAIL: prometheus loaded {len(loaded)} rules, hoard-rules.yml has {in_file}")
comparison = re.compile(r"\s*(?:==|!=|<=|>=|<|>)\s*(?:bool\s+)?-?[0-9][0-9.eE+-]*")
for rule in loaded:
    if rule.get("health") not in ("ok", "unknown"):
        failed += 1
        print(f"FAIL: rule {rule['name']}: health {rule.get('health')}: {rule.get('lastError')}")
    if rule["type"] == "alerting":
        figures = comparison.sub("", rule["query"])
        check(f"alert {rule['name']} (without its comparisons)", figures)
    else:
        check(f"recording rule {rule['name']}", rule["query"])
        check(f"recorded series {rule['name']}", rule["name"])

print(f"queries: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
EOF
rc=${PIPESTATUS[0]}
# Count the queries in the summary too.
read -r qpass qfail < <(sed -n 's/^queries: \([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$TMP/queries.log")
PASSED=$((PASSED + ${qpass:-0}))
FAILED=$((FAILED + ${qfail:-0}))
[ "$rc" -eq 0 ] || [ "${qfail:-0}" -gt 0 ] || fail "the query checks did not run to the end (above)"
finish
