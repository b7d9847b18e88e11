#!/usr/bin/env python3
"""Fused attention: each eager attention block of the vision and decoder graphs becomes one `com.microsoft`
`MultiHeadAttention` node.

Why: the exporter traces HF's eager attention, MatMul(Q, Kᵀ) -> Mul(scale) [-> Add(mask)] -> Softmax -> MatMul(V),
which materialises the [B, H, S, L] score tensor: at full size 16 x 5184² floats (1.7 GB fp32) per global ViT layer
and 8 x 5184² per phrase per DETR encoder layer. ONNX Runtime's offline transformer optimizer fuses none of these
blocks (checked), so the graph has to carry the fused op itself. `MultiHeadAttention` is what ONNX Runtime 1.31 runs
with fused kernels on CUDA (flash attention for fp16 without a bias, cutlass memory-efficient attention for fp16 and
fp32 with or without an additive bias) and also runs on the CPU provider; ONNX's own opset-23 `Attention` needs the
whole graph at opset 23 (ReduceMean & co. change form after 17) and its CUDA kernel runs fp32 unfused.

    before: q4 [B,H,S,d], Transpose(k) [B,H,d,L], v4 [B,H,L,d]
            MatMul -> Mul(scale) -> [Add(bias [B|1, H|1, S, L])] -> Softmax(-1) -> MatMul(v4) -> Transpose(0,2,1,3)
    after:  MultiHeadAttention(q [B,S,H·d], k [B,L,H·d], v [B,L,H·d], attention_bias, num_heads=H, scale)
            -> Reshape [B,S,H,d] (the old Transpose's output name, so everything downstream is unchanged)

Where the heads' layout is already [B,S,H,d] before a Transpose(0,2,1,3) (DETR), q/k/v are read from there; where
it is not (the ViT's q/k after RoPE are BNSH), a Transpose is inserted. The text graph is left alone: it runs once
per distinct phrase and the server caches its output.

Torch-free (numpy + onnx; onnxruntime for --check), like fp16.py and image_input.py:

    python fused_attention.py --model-dir /models/sam3                        # in place (vision + decoder, manifest)
    python fused_attention.py --src EAGER_EXPORT --out /tmp/t --check         # a converted copy, checked against
                                                                               # the PyTorch references (exit 1 on failure)
    python fused_attention.py --check-fixtures    # CI: converts the eager tiny graphs the repository keeps
export_sam3.py applies it to every export unless `--attention eager`. The bundled tiny model is exported fused; its
eager vision and decoder graphs live on in tests/fixtures/f32-vision and tests/fixtures/dense-decoder (exports from
before this change), which --check-fixtures assembles into one eager export, converts, and checks against the
PyTorch references with check_onnx.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

import sam3_common as common

HERE = Path(__file__).resolve().parent
FIXTURES_ROOT = HERE.parent / "tests" / "fixtures"
DEFAULT_FIXTURES = FIXTURES_ROOT / "reference"
BUNDLED_MODEL = HERE.parent / "models" / "sam3-tiny"
MS_DOMAIN = "com.microsoft"
FUSED_GRAPHS = ("vision", "decoder")
SWAP_SN = [0, 2, 1, 3]


class _Graph:
    """Producer/consumer maps and a small constant evaluator over an onnx GraphProto."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    def op(self, tensor: str, op_type: str):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def const(self, tensor: str):
        """The value of a tensor computed from constants only (Constant, initializers, Concat, Unsqueeze, Cast), with
        None where an element depends on the input: enough for the shape of a head-split Reshape."""
        from onnx import helper, numpy_helper

        if tensor in self.initializers:
            return self.initializers[tensor]
        node = self.producer.get(tensor)
        if node is None:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            return numpy_helper.to_array(attrs["value"])
        if node.op_type in ("Unsqueeze", "Cast", "Identity"):
            return self.const(node.input[0])
        if node.op_type == "Concat":
            parts = [self.const(i) for i in node.input]
            out = []
            for p in parts:
                out.extend([None] if p is None else np.asarray(p).reshape(-1).tolist())
            return out
        return None


def _perm(node) -> list[int] | None:
    from onnx import helper

    for a in node.attribute:
        if a.name == "perm":
            return list(helper.get_attribute_value(a))
    return None


def _heads(g: _Graph, v4: str) -> tuple[int, int] | None:
    """(H, d) from V's head split: Transpose(0,2,1,3) of Reshape(x, [.., .., H, d])."""
    t = g.op(v4, "Transpose")
    if t is None or _perm(t) != SWAP_SN:
        return None
    r = g.op(t.input[0], "Reshape")
    shape = g.const(r.input[1]) if r is not None else None
    if shape is None or len(shape) != 4 or shape[2] is None or shape[3] is None or min(shape[2], shape[3]) <= 0:
        return None
    return int(shape[2]), int(shape[3])


def _match(g: _Graph, softmax):
    """The eager attention block around one Softmax, or None when it is not one."""
    from onnx import helper, numpy_helper

    axis = next((helper.get_attribute_value(a) for a in softmax.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3):
        return None
    bias, x = None, g.producer.get(softmax.input[0])
    if x is not None and x.op_type == "Add":
        bias, x = x.input[1], g.producer.get(x.input[0])
        add = g.producer[softmax.input[0]]
    else:
        add = None
    if x is None or x.op_type != "Mul":
        return None
    scale_node = g.producer.get(x.input[1])
    if x.input[1] in g.initializers:
        scale = g.initializers[x.input[1]]
    elif scale_node is not None and scale_node.op_type == "Constant":
        scale = numpy_helper.to_array(scale_node.attribute[0].t)
    else:
        return None
    if np.asarray(scale).size != 1:
        return None
    qk = g.op(x.input[0], "MatMul")
    after = g.consumers[softmax.output[0]]
    if qk is None or len(after) != 1 or after[0].op_type != "MatMul" or after[0].input[0] != softmax.output[0]:
        return None
    pv = after[0]
    out = g.consumers[pv.output[0]]
    if len(out) != 1 or out[0].op_type != "Transpose" or _perm(out[0]) != SWAP_SN:
        return None
    k_t = g.op(qk.input[1], "Transpose")
    heads = _heads(g, pv.input[1])
    if k_t is None or heads is None:
        return None
    for inner in (qk.output[0], x.output[0]) + ((add.output[0],) if add is not None else ()):
        if len(g.consumers[inner]) != 1:  # a score tensor read elsewhere cannot disappear
            return None
    return {"q4": qk.input[0], "k_t": k_t, "v4": pv.input[1], "bias": bias, "scale": float(np.asarray(scale)),
            "heads": heads, "out": out[0], "removed": [qk, x, add, softmax, pv, out[0]]}


def _bsnh(g: _Graph, tensor4: str, perm_from_bsnh: list[int], new_nodes: list, tag: str) -> str:
    """A [B,S,H·d] view of a head tensor. `tensor4` = Transpose(X, P) of some X; the BSNH layout is
    Transpose(X, P ∘ ...) and often X itself, so no data moves."""
    from onnx import helper

    t = g.producer.get(tensor4)
    if t is not None and t.op_type == "Transpose":
        p = _perm(t)
        src, perm = t.input[0], [p[i] for i in perm_from_bsnh]
    else:
        src, perm = tensor4, [[0, 1, 2, 3][i] for i in perm_from_bsnh]
    if perm != [0, 1, 2, 3]:
        new_nodes.append(helper.make_node("Transpose", [src], [f"{tag}_bsnh4"], name=f"{tag}_to_bsnh", perm=perm))
        src = f"{tag}_bsnh4"
    new_nodes.append(helper.make_node("Reshape", [src, "fused_attention_bsh"], [f"{tag}_bsh"], name=f"{tag}_merge"))
    return f"{tag}_bsh"


def fuse_attention(onnx_model) -> int:
    """Rewrites every eager attention block of the graph into MultiHeadAttention, in place; returns how many."""
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    g = _Graph(graph)
    blocks = [b for b in (_match(g, n) for n in graph.node if n.op_type == "Softmax") if b is not None]
    if not blocks:
        return 0
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "fused_attention_bsh"))
    removed = {id(n) for b in blocks for n in b["removed"] if n is not None}
    replacement = {}
    for i, b in enumerate(blocks):
        heads, head_size = b["heads"]
        tag = f"fused_attention_{i}"
        nodes = []
        # q4 and v4 are [B,H,S,d] = BSNH with S and H swapped; Kᵀ = Transpose(X, P) is [B,H,d,L]: K in BSNH is
        # Transpose(X, [P0, P3, P1, P2]).
        q = _bsnh(g, b["q4"], SWAP_SN, nodes, f"{tag}_q")
        # K and V as [B,L,H*d] even where they were [B,H,L,d] (the ViT's K after RoPE): with the BNSH key/value
        # form the CPU kernel computed the eager way (outputs bit-identical; vision peak 110 MB on the mid model),
        # with [B,L,H*d] it takes its tiled path (81 MB; eager 101 MB).
        k = _bsnh(g, b["k_t"].output[0], [0, 3, 1, 2], nodes, f"{tag}_k")
        v = _bsnh(g, b["v4"], SWAP_SN, nodes, f"{tag}_v")
        inputs = [q, k, v, "", "", b["bias"] or ""]
        while inputs[-1] == "":
            inputs.pop()
        shape = f"{tag}_bsnh_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, heads, head_size], np.int64), shape))
        nodes.append(helper.make_node("MultiHeadAttention", inputs, [f"{tag}_out"], name=tag, domain=MS_DOMAIN,
                                      num_heads=heads, scale=b["scale"]))
        nodes.append(helper.make_node("Reshape", [f"{tag}_out", shape], [b["out"].output[0]], name=f"{tag}_split"))
        replacement[id(b["out"])] = nodes
    replace_nodes(graph, replacement, removed)
    use_ms_domain(onnx_model)
    return len(blocks)


def replace_nodes(graph, replacement: dict, removed: set, rewired: dict | None = None) -> None:
    """The graph's nodes with each node whose id is a key of `replacement` swapped for that list of nodes (in its
    place, so the new nodes' inputs are ready there), the nodes in `removed` left out, inputs named in `rewired`
    renamed, and what nothing reads any more dropped. Shared by the torch-free converters."""
    kept = []
    for n in graph.node:
        if id(n) in replacement:
            kept.extend(replacement[id(n)])
        elif id(n) not in removed:
            kept.append(n)
    for n in kept if rewired else ():
        for i, name in enumerate(n.input):
            if name in rewired:
                n.input[i] = rewired[name]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_dead_nodes(graph)


def use_ms_domain(onnx_model) -> None:
    """Declares the com.microsoft opset the fused nodes come from, once."""
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _drop_dead_nodes(graph) -> None:
    """Removes nodes whose outputs nothing reads any more (the head transposes the fused op replaced). Walks back
    from the graph outputs through producers: node order is not trusted (the fp16 converter appends its Casts)."""
    producer = {o: n for n in graph.node for o in n.output}
    live, needed, todo = set(), set(), [o.name for o in graph.output]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in live:
            live.add(id(node))
            todo.extend(i for i in _reads(node) if i)
    kept = [n for n in graph.node if id(n) in live]
    del graph.node[:]
    graph.node.extend(kept)
    dead = [i for i in graph.initializer if i.name not in needed]
    for i in dead:
        graph.initializer.remove(i)


def input_dependent(graph) -> set:
    """Tensors whose value depends on a graph input (the rest are constants). Shared by the converters and the bench's
    graph sections."""
    varying = {i.name for i in graph.input}
    changed = True  # the node list is in execution order but for the fp16 converter's input casts at its end
    while changed:
        changed = False
        for n in graph.node:
            if any(r in varying for r in _reads(n)):
                new = {o for o in n.output if o} - varying
                if new:
                    varying |= new
                    changed = True
    return varying


def _reads(node) -> list[str]:
    """A node's inputs plus what its subgraphs (If branches) read from the outer scope."""
    names = list(node.input)
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in sub.node:
                names.extend(_reads(n))
    return names


def rewrite_export(src: Path, out: Path | None, graphs, rewrite, marks: dict) -> dict:
    """Rewrites `graphs` of an export in place, or into `out` with every other file copied: `rewrite(onnx_model)` on
    each graph, then the new checksums and `marks` in the manifest. Returns what `rewrite` returned, per graph.
    Shared by the torch-free converters (fused attention, fused RoPE)."""
    import onnx

    out = out or src
    manifest = json.loads((src / "manifest.json").read_text())
    if out != src:
        out.mkdir(parents=True, exist_ok=True)
        for name in [manifest["tokenizer"]["file"]] + [g["file"] for g in manifest["graphs"].values()] + [
                x["file"] for g in manifest["graphs"].values() for x in g.get("external_data", [])]:
            shutil.copy2(src / name, out / name)
    results = {}
    for name in graphs:
        spec = manifest["graphs"][name]
        if spec.get("external_data"):
            raise SystemExit(f"{name}: a graph with external data (an fp32 full-size export): re-export instead "
                             "(export_sam3.py applies these rewrites by default)")
        path = out / spec["file"]
        model = onnx.load(str(path))
        results[name] = rewrite(model)
        onnx.save_model(model, str(path))
        spec["sha256"] = common.sha256_file(path)
    manifest.update(marks)
    common.write_json(out / "manifest.json", manifest)
    return results


def convert_model_dir(src: Path, out: Path | None = None) -> dict:
    """The vision and decoder graphs of an export with fused attention (in place, or into `out` with the other
    files copied); the manifest records `"attention": "fused"` and the new checksums. Returns blocks per graph."""
    return rewrite_export(src, out, FUSED_GRAPHS, fuse_attention, {"attention": "fused"})


def eager_fixture_export(dst: Path) -> None:
    """One eager-attention export of the tiny weights from what the repository keeps: f32-vision's vision graph
    (float input), dense-decoder's decoder (dense outputs), the bundled text graph and tokenizer."""
    dst.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((FIXTURES_ROOT / "dense-decoder" / "manifest.json").read_text())
    manifest["graphs"]["vision"] = json.loads((FIXTURES_ROOT / "f32-vision" / "manifest.json").read_text())[
        "graphs"]["vision"]
    manifest.pop("attention", None)
    shutil.copy2(FIXTURES_ROOT / "f32-vision" / "vision.onnx", dst / "vision.onnx")
    shutil.copy2(FIXTURES_ROOT / "dense-decoder" / "decoder.onnx", dst / "decoder.onnx")
    for name in ("text.onnx", manifest["tokenizer"]["file"]):
        shutil.copy2(BUNDLED_MODEL / name, dst / name)
    common.write_json(dst / "manifest.json", manifest)


def check_fixtures(fixtures: Path) -> int:
    """The eager fixture export converted, then check_onnx.py on both (the eager one first, as the baseline)."""
    import tempfile

    import check_onnx

    with tempfile.TemporaryDirectory() as tmp:
        eager, fused = Path(tmp) / "eager", Path(tmp) / "fused"
        eager_fixture_export(eager)
        if check_onnx.main(["--model-dir", str(eager), "--fixtures", str(fixtures)]):
            print("the eager fixture export itself fails its checks", file=sys.stderr)
            return 1
        counts = convert_model_dir(eager, fused)
        print(f"fused: attention blocks per graph {counts}")
        if min(counts.values()) == 0:
            print("no attention block matched in a graph", file=sys.stderr)
            return 1
        return check_onnx.main(["--model-dir", str(fused), "--fixtures", str(fixtures)])


def converter_main(argv, doc: str, fixtures_help: str, check_fixtures, convert, report, nothing=None) -> int:
    """The command line the converters share: --model-dir DIR (in place) or --src DIR --out DIR, --check (check_onnx.py
    on the result), --check-fixtures (their CI check). `report(counts)` describes what was converted; `nothing(counts)`
    says when nothing matched (exit 1)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="convert this export in place")
    ap.add_argument("--src", type=Path, help="convert a copy of this export ...")
    ap.add_argument("--out", type=Path, help="... into this folder")
    ap.add_argument("--check", action="store_true",
                    help="run check_onnx.py's checks on the result (ORT vs the PyTorch references)")
    ap.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    ap.add_argument("--check-fixtures", action="store_true", help=fixtures_help)
    args = ap.parse_args(argv)
    if args.check_fixtures:
        return check_fixtures(args.fixtures)
    if bool(args.model_dir) == bool(args.src and args.out):
        ap.error("give --model-dir DIR, or --src DIR --out DIR")
    target = args.model_dir or args.out
    counts = convert(args.model_dir or args.src, None if args.model_dir else args.out)
    print(f"{target}: {report(counts)}")
    if nothing is not None and nothing(counts):
        print(f"{nothing(counts)} (already converted?)", file=sys.stderr)
        return 1
    if not args.check:
        return 0
    import check_onnx

    return check_onnx.main(["--model-dir", str(target), "--fixtures", str(args.fixtures)])


def main(argv=None) -> int:
    return converter_main(argv, __doc__, "convert the eager tiny graphs kept under tests/fixtures and check them (CI)",
                          check_fixtures, convert_model_dir, lambda c: f"attention blocks fused per graph {c}")


if __name__ == "__main__":
    sys.exit(main())
