#!/usr/bin/env python3
"""Cuts an export's decoder (or vision) graph into cumulative prefixes, one per section of the model, so that
segmenter-bench --time-sections can time each on the GPU: a prefix's time minus the one before it is what that
section costs inside the real graph (same nodes, same fusions, same provider settings), with no per-node
synchronisation.

Why: ONNX Runtime's CUDA profile is no measure of where the time goes (a profiled vision run took ~212 ms against
23.5 unprofiled on the H200), and the decoder's ~18 ms at 3 concepts is far above what its FLOPs and bytes need;
capturing it in a CUDA graph saved only ~1.5 ms, so most of it is kernel time in some section. This says which.

Sections follow the traced module paths in the node names (torch.onnx names each node after its module; the
converters' fused nodes sit in place, inside their section):

    decoder   inputs and position encodings | DETR encoder | DETR decoder | box head + scoring | mask decoder
              (pixel decoder, masks) | top-k and outputs
    vision    patch embedding | ViT layers | FPN neck

Then the ablations (below): the whole graph with one kernel family passed through, so the bench can say what that
family costs (attention, square-weight MatMuls, RoPE, LayerNorm, GroupNorm, same-shape convolutions).

Prefix k holds every node before section k+1's first node and whatever those read (the fp16 converter's input
casts sit at the end of the node list). Its outputs are the tensors it makes that later nodes read and no node of
its own does (enough to keep each of its nodes): the same values the full graph computes there (checked by --check
on the CPU). The last section's prefix is the graph itself.

    python graph_sections.py --model-dir /tmp/models/sam3-full-fp16-rope --graph decoder --out /tmp/sections
    segmenter-bench --time-sections /tmp/sections --device cuda --concepts 1,3
    python graph_sections.py --check-fixtures     # CI: the bundled tiny model's prefixes and ablations

Needs onnx and numpy (and onnxruntime for the checks); no torch. Node inputs (If branches' outer reads included) are
read as export/fused_attention.py reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "sam3-tiny"
sys.path.insert(0, str(ROOT / "export"))
import fused_attention  # noqa: E402 - the exporter's folder, added just above
import sam3_common as common  # noqa: E402

DECODER_SECTIONS = (
    ("inputs, position encodings", None),
    ("DETR encoder", "/model/detr_encoder/"),
    ("DETR decoder", "/model/detr_decoder/"),
    ("box head, scoring", "/model/box_head/"),
    ("mask decoder", "/model/mask_decoder/"),
    ("top-k, outputs", "/TopK"),
)


def vision_sections(graph) -> tuple:
    """Patch embedding, the ViT layers, the neck. The layers are one section: they are alike but for the four
    global-attention ones, and the attention ablation (below) prices those; quartering them cost four ~1 GB prefixes
    per cut for a split that said little."""
    if not any(n.name.startswith("/encoder/backbone/layers.0/") for n in graph.node):
        raise SystemExit("no /encoder/backbone/layers.N/ nodes: not a SAM3 vision graph of this exporter")
    return (("patch embedding", None), ("ViT layers", "/encoder/backbone/layers.0/"), ("FPN neck", "/encoder/neck/"))


def _reads(node) -> set:
    """A node's inputs and what its subgraphs (If branches) read, as fused_attention.py walks them."""
    return set(fused_attention._reads(node)) - {""}


def boundaries(graph, sections) -> list[int]:
    """The index (in the node list) of each section's first node, after the first section's 0."""
    starts = [0]
    for name, prefix in sections[1:]:
        first = next((i for i, n in enumerate(graph.node) if n.name.startswith(prefix)), None)
        if first is None:
            raise SystemExit(f"section {name!r}: no node named {prefix}*")
        if first <= starts[-1]:
            raise SystemExit(f"section {name!r} starts before the section above it: node order unexpected")
        starts.append(first)
    return starts


def prefix_nodes(graph, end: int) -> list[int]:
    """Indices of the nodes before `end` and every node they read from, in the node list's order."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    keep = set(range(end))
    todo = list(keep)
    while todo:
        for name in _reads(graph.node[todo.pop()]):
            i = producer.get(name)
            if i is not None and i not in keep:
                keep.add(i)
                todo.append(i)
    return sorted(keep)


def _needed(graph, keep: list[int], outputs: list[str]) -> list[int]:
    """The nodes of `keep` that `outputs` need."""
    producer = {o: i for i in keep for o in graph.node[i].output if o}
    need, todo = set(), [producer[o] for o in outputs]
    while todo:
        i = todo.pop()
        if i in need:
            continue
        need.add(i)
        todo.extend(producer[r] for r in _reads(graph.node[i]) if r in producer)
    return sorted(need)


def _types(model, infer: bool) -> dict:
    """Element type per tensor name: declared, inferred by onnx (`infer`: slow on a full-size vision graph, which
    export/fp16.py converts without shape inference, so its value_info holds few types), else per-op rules (the
    type of the node's first input, Cast's target, int64 for Shape, bool for comparisons, ...). The rules alone must
    agree with onnx's inference: --check compares them on the graphs it is given."""
    import onnx

    g = model.graph
    types = {}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False) if infer else onnx.ModelProto()
        for v in inferred.graph.value_info:
            if v.type.tensor_type.elem_type:
                types.setdefault(v.name, v.type.tensor_type.elem_type)
    except Exception as e:  # noqa: BLE001 - inference is a help, the fallback below covers the rest
        print(f"shape inference failed ({e}); element types from the node inputs", file=sys.stderr)
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value":
                types.setdefault(n.output[0], a.t.data_type)
    int64, boolean = onnx.TensorProto.INT64, onnx.TensorProto.BOOL
    fixed = {"Shape": int64, "Size": int64, "NonZero": int64, "ArgMax": int64, "ArgMin": int64, "Equal": boolean,
             "Less": boolean, "LessOrEqual": boolean, "Greater": boolean, "GreaterOrEqual": boolean, "And": boolean,
             "Or": boolean, "Not": boolean, "Xor": boolean, "IsNaN": boolean, "IsInf": boolean}
    for _ in range(3):
        for n in g.node:
            to = next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
            src = types.get(n.input[0]) if n.input and n.input[0] else None
            for k, o in enumerate(n.output):
                if not o or o in types:
                    continue
                if n.op_type == "TopK" and k == 1:
                    types[o] = int64
                elif n.op_type == "Where" and types.get(n.input[1]):
                    types[o] = types[n.input[1]]
                elif n.op_type == "If":
                    branch = next(a.g for a in n.attribute if a.name == "then_branch")
                    types[o] = branch.output[k].type.tensor_type.elem_type
                elif n.op_type == "ConstantOfShape":
                    value = next((a.t for a in n.attribute if a.name == "value"), None)
                    types[o] = value.data_type if value is not None else onnx.TensorProto.FLOAT
                elif n.op_type in fixed or to or src:
                    types[o] = fixed.get(n.op_type) or to or src
    return types


def cut(model, sections, infer: bool | None = None) -> list:
    """The cumulative prefix models (one per section but the last, which is the graph itself), with their names."""
    from onnx import helper

    g = model.graph
    starts = boundaries(g, sections)
    # onnx's inference where it is cheap (every decoder); the per-op rules alone for a full-size vision graph.
    types = _types(model, infer=infer if infer is not None else model.ByteSize() < 500_000_000)
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    varying = fused_attention.input_dependent(g)
    prefixes = []
    for k in range(1, len(sections)):
        keep = prefix_nodes(g, starts[k])
        kept = set(keep)
        made = {o for i in keep for o in g.node[i].output if o}
        later_reads = set()
        for i, n in enumerate(g.node):
            if i not in kept:
                later_reads |= _reads(n)
        # Only what no prefix node reads: enough to keep every prefix node (each has a path to one of these), and
        # the fewest output copies (each costs a copy per run where the timing is made).
        inside_reads = set().union(*(_reads(g.node[i]) for i in keep))
        outs = sorted((made & (later_reads | graph_outputs) & varying) - inside_reads)
        # Constant-only nodes feeding later sections are left to them (ONNX Runtime folds them at session build).
        keep = _needed(g, keep, outs)
        inside_reads = set().union(*(_reads(g.node[i]) for i in keep))
        missing = [o for o in outs if o not in types]
        if missing and infer is not False:
            types = _types(model, infer=True)
            missing = [o for o in outs if o not in types]
        if missing:
            raise SystemExit(f"prefix {k}: no element type known for {missing[:5]}")
        reads = inside_reads
        graph = helper.make_graph(
            [g.node[i] for i in keep], f"{g.name}_prefix{k}",
            [i for i in g.input if i.name in reads],
            [helper.make_tensor_value_info(o, types[o], None) for o in outs],
            [inits[n] for n in sorted(reads) if n in inits])
        prefix = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        prefixes.append((sections[k - 1][0], prefix, len(keep), len(outs)))
    return prefixes


# ----------------------------------------------------------------------------------------------------------- ablations
# A section's time says where, not what: a ViT layer is GEMMs, attention, norms and element-wise kernels alike. An
# ablation is the whole graph with every node of one family replaced by a pass-through (Identity of its first
# input, which ONNX Runtime removes at build): the full graph's time minus the ablation's is what that family's
# kernels cost in place. Only shape-preserving families qualify, so every other kernel keeps its shapes and its
# time (the values change; no kernel here takes data-dependent time). A replaced node's other inputs that nothing
# else reads become graph outputs (left on the device, no copy), so their producers (the k/v projections, the
# DETR decoder's box bias) still run and are not counted as the family's.


def _same_shape_conv(node, inits: dict) -> bool:
    """A 2-D convolution whose output has its input's shape: square weight (C_out = C_in), one group, stride and
    dilation 1, odd kernel padded to "same"."""
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or weight is None:
        return False
    dims = list(weight.dims)
    if len(dims) != 4 or dims[0] != dims[1] or dims[2] % 2 == 0 or dims[3] % 2 == 0:
        return False
    attrs = {a.name: a for a in node.attribute}
    ints = {k: list(a.ints) for k, a in attrs.items() if a.ints}
    if (attrs["group"].i if "group" in attrs else 1) != 1:
        return False
    if ints.get("strides", [1, 1]) != [1, 1] or ints.get("dilations", [1, 1]) != [1, 1]:
        return False
    auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True
    half = [(dims[2] - 1) // 2, (dims[3] - 1) // 2]
    return auto_pad in ("NOTSET", "") and ints.get("pads", [0, 0, 0, 0]) == half + half


def _square_matmul(node, inits: dict) -> bool:
    """x @ W with a square weight (d x d): the attention projections and the like. GEMMs that change the width
    (an MLP's) cannot pass through; their cost is this family's scaled by FLOPs, if the efficiency is alike."""
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    return (node.op_type == "MatMul" and weight is not None and len(weight.dims) == 2
            and weight.dims[0] == weight.dims[1])


FAMILIES = (
    ("attention (MultiHeadAttention)", lambda n, inits: n.op_type == "MultiHeadAttention"),
    ("square-weight MatMul (projections)", _square_matmul),
    ("RoPE (RotaryEmbedding)", lambda n, inits: n.op_type == "RotaryEmbedding"),
    ("LayerNorm", lambda n, inits: n.op_type == "LayerNormalization"),
    ("GroupNorm's InstanceNormalization", lambda n, inits: n.op_type == "InstanceNormalization"),
    ("same-shape convolutions", _same_shape_conv),
)


def ablations(graph, sections) -> list[tuple[str, list[int]]]:
    """(label, node indices) per family present in the graph; attention also per section when several sections
    hold some (the DETR encoder's 5184-token self-attention and the DETR decoder's 200-query blocks differ in
    kind). Nodes whose other outputs are read (LayerNorm's mean, attention's present key) are left out."""
    inits = {t.name: t for t in graph.initializer}
    read = set().union(*(_reads(n) for n in graph.node)) | {o.name for o in graph.output}
    starts = boundaries(graph, sections) + [len(graph.node)]
    out = []
    for label, match in FAMILIES:
        nodes = [i for i, n in enumerate(graph.node)
                 if match(n, inits) and not any(o in read for o in n.output[1:] if o)]
        if not nodes:
            continue
        out.append((label, nodes))
        if label.startswith("attention"):
            per = [(sections[k][0], [i for i in nodes if starts[k] <= i < starts[k + 1]])
                   for k in range(len(sections))]
            per = [(name, idx) for name, idx in per if idx]
            if len(per) > 1:
                out.extend((f"attention in {name}", idx) for name, idx in per)
    return out


def ablate(model, nodes: list[int], types: dict, varying: set):
    """A copy of `model` with `nodes` replaced by Identity of their first input; returns (model, exposed outputs)."""
    import onnx
    from onnx import helper

    g = model.graph
    drop = set(nodes)
    kept = [n for i, n in enumerate(g.node) if i not in drop]
    freed = {x for i in drop for x in g.node[i].input[1:] if x}
    still_read = set().union(*(_reads(n) for n in kept)) | {o.name for o in g.output}
    # Graph inputs stay inputs: only tensors computed inside are exposed.
    exposed = sorted((freed & varying) - still_read - {i.name for i in g.input})
    missing = [o for o in exposed if o not in types]
    if missing:
        raise KeyError(f"no element type known for {missing[:5]}")
    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    vg = variant.graph
    del vg.node[:]
    for i, n in enumerate(g.node):
        vg.node.append(helper.make_node("Identity", [n.input[0]], [n.output[0]],
                                        name=f"{n.name or n.output[0]}/ablated")
                       if i in drop else n)
    vg.output.extend(helper.make_tensor_value_info(o, types[o], None) for o in exposed)
    # Constant-only nodes that fed only the replaced ones (a norm's scale as a Constant node) go too: ONNX Runtime
    # would fold them into initializers nobody reads, and say so once per tensor.
    outputs = {o.name for o in vg.output}
    while True:
        read = set().union(*(_reads(n) for n in vg.node)) | outputs
        dead = [k for k, n in enumerate(vg.node)
                if not any(o in read for o in n.output if o) and not any(o in varying for o in n.output if o)]
        if not dead:
            break
        for k in reversed(dead):
            del vg.node[k]
    used = set().union(*(_reads(n) for n in vg.node))
    weights = [t for t in vg.initializer if t.name in used]
    del vg.initializer[:]
    vg.initializer.extend(weights)
    return variant, exposed


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def write_sections(model_dir: Path, graph_name: str, out: Path, infer: bool | None = None) -> dict:
    """The prefixes of `graph_name` in `out`, and out/sections.json for segmenter-bench --time-sections."""
    import onnx

    manifest = json.loads((model_dir / "manifest.json").read_text())
    spec = manifest["graphs"][graph_name]
    full = (model_dir / spec["file"]).resolve()
    model = onnx.load(str(full))
    sections = DECODER_SECTIONS if graph_name == "decoder" else vision_sections(model.graph)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (name, prefix, nodes, outputs) in enumerate(cut(model, sections, infer), start=1):
        path = out / f"{graph_name}.prefix{k}.onnx"
        common.save_onnx(prefix, path)
        entries.append({"section": name, "file": path.name, "nodes": nodes, "outputs": outputs})
        print(f"{graph_name} prefix {k}: through {name!r}, {nodes} nodes, {outputs} outputs -> {path}")
    entries.append({"section": sections[-1][0], "file": str(full), "nodes": len(model.graph.node),
                    "outputs": len(model.graph.output)})
    variants = []
    chosen = ablations(model.graph, sections)
    if chosen:
        types = _types(model, infer=infer if infer is not None else model.ByteSize() < 500_000_000)
        varying = fused_attention.input_dependent(model.graph)
    for label, nodes in chosen:
        try:
            variant, exposed = ablate(model, nodes, types, varying)
        except KeyError:
            if infer is not False:  # as the cut does: onnx's inference, then give up on this one ablation only
                types = _types(model, infer=True)
            try:
                variant, exposed = ablate(model, nodes, types, varying)
            except KeyError as e:
                print(f"{graph_name} without {label}: skipped ({e})", file=sys.stderr)
                continue
        path = out / f"{graph_name}.without-{_slug(label)}.onnx"
        common.save_onnx(variant, path)
        variants.append({"without": label, "file": path.name, "replaced": len(nodes), "exposed": len(exposed)})
        print(f"{graph_name} without {label}: {len(nodes)} nodes passed through, {len(exposed)} tensors exposed "
              f"-> {path}")
    info = {"graph": graph_name, "model_dir": str(model_dir.resolve()), "precision": manifest["precision"],
            "sections": entries, "ablations": variants}
    (out / "sections.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# --------------------------------------------------------------------------------------------------------------- check

def _feeds(session, manifest: dict, n: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (n if i.name.startswith("text") else 1) for d in i.shape]
        if i.type == "tensor(int64)":
            mask = np.zeros(shape, np.int64)
            mask[..., :4] = 1
            feeds[i.name] = mask
        elif i.type == "tensor(uint8)":
            feeds[i.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def check(model_dir: Path, graph_name: str, out: Path, infer: bool | None = None) -> bool:
    """The per-op type rules agree with onnx's inference on this graph, and each prefix, run on the CPU, gives the
    values the full graph computes for the same tensors."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    info = write_sections(model_dir, graph_name, out, infer)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    full = onnx.load(info["sections"][-1]["file"])
    quick, inferred = _types(full, infer=False), _types(full, infer=True)
    wrong = sorted(k for k in quick if k in inferred and quick[k] != inferred[k])
    print(f"{graph_name}: element types by the per-op rules {'agree' if not wrong else f'DIFFER at {wrong[:5]}'} "
          f"with onnx's inference ({len(quick)} tensors)")
    ok = not wrong
    for k, entry in enumerate(info["sections"][:-1], start=1):
        prefix = ort.InferenceSession(str(out / entry["file"]), providers=["CPUExecutionProvider"])
        names = [o.name for o in prefix.get_outputs()]
        feeds = _feeds(prefix, manifest, 2)
        got = prefix.run(names, feeds)
        # The full graph with the prefix's outputs exposed, on the same inputs.
        exposed = onnx.ModelProto()
        exposed.CopyFrom(full)
        present = {o.name for o in exposed.graph.output}
        types = _types(full, infer=True)
        for name in names:
            if name not in present:
                exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
        whole = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
        all_feeds = _feeds(whole, manifest, 2)
        all_feeds.update(feeds)
        want = whole.run(names, all_feeds)
        same = all(a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
                   for a, b in zip(got, want))
        worst = max((float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0)
                    for a, b in zip(got, want) if a.shape == b.shape)
        ok &= same
        print(f"{graph_name} prefix {k} ({entry['section']}): {len(names)} outputs, max |d| {worst:.3g}: "
              f"{'OK' if same else 'DIFFERS'}")
    # Each ablation runs and gives every output of the full graph its shape (the pass-throughs preserve shapes).
    whole = ort.InferenceSession(str(info["sections"][-1]["file"]), providers=["CPUExecutionProvider"])
    feeds = _feeds(whole, manifest, 2)
    want = whole.run(None, feeds)
    for entry in info["ablations"]:
        variant = ort.InferenceSession(str(out / entry["file"]), providers=["CPUExecutionProvider"])
        got = variant.run(None, feeds)
        names = [o.name for o in variant.get_outputs()]
        shaped = (names[:len(want)] == [o.name for o in whole.get_outputs()]
                  and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(got, want)))
        ok &= shaped and entry["replaced"] > 0
        print(f"{graph_name} without {entry['without']}: {entry['replaced']} nodes passed through, "
              f"{entry['exposed']} exposed, outputs shaped as the full graph's: {'OK' if shaped else 'DIFFER'}")
    # RoPE is fused only in exports since 2026-12-04 (the bundled model's RoPE is traced).
    common = {"attention (MultiHeadAttention)", "square-weight MatMul (projections)", "LayerNorm"}
    expected = common | ({"GroupNorm's InstanceNormalization", "same-shape convolutions"}
                         if graph_name == "decoder" else set())
    found = {entry["without"] for entry in info["ablations"]}
    if not expected <= found:
        print(f"{graph_name}: no ablation for {sorted(expected - found)}: the exporter's graph changed?")
        ok = False
    return ok


def check_fixtures() -> int:
    import tempfile

    ok = True
    for graph_name in ("decoder", "vision"):
        with tempfile.TemporaryDirectory() as tmp:
            ok &= check(BUNDLED, graph_name, Path(tmp))
    print("graph sections:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="an export (manifest.json and its graphs)")
    ap.add_argument("--graph", choices=["decoder", "vision"], default="decoder")
    ap.add_argument("--out", type=Path, help="folder for the prefixes and sections.json")
    ap.add_argument("--check", action="store_true", help="also run each prefix and the full graph on the CPU and "
                    "compare the values at the cut")
    ap.add_argument("--check-fixtures", action="store_true", help="CI: --check on the bundled tiny model's graphs")
    ap.add_argument("--no-infer", action="store_true", help="cut with the per-op type rules alone (as a full-size "
                    "vision graph is), not onnx's inference")
    args = ap.parse_args(argv)
    if args.check_fixtures:
        return check_fixtures()
    if not (args.model_dir and args.out):
        ap.error("give --model-dir DIR --out DIR (or --check-fixtures)")
    infer = False if args.no_infer else None
    if args.check:
        return 0 if check(args.model_dir, args.graph, args.out, infer) else 1
    write_sections(args.model_dir, args.graph, args.out, infer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
