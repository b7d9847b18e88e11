#!/usr/bin/env python3
"""The decoder returns its mask planes as uint8 probabilities, round(σ(logit) · 255), instead of float32 logits.

Why: the masks are most of what a decoder run returns (top-k: N x K x M x M, 6.6 MB per phrase at full size in
float32), and ONNX Runtime copies every output from the device to the host after the run. The server then turned
each kept plane into σ(logit) · 255 bytes anyway (MASK_FORMAT_PROBABILITY_U8, what the orchestrator asks for). Done
in the graph, the copy, the host buffers and the server's sigmoid pass are a quarter of the size:

    topk_masks_logits f32 --Sigmoid--> x 255 --> + 0.5 --Cast(uint8)--> topk_masks uint8      (same for semantic_seg,
                                                                                              and pred_masks when dense)

Cast truncates toward zero, so `+ 0.5` makes it round half up, what the server's `(σ(l) · 255).round()` does for
these non-negative values. Codes keep the logit's sign exactly: code >= 128 <=> σ(l) · 255 >= 127.5 <=> l >= 0, so
the server's thresholding at the model's pixels is unchanged; between pixels it interpolates logits reconstructed
from the codes (segmenter-svc/src/mask_plane.rs). Scores, boxes and presence stay float32 logits.

The rest of the graph is untouched; the nodes are named `mask_u8_*` (fp16.py takes them off before its conversion and
puts them back after, so they stay float32 and the codes pick up no fp16 rounding). Used by export_sam3.py (`--mask-output u8`, the default); this script also converts an
existing export's decoder (numpy + onnx only, no torch):

    python mask_output.py --model-dir /models/sam3            # in place: decoder.onnx and manifest.json rewritten
    python mask_output.py --check-fixtures                    # CI: old float32-mask graphs converted and checked
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import sam3_common as common

NODE_PREFIX = "mask_u8_"
SCALE, HALF = NODE_PREFIX + "scale", NODE_PREFIX + "half"


def to_u8_masks(onnx_model) -> list[str]:
    """Rewrites the decoder's float32 mask outputs into uint8 probabilities, in place; returns the outputs changed."""
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx_model.graph
    changed = []
    for output in graph.output:
        tensor = output.type.tensor_type
        if output.name not in common.MASK_PLANES or tensor.elem_type == TensorProto.UINT8:
            continue
        if tensor.elem_type != TensorProto.FLOAT:
            raise ValueError(f"decoder output {output.name!r} is not float32 (elem_type {tensor.elem_type})")
        name, logits = output.name, output.name + "_logits"
        for node in graph.node:
            node.output[:] = [logits if o == name else o for o in node.output]
            node.input[:] = [logits if i == name else i for i in node.input]
        for value in graph.value_info:
            if value.name == name:
                value.name = logits
        tag = NODE_PREFIX + name
        graph.node.extend([
            helper.make_node("Sigmoid", [logits], [tag + "_p"], name=tag + "_sigmoid"),
            helper.make_node("Mul", [tag + "_p", SCALE], [tag + "_scaled"], name=tag + "_scale"),
            helper.make_node("Add", [tag + "_scaled", HALF], [tag + "_rounding"], name=tag + "_round"),
            helper.make_node("Cast", [tag + "_rounding"], [name], name=tag + "_cast", to=TensorProto.UINT8),
        ])
        tensor.elem_type = TensorProto.UINT8
        changed.append(name)
    if changed and not any(i.name == SCALE for i in graph.initializer):
        graph.initializer.extend([numpy_helper.from_array(np.array(255.0, np.float32), SCALE),
                                  numpy_helper.from_array(np.array(0.5, np.float32), HALF)])
    return changed


def to_f32_logits(onnx_model) -> list[str]:
    """Undoes `to_u8_masks`, in place: the mask outputs are the float32 logits again. Returns the outputs changed.
    fp16.py converts a graph without the rewrite and applies it again after: the converter would otherwise put
    fp16 casts between the rewrite's float32 nodes (it does so even for blocked nodes)."""
    from onnx import TensorProto

    graph = onnx_model.graph
    changed = [o.name for o in graph.output
               if o.name in common.MASK_PLANES and o.type.tensor_type.elem_type == TensorProto.UINT8]
    if not changed:
        return []
    kept = [n for n in graph.node if not n.name.startswith(NODE_PREFIX)]
    del graph.node[:]
    graph.node.extend(kept)
    back = {name + "_logits": name for name in changed}
    for node in graph.node:
        node.output[:] = [back.get(o, o) for o in node.output]
        node.input[:] = [back.get(i, i) for i in node.input]
    for value in graph.value_info:
        value.name = back.get(value.name, value.name)
    for output in graph.output:
        if output.name in changed:
            output.type.tensor_type.elem_type = TensorProto.FLOAT
    kept_init = [i for i in graph.initializer if i.name not in (SCALE, HALF)]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
    return changed


def convert_model_dir(model_dir: Path) -> list[str]:
    """An export's decoder rewritten to return uint8 mask planes; the manifest follows (output dtypes, checksum)."""
    import onnx

    manifest = json.loads((model_dir / "manifest.json").read_text())
    spec = manifest["graphs"]["decoder"]
    if spec.get("external_data"):
        raise SystemExit("graphs with external data: re-export with --mask-output u8 instead")
    path = model_dir / spec["file"]
    model = onnx.load(str(path))
    changed = to_u8_masks(model)
    if not changed:
        print(f"{model_dir}: the decoder's masks are already uint8")
        return []
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    for output in spec["outputs"]:
        if output["name"] in changed:
            output["dtype"] = "uint8"
    spec["sha256"] = common.sha256_file(path)
    common.write_json(model_dir / "manifest.json", manifest)
    print(f"{path}: {changed} now uint8 probabilities")
    return changed


def check_fixtures() -> int:
    """CI: the rewrite on exports the repository keeps, checked against the PyTorch references with check_onnx.py:
    an old export (the eager dense-decoder fixture, float32 masks) converted; the bundled decoder taken back to
    float32 logits (the top-k form of exports before this change) and rewritten again, byte for byte."""
    import shutil
    import tempfile

    import onnx

    import check_onnx
    import fused_attention

    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "dense"
        fused_attention.eager_fixture_export(old)
        if convert_model_dir(old) != ["pred_masks", "semantic_seg"] or check_onnx.main(["--model-dir", str(old)]):
            return 1
        bundled = fused_attention.BUNDLED_MODEL / "decoder.onnx"
        model = onnx.load(str(bundled))
        if to_f32_logits(model) != ["topk_masks", "semantic_seg"]:
            print("the bundled decoder has no uint8 masks", file=sys.stderr)
            return 1
        logits = Path(tmp) / "topk-f32"
        shutil.copytree(fused_attention.BUNDLED_MODEL, logits)
        onnx.save_model(model, str(logits / "decoder.onnx"))
        manifest = json.loads((logits / "manifest.json").read_text())
        spec = manifest["graphs"]["decoder"]
        for output in spec["outputs"]:
            if output["name"] in common.MASK_PLANES:
                output["dtype"] = "float32"
        spec["sha256"] = common.sha256_file(logits / "decoder.onnx")
        common.write_json(logits / "manifest.json", manifest)
        if check_onnx.main(["--model-dir", str(logits)]):
            return 1
        to_u8_masks(model)
        if model.SerializeToString() != onnx.load(str(bundled)).SerializeToString():
            print("float32 -> uint8 masks does not give the bundled decoder back", file=sys.stderr)
            return 1
    print("mask_output: old float32 exports convert and pass; the bundled decoder round-trips")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="convert this export in place")
    ap.add_argument("--check-fixtures", action="store_true",
                    help="convert the float32-mask graphs kept under tests/fixtures and check them (CI)")
    args = ap.parse_args(argv)
    if args.check_fixtures:
        return check_fixtures()
    if not args.model_dir:
        ap.error("give --model-dir DIR or --check-fixtures")
    convert_model_dir(args.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
