#!/usr/bin/env bash
# Run HERE (the development machine), from anywhere in the repo, before a device session:
#   1. builds the release binaries (segmenter-bench, segmenter-svc) and copies them, stripped, into .gpu-bin/;
#   2. puts beside them what gpu-run.sh needs that the tree lacks: the CLIP BPE vocab (the exporter and
#      hf_reference.py build tokenizer.json from it; the device has no /tmp/oc) and room_1008.jpg (the fixture room
#      photo resized to 1008x1008, the issue's "1008² image");
#   3. makes sure .gpu-bin/ is ignored (.git/info/exclude) and that .gpu/ holds the ORT GPU parts
#      (../shared/gpu/prepare-ort-gpu.sh; needs zstd: apt-get install -y zstd; ~2 minutes of compression);
#   4. checks that the tree that travels plus .gpu-bin fits the device's 64 MiB, and prints the device calls.
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
if ((BUILD)); then
  cargo build --release -p segmenter-svc --bin segmenter-bench --bin segmenter-svc
fi
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
mkdir -p .gpu-bin
for b in segmenter-bench segmenter-svc; do
  [[ -x $TARGET/release/$b ]] || { echo "missing $TARGET/release/$b (build failed?)" >&2; exit 1; }
  strip -o ".gpu-bin/$b" "$TARGET/release/$b"   # the release profile keeps line tables: 78 MB -> ~20 MB
done
.gpu-bin/segmenter-bench --help >/dev/null
# What the binaries were built from: gpu-run.sh logs it, and refuses binaries older than the sources here (a stale
# binary cannot load a model exported by newer scripts).
{ git rev-parse HEAD; git status --porcelain -- segmenter-svc proto Cargo.lock | head -20; } > .gpu-bin/BUILD_INFO

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

# ---- ORT GPU parts ----------------------------------------------------------------------------------------------------
if [[ ! -f .gpu/part0/assemble.sh ]]; then
  PREP=${PREPARE_ORT_GPU:-$ROOT/../shared/gpu/prepare-ort-gpu.sh}
  [[ -f $PREP ]] || PREP=/work/shared/gpu/prepare-ort-gpu.sh
  command -v zstd >/dev/null || { echo "prepare-ort-gpu.sh needs zstd: apt-get install -y zstd" >&2; exit 1; }
  bash "$PREP" .gpu
fi

# ---- what travels ------------------------------------------------------------------------------------------------------
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
bin_bytes=$(du -sb .gpu-bin | cut -f1)
part_max=$(du -sb .gpu/part* | sort -n | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "working tree $(mib "$tree_bytes") + .gpu-bin $(mib "$bin_bytes") = $(mib $((tree_bytes + bin_bytes))); largest part + tree $(mib $((tree_bytes + part_max))) (limit 64 MiB)"
if ((tree_bytes + bin_bytes > 62 * 1048576 || tree_bytes + part_max > 62 * 1048576)); then
  echo "WARNING: a device call would carry more than ~62 MiB; shrink the untracked files in the tree" >&2
fi
ls -la .gpu-bin
n=$(ls -d .gpu/part* | wc -l)
echo
echo "Device calls, back to back (each within ~30 s of the previous one's end):"
for ((k = 0; k < n; k++)); do
  echo "  run carry=[\".gpu/part$k\"] timeout_s=60 command: mkdir -p /tmp/gpu-parts && cp .gpu/part$k/* /tmp/gpu-parts/"
done
echo "  run carry=[\".gpu-bin\"] timeout_s=600 command: bash segmenter-svc/bench/gpu-run.sh"
