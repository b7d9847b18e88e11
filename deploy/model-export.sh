#!/bin/sh
# One-shot model export into the model volume (the `model-export` target of segmenter-svc/Dockerfile).
#
# Does nothing when "$MODEL_DIR" holds a complete export: manifest.json and every file it lists (unless
# FORCE_EXPORT=1), or when MODEL_DIR is outside the volume (the image's bundled test model). Otherwise exports
# $SAM3_SOURCE_MODEL (default facebook/sam3, a gated repository: needs a token) into a new versioned folder next to
# it and then switches the MODEL_DIR symlink to that folder in one rename, so a segmenter never sees a half-written
# export and the previous export stays on disk for a rollback (see docs/operations.md, "Model export and upgrade").
#
# Environment:
#   MODEL_CACHE_DIR   volume root (default /models)
#   MODEL_DIR         where the segmenter reads the model (default $MODEL_CACHE_DIR/sam3); becomes a symlink
#   SAM3_SOURCE_MODEL Hugging Face repository id (default facebook/sam3)
#   HF_TOKEN          token with access to it; or HF_TOKEN_FILE (default /run/secrets/hf_token) holding it
#   EXPORT_ARGS       extra arguments for export_sam3.py (e.g. "--revision <sha> --fp16"), split on spaces
#   FORCE_EXPORT      1: export even when a model is already there (an upgrade)
#   EXPORT_PARITY     1: before switching, also run the exporter's PyTorch-vs-ONNX Runtime parity check on one
#                     generated photo (make_test_images.py) with three concepts; a disagreement keeps the current
#                     model. Costly on CPU (measured on 2 busy cores: ~40 min and ~17 GB for two photos at full size;
#                     the export alone ~4 min), so off by default: run it once per new revision or precision.
set -eu

MODEL_CACHE_DIR="${MODEL_CACHE_DIR:-/models}"
MODEL_DIR="${MODEL_DIR:-$MODEL_CACHE_DIR/sam3}"
SAM3_SOURCE_MODEL="${SAM3_SOURCE_MODEL:-facebook/sam3}"
HF_TOKEN_FILE="${HF_TOKEN_FILE:-/run/secrets/hf_token}"
EXPORT_ARGS="${EXPORT_ARGS:-}"
FORCE_EXPORT="${FORCE_EXPORT:-0}"
EXPORT_PARITY="${EXPORT_PARITY:-0}"
EXPORTER="${EXPORTER:-/opt/export/export_sam3.py}"
TEST_IMAGES="${TEST_IMAGES:-$(dirname "$EXPORTER")/make_test_images.py}"

log() { printf '%s model-export: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

# Complete = manifest.json (written last by the exporter) and every file it lists.
model_complete() {
    [ -f "$MODEL_DIR/manifest.json" ] || return 1
    python - "$MODEL_DIR" <<'PY' 2>/dev/null
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
m = json.loads((d / "manifest.json").read_text())
files = [m["tokenizer"]["file"]] + [g["file"] for g in m["graphs"].values()] \
    + [f["file"] for g in m["graphs"].values() for f in g.get("external_data", [])]
sys.exit(0 if all((d / f).is_file() and (d / f).stat().st_size > 0 for f in files) else 1)
PY
}

case "$MODEL_DIR" in
    "$MODEL_CACHE_DIR"/*) ;;
    *)
        # e.g. the image's bundled test model: nothing to provision in the volume.
        log "MODEL_DIR $MODEL_DIR is outside the model volume $MODEL_CACHE_DIR; nothing to do"
        exit 0 ;;
esac

if [ "$FORCE_EXPORT" != "1" ] && model_complete; then
    log "model already present at $MODEL_DIR (manifest.json and its files); nothing to do (FORCE_EXPORT=1 re-exports)"
    exit 0
fi

if [ -z "${HF_TOKEN:-}" ] && [ -s "$HF_TOKEN_FILE" ]; then
    HF_TOKEN="$(cat "$HF_TOKEN_FILE")"
fi
if [ -z "${HF_TOKEN:-}" ]; then
    log "no HF_TOKEN (nor $HF_TOKEN_FILE): $SAM3_SOURCE_MODEL is gated; request access and set HF_TOKEN"
    exit 2
fi
export HF_TOKEN

parent="$(dirname "$MODEL_DIR")"
name="$(basename "$MODEL_DIR")"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
target="$parent/$name-$stamp"
partial="$parent/.$name-$stamp.partial"
mkdir -p "$parent"
# Several starters at once (segmenter pods' init containers on a shared volume): one exports, the others wait and
# then find the model complete. flock is in util-linux (every Debian image); without it, concurrent exports still
# end consistently (each switches the link atomically), only wastefully.
locked=0
if command -v flock >/dev/null 2>&1; then
    exec 9>"$parent/.$name.export.lock"
    locked=1
    if ! flock -n 9; then
        log "another export into $parent is running; waiting for it"
        flock 9
        if [ "$FORCE_EXPORT" != "1" ] && model_complete; then
            log "the other export finished: $MODEL_DIR is complete; nothing to do"
            exit 0
        fi
    fi
fi
checks="$parent/.$name-$stamp.parity"
# The exporter's temporary files (the raw fp32 graphs, ~3.4 GB, until the export ends) go on the model volume, not
# /tmp: in Kubernetes that is a 4 GiB emptyDir shared with the segmenter, which a second try in the same pod overran.
tmp="$parent/.$name-$stamp.tmp"
if [ "$locked" = 1 ]; then
    # What an export killed outright (OOM, SIGKILL at the end of a grace period: no trap runs) left behind, up to
    # ~7 GB per try. Only under the lock, only this model's (`.<name>-<digits>...`: not `.sam3-fp16-...`), and only
    # folders untouched for 3 hours: on a shared volume whose filesystem does not carry the lock across nodes
    # another node's export may be writing a younger one (an export takes well under an hour).
    find "$parent" -maxdepth 1 \( -name ".$name-[0-9]*.partial" -o -name ".$name-[0-9]*.parity" \
        -o -name ".$name-[0-9]*.tmp" \) -mmin +180 -exec rm -rf {} +
fi
rm -rf "$partial" "$checks" "$tmp"
trap 'rm -rf "$partial" "$checks" "$tmp"' EXIT INT TERM
mkdir -p "$tmp"
export TMPDIR="$tmp"

set --
if [ "$EXPORT_PARITY" = "1" ]; then
    python "$TEST_IMAGES" --out "$checks/images"
    set -- --parity-out "$checks/out" --images "$checks/images/room_640x480.jpg" --concepts wall floor sofa
    log "exporting $SAM3_SOURCE_MODEL to $target, then checking it against PyTorch (EXPORT_PARITY=1)"
else
    log "exporting $SAM3_SOURCE_MODEL to $target"
fi
# shellcheck disable=SC2086 # EXPORT_ARGS is a list of arguments on purpose
python "$EXPORTER" --model "$SAM3_SOURCE_MODEL" --out "$partial" $EXPORT_ARGS "$@"

for f in vision.onnx text.onnx decoder.onnx tokenizer.json manifest.json; do
    if [ ! -s "$partial/$f" ]; then
        log "export incomplete: $partial/$f is missing or empty"
        exit 1
    fi
done
mv "$partial" "$target"
rm -rf "$checks" "$tmp"
trap - EXIT INT TERM

if [ -e "$MODEL_DIR" ] && [ ! -L "$MODEL_DIR" ]; then
    # A plain folder from an earlier manual export: keep it, under a dated name.
    mv "$MODEL_DIR" "$parent/$name-previous-$stamp"
fi
ln -s "$name-$stamp" "$parent/.$name.link-$stamp"
mv -T "$parent/.$name.link-$stamp" "$MODEL_DIR"
log "done: $MODEL_DIR -> $name-$stamp (restart the segmenter to load it)"
