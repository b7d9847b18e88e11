#!/usr/bin/env bash
# The segmenter's GPU benchmark in ONE device call: full-size random SAM3 exported with the project's exporter,
# HF PyTorch reference (bf16 autocast, then TF32) on the same GPU in the same run, segmenter-bench through gRPC on the
# CUDA EP (fp32 graphs, then fp16 graphs), one table. Everything lands in $OUT (log.txt, hf_reference.json,
# bench_fp32.json, bench_fp16.json, summary.md).
#
# HERE, once (2-3 minutes; see README.md beside this file):
#   bash segmenter-svc/bench/prepare-device.sh        # release binaries -> .gpu-bin/, ORT GPU parts -> .gpu/
# DEVICE, back to back (the machine is given back after ~30 s idle and /tmp with it), repo-root-relative paths:
#   call k = 0..N-1 (N = number of .gpu/part* folders, 5 for ORT 1.31.1; prepare-device.sh prints the calls):
#       carry [".gpu/part<k>"]   command: mkdir -p /tmp/gpu-parts && cp .gpu/part<k>/* /tmp/gpu-parts/   timeout_s 60
#   last call:
#       carry [".gpu-bin"]       command: bash segmenter-svc/bench/gpu-run.sh                             timeout_s 600
#   (gpu-run.sh runs /tmp/gpu-parts/assemble.sh itself when /tmp/ort-gpu/env.sh is missing.)
# Then read files_at/summary.md and log.txt; give_back unless rerunning at once.
#
# Time: ~6.5 min expected (exports ~2 min with fp32 and fp16 side by side on the CPUs, HF reference ~1.5 min, bench
# ~1.5 min per precision), bounded at GPU_RUN_BUDGET_S (default 540 s): every step has a timeout and fp16 is skipped
# when too little time is left. Knobs (env): GPU_RUN_BUDGET_S, FP16=0|1, REQUESTS (20), WARMUP (3), HF_RUNS (20),
# HF_MODES (bf16,tf32), CONCEPTS (1,3,8), CONCURRENCY (1,4); PY, MODELS; BENCH_SIZE=tiny BENCH_DEVICE=cpu test the
# GPU-mode path (assemble, env.sh, the GPU ORT library) on a machine without a GPU.
#
# HERE, test the plumbing without a GPU (tiny model, CPU, no assemble; OUT defaults to /tmp/gpu-run-dry/out):
#   bash segmenter-svc/bench/gpu-run.sh --cpu-dry-run
set -euo pipefail

DRY=0
if [[ ${1:-} == --cpu-dry-run ]]; then DRY=1; shift; fi
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BIN=$ROOT/.gpu-bin
BPE=$BIN/bpe_simple_vocab_16e6.txt.gz
IMG=$BIN/room_1008.jpg

if ((DRY)); then
  OUT=${OUT:-/tmp/gpu-run-dry/out}
  PY=${PY:-$ROOT/.venv-export/bin/python}
  MODELS=${MODELS:-/tmp/gpu-run-dry/models}
  SIZE=tiny DEVICE=cpu
  REQUESTS=${REQUESTS:-5} WARMUP=${WARMUP:-1} HF_RUNS=${HF_RUNS:-3} HF_WARMUP=${HF_WARMUP:-1}
  HF_MODES=${HF_MODES:-bf16,fp32}
else
  : "${OUT:?OUT is not set: run this on the device machine (or with --cpu-dry-run here)}"
  PY=${PY:-python3}
  MODELS=${MODELS:-/tmp/models}
  SIZE=${BENCH_SIZE:-full} DEVICE=${BENCH_DEVICE:-cuda}   # overridable only to test this path without a GPU
  REQUESTS=${REQUESTS:-20} WARMUP=${WARMUP:-3} HF_RUNS=${HF_RUNS:-20} HF_WARMUP=${HF_WARMUP:-5}
  HF_MODES=${HF_MODES:-bf16,tf32}
fi
BUDGET=${GPU_RUN_BUDGET_S:-540}
FP16=${FP16:-1}
CONCEPTS=${CONCEPTS:-1,3,8}
CONCURRENCY=${CONCURRENCY:-1,4}
mkdir -p "$OUT" "$MODELS"
rm -f "$OUT"/log.txt "$OUT"/summary.md "$OUT"/hf_reference.json "$OUT"/bench_fp32.json "$OUT"/bench_fp16.json
export PYTHONUNBUFFERED=1
T0=$SECONDS
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { printf '[gpu-run %4ds] %s\n' $((SECONDS - T0)) "$*"; }
# cap T: a step's timeout, never past the budget (minus 15 s for the summary)
cap() { local l; l=$(($(left) - 15)); ((l < 1)) && l=1; ((l < $1)) && echo "$l" || echo "$1"; }
STATUS=()
step() {  # step NAME TIMEOUT CMD...: runs CMD under a timeout, records ok/rc, never aborts the script
  local name=$1 t rc=0; t=$(cap "$2"); shift 2
  log "START $name (timeout ${t}s, $(left)s of budget left)"
  timeout -k 10 "$t" "$@" || rc=$?
  log "END $name rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  STATUS+=("$name=$rc")
  return "$rc"
}

main() {
log "mode: $( ((DRY)) && echo 'CPU DRY RUN (tiny model)' || echo 'GPU') root=$ROOT out=$OUT models=$MODELS budget=${BUDGET}s"
for f in "$BIN/segmenter-bench" "$BPE" "$IMG"; do
  [[ -e $f ]] || { log "missing $f: run segmenter-svc/bench/prepare-device.sh here and carry .gpu-bin"; exit 2; }
done
log "binaries built from: $(head -1 "$BIN/BUILD_INFO" 2>/dev/null || echo unknown)"
# Where git is available (here, not on the device), a binary older than the segmenter's sources is stale.
if git rev-parse --git-dir >/dev/null 2>&1 && [[ -s $BIN/BUILD_INFO ]]; then
  newest=$(git log -1 --format=%H -- segmenter-svc/src proto Cargo.lock)
  if ! git merge-base --is-ancestor "$newest" "$(head -1 "$BIN/BUILD_INFO")" 2>/dev/null; then
    log "STALE: .gpu-bin was built before the last change to segmenter-svc/src ($newest): run prepare-device.sh"; exit 2
  fi
fi

# ---- ONNX Runtime GPU libraries ---------------------------------------------------------------------------------
LD0=${LD_LIBRARY_PATH:-}   # the machine's own setting: the Python steps (torch, exporter) keep it
if ((DRY)); then
  export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$ROOT/.tools/onnxruntime/libonnxruntime.so.1.31.1}
else
  if [[ ! -f /tmp/ort-gpu/env.sh ]]; then
    [[ -f /tmp/gpu-parts/assemble.sh ]] || { log "no /tmp/ort-gpu and no /tmp/gpu-parts: make the part calls first (header)"; exit 2; }
    step assemble 120 bash /tmp/gpu-parts/assemble.sh
  fi
  # shellcheck disable=SC1091
  . /tmp/ort-gpu/env.sh   # ORT_DYLIB_PATH, ORT_GPU_CUDA_LIB_DIR, ORT_GPU_CUDNN_LIB_DIR, LD_LIBRARY_PATH for the Rust binary
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm --format=csv || true
fi
# Python runs with the LD_LIBRARY_PATH it had before env.sh: env.sh puts ORT 1.31.1's libraries first, and the
# image's torch / onnxruntime 1.30 were verified without them.
if [[ -n $LD0 ]]; then PYCMD=(env "LD_LIBRARY_PATH=$LD0" "$PY"); else PYCMD=(env -u LD_LIBRARY_PATH "$PY"); fi
log "ORT_DYLIB_PATH=$ORT_DYLIB_PATH CUDA=${ORT_GPU_CUDA_LIB_DIR:-} CUDNN=${ORT_GPU_CUDNN_LIB_DIR:-}"
"${PYCMD[@]}" -c 'import torch, transformers, onnx, onnxruntime as o; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "onnx", onnx.__version__, "onnxruntime", o.__version__)' || true
nproc; free -g | head -2 || true

# ---- 1. export fp32 and fp16 side by side (CPU only; nothing is timed meanwhile) -------------------------------------
# Each exporter gets half the cores (taskset) and sees that many (os.cpu_count is what export_sam3.main sizes torch's
# thread pool by); OMP_WAIT_POLICY=PASSIVE keeps idle OpenMP threads from spinning on the other half.
EXPORT_PY='
import os, sys
os.cpu_count = lambda: len(os.sched_getaffinity(0))
sys.path.insert(0, "segmenter-svc/export")
import export_sam3
sys.exit(export_sam3.main(sys.argv[1:]))'
NCPU=$(nproc)
half=$((NCPU / 2)); ((half < 1)) && half=1
((FP16)) || half=$NCPU
export_bg() {  # export_bg PRECISION CPUSET TIMEOUT: starts one export in the background, its pid in $!
  local pin=()
  if command -v taskset >/dev/null; then pin=(taskset -c "$2"); fi
  timeout -k 10 "$3" "${pin[@]}" env OMP_WAIT_POLICY=PASSIVE "${PYCMD[@]}" -c "$EXPORT_PY" --random-init "$SIZE" \
    --seed 0 --precision "$1" --clip-bpe "$BPE" --out "$MODELS/sam3-$SIZE-$1" > "$MODELS/export_$1.log" 2>&1 &
}
log "START export fp32$( ((FP16)) && echo ' + fp16') ($SIZE)"
rm -rf "$MODELS/sam3-$SIZE-fp32" "$MODELS/sam3-$SIZE-fp16"
export_bg fp32 "0-$((half - 1))" "$(cap 300)"; P32=$!
if ((FP16)); then export_bg fp16 "$((half < NCPU ? half : 0))-$((NCPU - 1))" "$(cap 240)"; P16=$!; fi
rc32=0; wait "$P32" || rc32=$?
log "END export fp32 rc=$rc32$( ((rc32 == 124 || rc32 == 137)) && echo ' (TIMED OUT)')"; sed 's/^/  [export fp32] /' "$MODELS/export_fp32.log"; STATUS+=("export_fp32=$rc32")
if ((FP16)); then
  rc16=0; wait "$P16" || rc16=$?
  log "END export fp16 rc=$rc16$( ((rc16 == 124 || rc16 == 137)) && echo ' (TIMED OUT)')"; sed 's/^/  [export fp16] /' "$MODELS/export_fp16.log"; STATUS+=("export_fp16=$rc16")
  ((rc16 == 0)) || FP16=0
fi
du -sh "$MODELS"/* || true

# ---- 2. HF PyTorch reference on the same GPU ------------------------------------------------------------------------
HF_JSON=$OUT/hf_reference.json
step hf_reference 180 "${PYCMD[@]}" segmenter-svc/bench/hf_reference.py --device "$DEVICE" --random-init "$SIZE" --seed 0 \
  --modes "$HF_MODES" --image "$IMG" --concepts "$CONCEPTS" --runs "$HF_RUNS" --warmup "$HF_WARMUP" \
  --clip-bpe "$BPE" --budget-s 110 --out "$HF_JSON" || true
REF=()
[[ -s $HF_JSON ]] && REF=(--reference-json "$HF_JSON")

# ---- 3. segmenter-bench through gRPC on the CUDA EP --------------------------------------------------------------
export VERIFY_MODEL_CHECKSUMS=false   # the bench loads the graphs twice (server + engine reference): skip 2x hashing
bench() {  # bench PRECISION
  step "bench_$1" 240 "$BIN/segmenter-bench" --device "$DEVICE" --model-dir "$MODELS/sam3-$SIZE-$1" --image "$IMG" \
    --concepts "$CONCEPTS" --concurrency "$CONCURRENCY" --requests "$REQUESTS" --warmup "$WARMUP" \
    "${REF[@]}" --json-out "$OUT/bench_$1.json" || true
}
if ((rc32 == 0)); then bench fp32; else log "fp32 export failed: no fp32 bench"; fi
if ((FP16)); then
  if (($(left) >= 150)); then bench fp16; else log "SKIP bench_fp16: only $(left)s of the budget left"; STATUS+=("bench_fp16=skipped"); fi
fi
if ! ((DRY)); then nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv || true; fi

# ---- 4. one table ---------------------------------------------------------------------------------------------------
log "steps: ${STATUS[*]}"
"${PYCMD[@]}" segmenter-svc/bench/summarize.py --hf "$HF_JSON" --bench "fp32=$OUT/bench_fp32.json" \
  --bench "fp16=$OUT/bench_fp16.json" --out "$OUT/summary.md" || true
log "done in $((SECONDS - T0))s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
}
# a pipeline, not exec > >(tee): the script returns only after tee has written the whole log
main 2>&1 | tee -a "$OUT/log.txt"
