#!/usr/bin/env python3
"""The DETR encoder's first self-attention, computed once per image instead of once per phrase.

Why: the decoder graph runs every phrase of a request as one batch of N, and its image inputs (the FPN levels, [1,
...]) are expanded to N identical rows before the DETR encoder. Each encoder layer is self-attention over the image
tokens, then cross-attention to the phrase's text, then an MLP. Only the first layer's self-attention block sees
nothing but the image (its input and the position encoding are the same in every row), so its N rows are N copies
of one computation: at full size (5184 tokens, width 256) that is the block's LayerNorm, four projections and a
5184 x 5184 attention per phrase, ~30 GFLOP, about 5% of the decoder's FLOPs at 3 phrases and 9% at 8.

The rewrite: row 0 of the block's two inputs (the layer input and the position encoding) goes through the block
(Slice [0:1] on the batch axis), and the block's output, the first residual sum, is expanded back to N rows
(Expand to the layer input's shape) for the cross-attention. The block is every node between those inputs and that
sum (their shape arithmetic included, which then says batch 1 inside the block). Nothing outside the block may read
a tensor inside it, or the rewrite is refused: a batch size read from inside would be 1.

The values are those of the graph before (each row of the block was the same computation; a GEMM over 1 row instead
of N may round differently in the last bit). Checked on the CPU: the bundled model converted, against the unconverted
graph at 1-4 phrases and against the PyTorch references (check_onnx.py). Torch-free, like fused_attention.py; run it
on an export whose attention is fused (the exporter's default) and whose layers are not (fused_layers.py folds the
block's residual sum into the next LayerNorm):

    python shared_first_attention.py --model-dir /models/sam3          # in place (decoder graph, manifest)
    python shared_first_attention.py --src EXPORT --out /tmp/s --check  # a converted copy, checked against the
                                                                        # PyTorch references (exit 1 on failure)
    python shared_first_attention.py --check-fixtures                   # CI: the bundled model, both checks
"""

from __future__ import annotations

import sys
from pathlib import Path

from fused_attention import _Graph, _reads, converter_main, input_dependent, replace_nodes, rewrite_export

LAYER = "/model/detr_encoder/layers.0/"
ROW0 = ("shared_first_attention_zero", "shared_first_attention_one")


def _descendants(g: _Graph, roots: set) -> set:
    """ids of the nodes that read any of `roots`, directly or through other nodes."""
    seen, todo = set(), list(roots)
    while todo:
        for n in g.consumers.get(todo.pop(), []):
            if id(n) not in seen:
                seen.add(id(n))
                todo.extend(o for o in n.output if o)
    return seen


def _ancestors(g: _Graph, tensor: str) -> set:
    """ids of the nodes `tensor` is computed from."""
    seen, todo = set(), [tensor]
    while todo:
        node = g.producer.get(todo.pop())
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            todo.extend(i for i in _reads(node) if i)
    return seen


def _find(g: _Graph):
    """(layer input, position encoding, residual-sum node) of the first encoder layer's self-attention block, or
    None when the graph has no such block in the plain form."""
    norm = next((n for n in g.graph.node if n.op_type == "LayerNormalization"
                 and n.name.startswith(LAYER + "layer_norm1/")), None)
    if norm is None:
        return None
    x = norm.input[0]
    with_pos = [n for n in g.consumers.get(norm.output[0], []) if n.op_type == "Add"]
    residual = [n for n in g.consumers.get(x, []) if n.op_type == "Add" and n is not norm]
    if len(with_pos) != 1 or len(residual) != 1:
        return None
    pos = next((i for i in with_pos[0].input if i != norm.output[0]), None)
    return (x, pos, residual[0]) if pos else None


def share_first_attention(onnx_model) -> dict:
    """Rewrites the block in place; returns {"shared": 1, "nodes": block size}, or {"shared": 0, ...} with the
    reason when the graph has no block to share or something outside reads inside it."""
    from onnx import helper, numpy_helper
    import numpy as np

    graph = onnx_model.graph
    if any(n.name.startswith("shared_first_attention") for n in graph.node):
        return {"shared": 0, "reason": "already shared"}
    g = _Graph(graph)
    found = _find(g)
    if found is None:
        return {"shared": 0, "reason": f"no {LAYER}layer_norm1 block in the plain form"}
    x, pos, residual = found
    block = _descendants(g, {x, pos}) & (_ancestors(g, residual.output[0]))
    inside = {o for n in graph.node if id(n) in block for o in n.output if o}
    outside_reads = {r for n in graph.node if id(n) not in block for r in _reads(n)} | {o.name for o in graph.output}
    leaks = sorted(outside_reads & (inside - {residual.output[0]}))
    if leaks:
        return {"shared": 0, "reason": f"read outside the block: {leaks[:3]}"}
    # Whatever else the block reads must be the same for every phrase: weights, constants, shape arithmetic of
    # constants. A tensor computed from a graph input other than through x and pos (the text) would differ by row.
    varying = input_dependent(graph)
    reads = {r for n in graph.node if id(n) in block for r in _reads(n) if r}
    per_phrase = sorted((reads - inside - {x, pos}) & varying)
    if per_phrase:
        return {"shared": 0, "reason": f"the block reads per-phrase tensors: {per_phrase[:3]}"}
    x1, pos1, small = "shared_first_attention_x", "shared_first_attention_pos", residual.output[0] + "_one_row"
    shape = "shared_first_attention_shape"
    graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), ROW0[0]),
                              numpy_helper.from_array(np.array([1], np.int64), ROW0[1])])
    rewired = {x: x1, pos: pos1}
    for n in graph.node:
        if id(n) in block:
            for k, name in enumerate(n.input):
                if name in rewired:
                    n.input[k] = rewired[name]
    out = residual.output[0]
    residual.output[0] = small
    tag = "shared_first_attention"
    head = [helper.make_node("Slice", [x, ROW0[0], ROW0[1], ROW0[0]], [x1], name=f"{tag}_x_row0"),
            helper.make_node("Slice", [pos, ROW0[0], ROW0[1], ROW0[0]], [pos1], name=f"{tag}_pos_row0")]
    tail = [helper.make_node("Shape", [x], [shape], name=f"{tag}_shape"),
            helper.make_node("Expand", [small, shape], [out], name=f"{tag}_expand")]
    # The Slices go after whichever of x and pos is made later (before the first node when both are graph
    # inputs), the Expand right after the residual sum: node order stays topological.
    made = [k for k, n in enumerate(graph.node) if x in n.output or pos in n.output]
    if made:
        anchor = graph.node[max(made)]
        placed = {id(anchor): [anchor] + head}
    else:
        placed = {id(graph.node[0]): head + [graph.node[0]]}
    placed[id(residual)] = [residual] + tail
    replace_nodes(graph, placed, set())
    return {"shared": 1, "nodes": len(block)}


def convert_model_dir(src: Path, out: Path | None = None) -> dict:
    """The decoder graph of an export with the first self-attention shared (in place, or into `out` with the other
    files copied); the manifest records `"first_self_attention": "shared"` and the new checksum."""
    return rewrite_export(src, out, ["decoder"], share_first_attention,
                          {"first_self_attention": "shared"})["decoder"]


def _same_as_unconverted(src: Path, converted: Path) -> bool:
    """The converted decoder against the unconverted one on the CPU at 1-4 phrases: every output within fp32
    rounding (the block's GEMMs over 1 row instead of N)."""
    import json

    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((src / "manifest.json").read_text())
    file = manifest["graphs"]["decoder"]["file"]
    a = ort.InferenceSession(str(src / file), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(converted / file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ok = True
    for n in (1, 2, 3, 4):
        feeds = {}
        for i in a.get_inputs():
            dims = [d if isinstance(d, int) else n for d in i.shape]
            if i.type == "tensor(int64)":
                mask = np.zeros(dims, np.int64)
                mask[..., : 3 + n] = 1
                feeds[i.name] = mask
            else:
                feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
        for name, want, got in zip([o.name for o in a.get_outputs()], a.run(None, feeds), b.run(None, feeds)):
            diff = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64)))) if want.size else 0.0
            scale = float(np.max(np.abs(want.astype(np.float64)))) if want.size else 0.0
            # uint8 masks may move by one code where a logit sits on a rounding edge; top-k indices must agree.
            limit = 1.0 if want.dtype == np.uint8 else (0.0 if want.dtype.kind == "i" else 1e-4 * max(1.0, scale))
            same = want.shape == got.shape and diff <= limit
            ok &= same
            if not same:
                print(f"  {n} phrases, {name}: max |d| {diff:.3g} (limit {limit:.3g}) DIFFERS", file=sys.stderr)
        print(f"shared first attention, {n} phrases: outputs {'as' if ok else 'NOT as'} before")
    return ok


def check_fixtures(fixtures: Path) -> int:
    """The bundled model converted: against its unconverted decoder at 1-4 phrases, then check_onnx.py against the
    PyTorch references."""
    import tempfile

    import check_onnx

    bundled = Path(__file__).resolve().parent.parent / "models" / "sam3-tiny"
    with tempfile.TemporaryDirectory() as tmp:
        counts = convert_model_dir(bundled, Path(tmp))
        print(f"shared first attention: {counts}")
        if not counts["shared"] or not _same_as_unconverted(bundled, Path(tmp)):
            return 1
        again = convert_model_dir(Path(tmp), Path(tmp) / "again")
        if again["shared"] or again.get("reason") != "already shared":
            print(f"a converted graph converted again: {again}", file=sys.stderr)
            return 1
        return check_onnx.main(["--model-dir", tmp, "--fixtures", str(fixtures)])


def main(argv=None) -> int:
    return converter_main(
        argv, __doc__, "convert the bundled model and check it against its unconverted decoder and the references "
        "(CI)", check_fixtures, convert_model_dir,
        lambda c: f"first DETR-encoder self-attention shared: {c}",
        lambda c: None if c["shared"] else c["reason"])


if __name__ == "__main__":
    sys.exit(main())
