#!/usr/bin/env python3
"""The vision graph takes the resized photo as uint8 HWC and normalises it itself.

Why: the server resizes every photo to S x S RGB bytes; before, it normalised them into float32 CHW on the host
(3 float passes) and sent 4 bytes per value to the execution provider: 12 MB per 1008² image across PCIe, where the
bytes themselves are 3 MB. Now the graph starts with Transpose (in uint8) -> Cast -> Mul -> Add, which the GPU does in
microseconds, and the host sends the resizer's buffer as it is.

    image_u8 uint8 [B, S, S, 3] --Transpose(0,3,1,2)--> Cast(float) --x 1/(255 std)--> + (-mean/std) --> pixel_values

The rest of the graph is untouched (it still reads the tensor named `pixel_values`), so fp16 conversion, parity and
the other graphs do not change. Used by export_sam3.py (`--image-input u8`, the default); this script also converts
an existing export's vision graph (numpy + onnx only, no torch):

    python image_input.py --model-dir /models/sam3            # in place: vision.onnx and manifest.json rewritten
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import sam3_common as common

FLOAT_INPUT, U8_INPUT = common.IMAGE_INPUTS["f32"][0], common.IMAGE_INPUTS["u8"][0]


def to_u8_input(onnx_model, mean, std) -> None:
    """Replaces the graph's float32 `pixel_values` [B,3,S,S] input with uint8 `image_u8` [B,S,S,3] plus the
    normalisation, in place."""
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx_model.graph
    old = next((i for i in graph.input if i.name == FLOAT_INPUT), None)
    if old is None:
        raise ValueError(f"the vision graph has no {FLOAT_INPUT!r} input (inputs: {[i.name for i in graph.input]})")
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    batch, channels, height, width = dims
    assert channels == 3, dims
    mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (-mean / std).astype(np.float32)
    graph.initializer.extend([numpy_helper.from_array(scale, "image_u8_scale"),
                              numpy_helper.from_array(shift, "image_u8_shift")])
    nodes = [
        helper.make_node("Transpose", [U8_INPUT], ["image_u8_chw"], name="image_u8_to_chw", perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["image_u8_chw"], ["image_u8_float"], name="image_u8_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["image_u8_float", "image_u8_scale"], ["image_u8_scaled"], name="image_u8_scale"),
        helper.make_node("Add", ["image_u8_scaled", "image_u8_shift"], [FLOAT_INPUT], name="image_u8_normalise"),
    ]
    index = list(graph.input).index(old)
    graph.input.remove(old)
    graph.input.insert(index, helper.make_tensor_value_info(U8_INPUT, TensorProto.UINT8,
                                                            [batch, height, width, 3]))
    # Nodes must stay in topological order: the normalisation goes first.
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)


def convert_model_dir(model_dir: Path) -> None:
    """An export's vision graph rewritten to take uint8 HWC; the manifest follows (input spec, checksum)."""
    import onnx

    manifest = json.loads((model_dir / "manifest.json").read_text())
    spec = manifest["graphs"]["vision"]
    if spec["inputs"][0]["name"] == U8_INPUT:
        print(f"{model_dir}: the vision graph already takes {U8_INPUT}")
        return
    if spec.get("external_data"):
        raise SystemExit("graphs with external data: re-export with --image-input u8 instead")
    path = model_dir / spec["file"]
    model = onnx.load(str(path))
    to_u8_input(model, manifest["image_mean"], manifest["image_std"])
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    spec["inputs"] = [common.image_input_spec("u8", manifest["image_size"])]
    spec["sha256"] = common.sha256_file(path)
    common.write_json(model_dir / "manifest.json", manifest)
    print(f"{path}: now takes {U8_INPUT} uint8 [B, S, S, 3]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    convert_model_dir(args.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
