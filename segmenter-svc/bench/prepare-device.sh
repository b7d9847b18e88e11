#!/usr/bin/env bash
# Run HERE (the development machine), from anywhere in the repo, before a device session:
#   1. builds segmenter-bench in release mode and puts it, stripped and xz-compressed (the device has xz), into
#      .gpu-bin/ (the bench runs the server in-process: the segmenter-svc binary does not travel);
#   2. puts beside it what gpu-run.sh needs that the tree lacks: the CLIP BPE vocab (the exporter and
#      hf_reference.py build tokenizer.json from it; the device has no /tmp/oc) and room_1008.jpg (the fixture room
#      photo resized to 1008x1008, the issue's "1008² image");
#   3. makes sure .gpu-bin/ and .gpu/ are ignored (.git/info/exclude) and that .gpu/ holds the ORT GPU parts
#      (../shared/gpu/prepare-ort-gpu.sh; needs zstd: apt-get install -y zstd; ~2 minutes of compression), split so
#      that each part call and the main call (.gpu-bin + the last part) fit the device's 64 MiB with the tree;
#   4. checks those sizes and prints the device calls.
#
#   bash segmenter-svc/bench/prepare-device.sh [--clip-bpe PATH] [--skip-build]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BPE_ARG=""
BUILD=1
while (($#)); do
  case $1 in
    --clip-bpe) BPE_ARG=$2; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    *) echo "usage: $0 [--clip-bpe PATH] [--skip-build]" >&2; exit 2 ;;
  esac
done
PY=$ROOT/.venv-export/bin/python
[[ -x $PY ]] || PY=python3

# ---- binaries -------------------------------------------------------------------------------------------------------
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SOURCES=(segmenter-svc/src proto Cargo.lock)
if ((BUILD)); then
  cargo build --release -p segmenter-svc --bin segmenter-bench
elif [[ -x $TARGET/release/segmenter-bench ]]; then
  # BUILD_INFO below names HEAD: with --skip-build that holds only for a binary built after the last change to the
  # segmenter's sources (gpu-run.sh cannot check on the device, which has no git).
  changed=$(git log -1 --format=%ct -- "${SOURCES[@]}")
  built=$(stat -c %Y "$TARGET/release/segmenter-bench")
  if ((built < changed)) || [[ -n $(git status --porcelain -- "${SOURCES[@]}") ]]; then
    echo "--skip-build: $TARGET/release/segmenter-bench is older than the last change to ${SOURCES[*]} (or they" \
      "have uncommitted changes): run without --skip-build" >&2
    exit 1
  fi
fi
mkdir -p .gpu-bin
rm -f .gpu-bin/segmenter-svc .gpu-bin/segmenter-bench   # older layouts carried both, uncompressed
[[ -x $TARGET/release/segmenter-bench ]] || { echo "missing $TARGET/release/segmenter-bench (build failed?)" >&2; exit 1; }
strip -o .gpu-bin/segmenter-bench.tmp "$TARGET/release/segmenter-bench"   # line tables off: ~78 MB -> ~20 MB
.gpu-bin/segmenter-bench.tmp --help >/dev/null
xz -6 -T0 -c .gpu-bin/segmenter-bench.tmp > .gpu-bin/segmenter-bench.xz   # ~20 MB -> ~5 MB
rm -f .gpu-bin/segmenter-bench.tmp
sha256sum .gpu-bin/segmenter-bench.xz | cut -d' ' -f1 > .gpu-bin/segmenter-bench.xz.sha256
# What the binary was built from: gpu-run.sh logs it, and refuses a binary older than the sources here (a stale
# binary cannot load a model exported by newer scripts).
{ git rev-parse HEAD; git status --porcelain -- "${SOURCES[@]}" | head -20; } > .gpu-bin/BUILD_INFO

# ---- CLIP BPE vocab ---------------------------------------------------------------------------------------------------
BPE=.gpu-bin/bpe_simple_vocab_16e6.txt.gz
if [[ -n $BPE_ARG ]]; then
  cp "$BPE_ARG" "$BPE"
elif [[ ! -s $BPE ]]; then
  # the same places export_sam3.find_clip_bpe looks, plus the unpacked wheel
  "$PY" - "$BPE" <<'PY'
import sys, zipfile
from pathlib import Path
dest = Path(sys.argv[1])
name = "bpe_simple_vocab_16e6.txt.gz"
for p in (Path("segmenter-svc/export") / name, Path("/tmp/oc/open_clip") / name):
    if p.exists():
        dest.write_bytes(p.read_bytes()); sys.exit(0)
for d in (Path("/tmp/oc"), Path("segmenter-svc/export/.oc")):
    for whl in sorted(d.glob("open_clip_torch-3.3.0-*.whl")):
        with zipfile.ZipFile(whl) as zf:
            dest.write_bytes(zf.read(f"open_clip/{name}")); sys.exit(0)
sys.exit("CLIP BPE vocab not found: pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc, or pass --clip-bpe")
PY
fi

# ---- the 1008x1008 bench image --------------------------------------------------------------------------------------
if [[ ! -s .gpu-bin/room_1008.jpg ]]; then
  "$PY" -c '
from PIL import Image
im = Image.open("segmenter-svc/tests/fixtures/reference/images/room_640x480.jpg").convert("RGB")
im.resize((1008, 1008), Image.BICUBIC).save(".gpu-bin/room_1008.jpg", quality=92)'
fi

# ---- ignore rules -----------------------------------------------------------------------------------------------------
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
for p in /.gpu-bin/ /.gpu/; do
  grep -qxF "$p" "$EXCLUDE" 2>/dev/null || echo "$p" >> "$EXCLUDE"
done
git check-ignore -q .gpu-bin/segmenter-bench || { echo ".gpu-bin/ is not ignored" >&2; exit 1; }

# ---- what travels: the tree goes with every call ---------------------------------------------------------------------
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
bin_bytes=$(du -sb .gpu-bin | cut -f1)
LIMIT=$((62 * 1048576))   # 64 MiB per call, with ~2 MiB of slack
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

# ---- ORT GPU parts ----------------------------------------------------------------------------------------------------
# Parts as large as a call allows beside the tree: fewer upload calls. The last part rides with the main call when it
# fits beside .gpu-bin; otherwise it gets a call of its own.
if [[ ! -f .gpu/part0/assemble.sh ]]; then
  PREP=${PREPARE_ORT_GPU:-$ROOT/../shared/gpu/prepare-ort-gpu.sh}
  [[ -f $PREP ]] || PREP=/work/shared/gpu/prepare-ort-gpu.sh
  command -v zstd >/dev/null || { echo "prepare-ort-gpu.sh needs zstd: apt-get install -y zstd" >&2; exit 1; }
  part_mib=$(( (LIMIT - tree_bytes) / 1048576 - 2 ))   # part0 also holds assemble.sh and zstd (~1.3 MiB)
  bash "$PREP" .gpu "$part_mib"
fi
n=$(ls -d .gpu/part* | wc -l)
last=.gpu/part$((n - 1))
last_bytes=$(du -sb "$last" | cut -f1)
part_max=$(du -sb .gpu/part* | sort -n | tail -1 | cut -f1)
echo "working tree $(mib "$tree_bytes"), .gpu-bin $(mib "$bin_bytes"), $n parts (largest $(mib "$part_max"), last $(mib "$last_bytes")); limit per call 64 MiB"
if ((tree_bytes + part_max > LIMIT)); then
  echo "ERROR: tree + largest part = $(mib $((tree_bytes + part_max))): shrink the untracked files in the tree, or rm -rf .gpu and rerun" >&2
  exit 1
fi
main_carry="\".gpu-bin\", \"$last\""
uploads=$((n - 1))
if ((tree_bytes + bin_bytes + last_bytes > LIMIT)); then
  main_carry="\".gpu-bin\""; uploads=$n
  echo "(the last part does not fit beside .gpu-bin: it gets its own call)"
fi
main_bytes=$((tree_bytes + bin_bytes))
((uploads < n)) && main_bytes=$((main_bytes + last_bytes))
echo "main call carries $(mib "$main_bytes")"
ls -la .gpu-bin
echo
echo "Device calls, back to back (each within ~30 s of the previous one's end):"
for ((k = 0; k < uploads; k++)); do
  echo "  run carry=[\".gpu/part$k\"] timeout_s=60 command: mkdir -p /tmp/gpu-parts && cp .gpu/part$k/* /tmp/gpu-parts/"
done
echo "  run carry=[$main_carry] timeout_s=600 command: bash segmenter-svc/bench/gpu-run.sh"
