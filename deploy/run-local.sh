#!/usr/bin/env bash
# The main job on this machine, in one command: both services as separate processes (the segmenter on the CPU with
# the bundled tiny model unless MODEL_DIR names a real export, the orchestrator with local storage), the seed's
# example job submitted over gRPC with grpcurl on the bundled example photos, progress streamed, outputs listed and
# a before/after contact sheet rendered.
#
#   bash deploy/run-local.sh                 # bundled random-weight model: real pipeline, meaningless masks
#   MODEL_DIR=/models/sam3 bash deploy/run-local.sh     # a real export (segmenter-svc/export/README.md)
#   SEGMENTER_DEVICE=cuda ORT_DYLIB_PATH=/path/to/gpu/libonnxruntime.so bash deploy/run-local.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
bash .ci/setup >/dev/null
cargo build --release --locked -p segmenter-svc -p orchestrator-svc -p palette-rules --bins 2>&1 | tail -n 2

export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$ROOT/.tools/onnxruntime/libonnxruntime.so.1.31.1}
GRPCURL=$ROOT/.tools/bin/grpcurl
RUN=${RUN_DIR:-$ROOT/.data/run-local}
DATA=${LOCAL_STORAGE_DIR:-$RUN/storage}
MODEL=${MODEL_DIR:-$ROOT/segmenter-svc/models/sam3-tiny}
SEG=127.0.0.1:${SEGMENTER_PORT:-50051}
ORCH=127.0.0.1:${ORCHESTRATOR_PORT:-50052}
USER_ID=test-user
JOB_ID=${JOB_ID:-test-job-$(date +%s)}
mkdir -p "$RUN" "$DATA"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

GRPC_ADDR=$SEG METRICS_ADDR=127.0.0.1:${SEGMENTER_METRICS_PORT:-9091} MODEL_DIR=$MODEL \
  SEGMENTER_DEVICE=${SEGMENTER_DEVICE:-cpu} LOG_FORMAT=text \
  "$ROOT/target/release/segmenter-svc" >"$RUN/segmenter.log" 2>&1 &
pids+=($!)
# A real export on the CPU takes ~37 s an image: the orchestrator's 4 calls in flight need more than the default 120 s.
GRPC_ADDR=$ORCH METRICS_ADDR=127.0.0.1:${ORCHESTRATOR_METRICS_PORT:-9092} SEGMENTER_URL=http://$SEG \
  SEGMENTER_TIMEOUT_SEC=${SEGMENTER_TIMEOUT_SEC:-600} \
  STORAGE_BACKEND=local LOCAL_STORAGE_DIR=$DATA PRESETS_DIR=$ROOT/presets JOB_STORE_PATH=$RUN/jobs.redb \
  "$ROOT/target/release/orchestrator-svc" >"$RUN/orchestrator.log" 2>&1 &
pids+=($!)

wait_serving() {
  for _ in $(seq 1 600); do
    if "$GRPCURL" -plaintext -d '{}' "$1" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then return 0; fi
    sleep 0.2
  done
  echo "$1 did not become SERVING; see $RUN/*.log" >&2
  exit 1
}
wait_serving "$SEG"
wait_serving "$ORCH"
echo "segmenter $SEG and orchestrator $ORCH serving (logs in $RUN)"
"$GRPCURL" -plaintext -d '{}' "$SEG" palette.segmenter.v1.Segmenter/GetModelInfo | grep -E '"(modelId|randomInit|executionProvider)"'

# The bundled example photos become this job's inputs (the key says .jpg; the orchestrator reads any format).
n=0
photos=()
for photo in "$ROOT"/segmenter-svc/tests/fixtures/reference/images/*; do
  mkdir -p "$DATA/inputs/$USER_ID/$JOB_ID"
  cp "$photo" "$DATA/inputs/$USER_ID/$JOB_ID/$n.jpg"
  photos+=("$photo")
  n=$((n + 1))
done

# The seed's example job spec, verbatim but for the ids and imageCount.
SPEC=$(cat <<JSON
{"userId": "$USER_ID", "jobId": "$JOB_ID", "concepts": ["wall", "floor", "furniture"], "rules": [{"ruleId": "rule1", "concept": "wall", "type": "recolor", "params": {"color": "#FF5733"}}], "imageCount": $n}
JSON
)
echo "submitting: $SPEC"
"$GRPCURL" -plaintext -d "$SPEC" "$ORCH" palette.orchestrator.v1.Jobs/SubmitJob >/dev/null
"$GRPCURL" -plaintext -d "{\"userId\": \"$USER_ID\", \"jobId\": \"$JOB_ID\"}" "$ORCH" palette.orchestrator.v1.Jobs/WatchJob \
  | grep -E '"(changedIdx|state|errorCode)"' | sed 's/^ */  /'

echo
echo "outputs under $DATA:"
(cd "$DATA" && find outputs previews -path "*/$JOB_ID/*" -type f | sort | sed 's/^/  /')
echo "  and $(find "$DATA/masks" -path "*/$JOB_ID/*" -type f | wc -l) instance masks under masks/$USER_ID/$JOB_ID/"

befores=() afters=()
for i in $(seq 0 $((n - 1))); do
  out="$DATA/outputs/$USER_ID/$JOB_ID/rule1/$i.jpg"
  if [ -f "$out" ]; then befores+=(--before "${photos[$i]}"); afters+=(--after "$out"); fi
done
if [ ${#afters[@]} -gt 0 ]; then
  "$ROOT/target/release/palette-rules" contact-sheet "${befores[@]}" "${afters[@]}" --out "$RUN/contact-sheet.png"
  echo "before/after: $RUN/contact-sheet.png"
fi
# Another colour on photo 0 without the GPU: PreviewEdit from the job's stored masks, written next to the sheet.
"$GRPCURL" -plaintext -d "{\"userId\": \"$USER_ID\", \"jobId\": \"$JOB_ID\", \"idx\": 0, \"maxSide\": 1024, \"rules\": [{\"ruleId\": \"sage\", \"concept\": \"wall\", \"type\": \"recolor\", \"params\": {\"color\": \"#9CAF88\"}}]}" \
  "$ORCH" palette.orchestrator.v1.Jobs/PreviewEdit \
  | python3 -c 'import sys, json, base64; open(sys.argv[1], "wb").write(base64.b64decode(json.load(sys.stdin)["image"]))' \
    "$RUN/preview-sage.jpg" && echo "preview (PreviewEdit, sage walls, no segmenter call): $RUN/preview-sage.jpg"
if grep -q '"randomInit": "tiny"' <("$GRPCURL" -plaintext -d '{}' "$SEG" palette.segmenter.v1.Segmenter/GetModelInfo); then
  echo "note: the bundled model has RANDOM weights: the pipeline, keys and speed are real; where it paints is not."
fi
