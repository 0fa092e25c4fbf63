"""Helper of scripts/bench-bazel.sh (not run on its own): workspace generation, Bazel profile
and hoard /metrics parsing, and the summary table.

  gen WS LIBS SEED              write the C++ workspace
  profile PROFILE.json.gz OUT   one run's figures from Bazel's --profile, as JSON in OUT
  metrics BEFORE AFTER OUT      GetActionResult duration buckets added between two /metrics scrapes
  summary RUNS_DIR JOBS         the markdown table (stdout)
"""
import glob
import gzip
import json
import os
import random
import re
import statistics
import sys


def gen(ws, libs, seed):
    rng = random.Random(seed)
    width = 15 if libs >= 45 else max(3, libs // 3)
    layers = [list(range(i, min(i + width, libs))) for i in range(0, libs, width)]
    deps = {}
    for k, layer in enumerate(layers):
        for lib in layer:
            deps[lib] = [] if k == 0 else sorted(rng.sample(layers[k - 1], min(len(layers[k - 1]), rng.randint(2, 4))))
    for lib in range(libs):
        d = os.path.join(ws, "libs", "l%03d" % lib)
        os.makedirs(d, exist_ok=True)
        nsrc = rng.randint(2, 4)
        fns = ["l%03d_f%d" % (lib, i) for i in range(nsrc)]
        # Plain C++ without standard headers: compiles stay cheap (the cold builds are not what is
        # measured), the tables give objects of a few KiB.
        with open(os.path.join(d, "l%03d.h" % lib), "w") as f:
            f.write("#pragma once\n" + "".join("long %s(long x);\n" % fn for fn in fns))
        for i, fn in enumerate(fns):
            with open(os.path.join(d, "s%d.cc" % i), "w") as f:
                f.write('#include "libs/l%03d/l%03d.h"\n' % (lib, lib))
                f.write("".join('#include "libs/l%03d/l%03d.h"\n' % (p, p) for p in deps[lib]))
                n = rng.randint(200, 2000)
                f.write("\nnamespace {\nconst long kTable[%d] = {%s};\n}\n\n"
                        % (n, ", ".join(str(rng.randint(0, 1 << 30)) for _ in range(n))))
                f.write("long %s(long x) {\n  long r = kTable[x %% %d];\n" % (fn, n))
                f.write("".join("  r ^= l%03d_f0(x + %d);\n" % (p, rng.randint(1, 9)) for p in deps[lib]))
                f.write("  for (int i = 0; i < %d; ++i) r = r * 31 + kTable[(r & 0x7fffffff) %% %d];\n  return r;\n}\n"
                        % (rng.randint(2, 9), n))
        with open(os.path.join(d, "BUILD"), "w") as f:
            f.write('package(default_visibility = ["//visibility:public"])\n\ncc_library(\n'
                    '    name = "l%03d",\n    srcs = [%s],\n    hdrs = ["l%03d.h"],\n    deps = [%s],\n)\n'
                    % (lib, ", ".join('"s%d.cc"' % i for i in range(nsrc)), lib,
                       ", ".join('"//libs/l%03d"' % p for p in deps[lib])))
    top = layers[-1] + (layers[-2] if len(layers) > 1 else [])
    bins = os.path.join(ws, "bins")
    os.makedirs(bins, exist_ok=True)
    with open(os.path.join(bins, "BUILD"), "w") as f:
        for b in range(4):
            use = sorted(rng.sample(top, min(len(top), rng.randint(3, 5))))
            f.write('cc_binary(\n    name = "app%d",\n    srcs = ["app%d.cc"],\n    deps = [%s],\n)\n\n'
                    % (b, b, ", ".join('"//libs/l%03d"' % p for p in use)))
            with open(os.path.join(bins, "app%d.cc" % b), "w") as g:
                g.write("".join('#include "libs/l%03d/l%03d.h"\n' % (p, p) for p in use))
                g.write("#include <cstdio>\nint main() {\n  long n = 0;\n")
                g.write("".join("  n ^= l%03d_f0(%d);\n" % (p, b) for p in use))
                g.write('  std::printf("app%d %%ld\\n", n);\n  return 0;\n}\n' % b)
    print("%d libraries in %d layers, %d source files, 4 binaries" % (
        libs, len(layers), len(glob.glob(os.path.join(ws, "libs", "*", "*.cc")))))


def quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = q * (len(xs) - 1)
    lo = int(i)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def profile(path, out):
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    markers = sorted((e["ts"], e["name"]) for e in events
                     if e.get("cat") == "build phase marker" and "ts" in e)
    ends = [e["ts"] + e.get("dur", 0) for e in events if "ts" in e]
    exec_start = next((ts for ts, name in markers if name == "Build artifacts"), None)
    if exec_start is None:
        sys.exit("no 'Build artifacts' phase marker in %s (markers: %s)" % (path, [m[1] for m in markers]))
    exec_end = next((ts for ts, _ in markers if ts > exec_start), max(ends))
    spans = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            spans.setdefault((e.get("cat", ""), e.get("name", "")), []).append(e["dur"] / 1000.0)
    checks = spans.get(("remote action cache check", "check cache hit"), [])
    downloads = spans.get(("remote output download", "download outputs"), [])
    top = sorted(((sum(v), len(v), c, n) for (c, n), v in spans.items()), reverse=True)[:12]
    json.dump({
        "exec_s": (exec_end - exec_start) / 1e6,
        "phases": [name for _, name in markers],
        "checks_ms": checks,
        "downloads_ms": downloads,
        "top_spans": [{"cat": c, "name": n, "count": k, "sum_ms": round(s, 1)} for s, k, c, n in top],
    }, open(out, "w"))


def buckets(path):
    got = {}
    for line in open(path):
        m = re.match(r'hoard_request_duration_seconds_bucket\{(.*)\} (\S+)', line)
        if m and 'method="GetActionResult"' in m.group(1):
            le = re.search(r'le="([^"]+)"', m.group(1)).group(1)
            got[float("inf") if le == "+Inf" else float(le)] = float(m.group(2))
    return got


def metrics(before, after, out):
    b, a = buckets(before), buckets(after)
    json.dump(sorted((le, a[le] - b.get(le, 0.0)) for le in a), open(out, "w"))


def hist_quantile(cum, q):
    """Prometheus-style: linear interpolation inside the bucket (cum: sorted (le, count))."""
    total = cum[-1][1]
    if total == 0:
        return float("nan")
    rank, prev_le, prev_c = q * total, 0.0, 0.0
    for le, c in cum:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c
    return prev_le


# In the order of the summary; "warm-up" (the warm-server phase's first, untimed pair) is left out.
PHASES = ("cold", "warm", "warm-minimal", "warm-server")


def summary(runs, jobs):
    rows = [json.loads(l) for l in open(os.path.join(runs, "runs.jsonl"))]
    def fmt(xs, unit="s", scale=1.0, digits=2):
        xs = [x * scale for x in xs]
        return "%.*f %s (%.*f–%.*f)" % (digits, statistics.median(xs), unit, digits, min(xs), digits, max(xs))
    print("| backend | phase | runs | wall time, median (min–max) | execution phase | cache checks per run | check median | check p90 | output downloads per run | CPU: Bazel server | CPU: hoard | machine idle |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    med = {}
    for backend in ("disk", "hoard"):
        for phase in PHASES:
            rs = [r for r in rows if r["backend"] == backend and r["phase"] == phase]
            if not rs:
                continue
            checks = [c for r in rs for c in r["checks_ms"]]
            downloads = [len(r["downloads_ms"]) for r in rs]
            med[backend, phase] = (statistics.median(r["wall_s"] for r in rs), statistics.median(r["exec_s"] for r in rs))
            print("| %s | %s | %d | %s | %s | %d | %.2f ms | %.2f ms | %d | %.2f s | %.2f s | %.0f%% |" % (
                backend, phase, len(rs), fmt([r["wall_s"] for r in rs]), fmt([r["exec_s"] for r in rs]),
                statistics.median(len(r["checks_ms"]) for r in rs), quantile(checks, 0.5), quantile(checks, 0.9),
                statistics.median(downloads), statistics.median(r.get("bazel_cpu_s", 0) for r in rs),
                statistics.median(r.get("hoard_cpu_s", 0) for r in rs), 100 * statistics.median(r.get("idle", 0) for r in rs)))
    print()
    for phase in PHASES[1:]:
        if ("disk", phase) in med and ("hoard", phase) in med:
            (dw, de), (hw, he) = med["disk", phase], med["hoard", phase]
            print("- %s, hoard/disk: wall %.3fx, execution phase %.3fx (target for warm: <= 1.05x)" % (phase, hw / dw, he / de))
    hist = {}
    for path in sorted(glob.glob(os.path.join(runs, "metrics-*.json"))):
        phase = re.match(r"metrics-(.*)-\d+\.json", os.path.basename(path)).group(1)
        if phase not in PHASES:
            continue
        acc = hist.setdefault(phase, {})
        for le, c in json.load(open(path)):
            acc[le] = acc.get(le, 0.0) + c
    for phase, acc in sorted(hist.items()):
        cum = sorted(acc.items())
        print("- hoard's own GetActionResult duration (/metrics, %s, --jobs=%s, %d calls): median %.2f ms, p90 %.2f ms "
              "(interpolated in buckets 0.1/0.25/0.5/1/2.5/5 ms)" % (
                  phase, jobs, cum[-1][1], hist_quantile(cum, 0.5) * 1e3, hist_quantile(cum, 0.9) * 1e3))
    if ("disk", "warm-minimal") not in med:
        note = os.path.join(runs, "disk-minimal-note.txt")
        if os.path.exists(note):
            print("- disk cache with --remote_download_minimal: " + open(note).read().strip())
    print()
    print("Heaviest profile spans, median run of each warm phase (sum of span durations across threads):")
    print()
    for backend in ("disk", "hoard"):
        for phase in PHASES[1:]:
            rs = sorted((r for r in rows if r["backend"] == backend and r["phase"] == phase), key=lambda r: r["exec_s"])
            if rs:
                r = rs[len(rs) // 2]
                print("- %s %s: %s" % (backend, phase, "; ".join(
                    "%s/%s %d× %.0f ms" % (s["cat"], s["name"], s["count"], s["sum_ms"]) for s in r["top_spans"][:6])))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "gen":
        gen(args[0], int(args[1]), int(args[2]))
    elif cmd == "profile":
        profile(args[0], args[1])
    elif cmd == "metrics":
        metrics(args[0], args[1], args[2])
    elif cmd == "summary":
        summary(args[0], args[1])
    else:
        sys.exit("unknown command " + cmd)
