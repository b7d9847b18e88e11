#!/usr/bin/env python3
"""Fewer, larger kernels per transformer layer: residual Add + LayerNorm become one `com.microsoft`
`SkipLayerNormalization` (with the branch's bias folded in), and the q/k/v projections that read one tensor become one
MatMul + Add + Split.

Why: after fused attention and fused RoPE the vision graph is GPU-bound (on an H200, capturing it in a CUDA graph
saved 1.8 of ~27 ms: the time is in kernels, not launches), and most of its kernels per ViT layer are small
element-wise passes over the [B, 72, 72, 1024] residual stream (~10 MB in fp16) or projections run three times:

    LN1 -> q/k/v: 3 x (MatMul + bias Add) -> ... attention ... -> o_proj MatMul + bias Add -> residual Add
        -> LN2 -> fc1 + BiasGelu -> fc2 MatMul + bias Add -> residual Add -> (next layer's LN1)

ONNX Runtime fuses neither at session build: its SkipLayerNorm and MatMul+Add fusions need tensor ranks that the
traced graph's computed Reshape shapes hide (its optimised vision graph keeps every LayerNormalization, and each
projection as MatMul + Add). Here, per layer:

- `SkipLayerNormalization(input, skip, gamma, beta, bias)` computes LN(input + skip + bias) and also returns
  input + skip + bias (the residual stream the next Add reads): the residual Add, the branch's bias Add and the
  LayerNorm become one kernel, twice per layer (6 kernels -> 2). The op takes [B, S, C]: the 4-D stream is read
  as [B, H·W, C] and its outputs given back their shape (Reshape costs no kernel). A bias is folded only when it is
  a [C] constant and everything between it and the residual Add keeps channels last (Reshape with last dimension
  C, Transpose with the last axis last, Slice not on the last axis: the windowed layers' un-partition), so adding
  it later changes no value.
- q/k/v of one attention block (MatMul + bias Add each, on one input, reaching the same MultiHeadAttention through
  head reshapes and RoPE only): one MatMul with the weight matrices side by side, one Add, one Split (6 kernels
  -> 3, and one GEMM three times as wide; q and k alone in a DETR self-attention, whose v reads another tensor).

Every other node is kept, and the outputs are the same up to float rounding of the sums' order (checked on the CPU
against the PyTorch references, and against the unconverted graphs). Torch-free, like fused_attention.py and
fused_rope.py; run it after them (or on any export they produced). Vision and decoder graphs (the decoder's DETR
layers are post-LN: Add -> LayerNorm fuse the same way, without the sum output).

    python fused_layers.py --model-dir /models/sam3                          # in place (both graphs, manifest)
    python fused_layers.py --src EXPORT --out /tmp/l --check                  # a converted copy, checked against
                                                                              # the PyTorch references
    python fused_layers.py --check-fixtures    # CI: the eager fixture graphs, attention, RoPE, then these fused

Not measured on a GPU yet: segmenter-svc/bench/gpu-run.sh runs it as the `layers` A/B step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fused_attention import (MS_DOMAIN, _Graph, _perm, _reads, converter_main, replace_nodes, rewrite_export,
                             use_ms_domain)

FUSED_GRAPHS = ("vision", "decoder")


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _array(g: _Graph, tensor: str):
    """A constant tensor's value as stored: an initializer, a Constant node, or an Identity of either (the exporter
    shares equal initializers that way); None for anything computed (an Unsqueeze or Cast of a constant changes its
    shape or type, which the callers compare)."""
    from onnx import numpy_helper

    node = g.producer.get(tensor) if tensor else None
    while node is not None and node.op_type == "Identity":
        tensor, node = node.input[0], g.producer.get(node.input[0])
    if not tensor:
        return None
    if tensor in g.initializers:
        return g.initializers[tensor]
    if node is not None and node.op_type == "Constant":
        value = _attr(node, "value")
        return numpy_helper.to_array(value) if value is not None else None
    return None


def _prepare(g: _Graph) -> None:
    """What the rules below need besides producers and consumers: the tensors read inside subgraphs (If branches;
    such a tensor has readers `consumers` does not list), and the tensors computed from the graph's inputs."""
    g.subgraph_reads = {name for n in g.graph.node for name in _reads(n)[len(n.input):]}
    dynamic = {i.name for i in g.graph.input} - set(g.initializers)
    changed = True
    while changed:  # a fixed point: the fp16 converter leaves nodes out of topological order
        changed = False
        for n in g.graph.node:
            if any(i in dynamic for i in _reads(n)) and not all(o in dynamic for o in n.output if o):
                dynamic.update(o for o in n.output if o)
                changed = True
    g.dynamic = dynamic


def _single_reader(g: _Graph, tensor: str, graph_outputs: set[str]) -> bool:
    """One node reads the values of `tensor` (Shape nodes read only its shape, which a folded bias keeps), and no
    subgraph does."""
    readers = [n for n in g.consumers.get(tensor, []) if n.op_type != "Shape"]
    return len(readers) == 1 and tensor not in graph_outputs and tensor not in g.subgraph_reads


def _channel_bias(g: _Graph, tensor: str, channels: int, graph_outputs: set[str]):
    """If `tensor` is Add(m, b) with b a [C] constant, possibly followed by channel-preserving Reshape / Transpose /
    Slice nodes that only it feeds: (the bias name, the Add, the tensor the first node after the Add should read
    instead: m). None otherwise."""
    if not _single_reader(g, tensor, graph_outputs):
        return None
    node = g.producer.get(tensor)
    seen = 0
    while node is not None and node.op_type in ("Reshape", "Transpose", "Slice") and seen < 8:
        if not _single_reader(g, node.input[0], graph_outputs):
            return None
        if node.op_type == "Reshape":
            shape = g.const(node.input[1])
            if shape is None or len(shape) == 0 or shape[-1] is None or int(shape[-1]) != channels:
                return None
        elif node.op_type == "Transpose":
            perm = _perm(node)
            if perm is None or perm[-1] != len(perm) - 1:
                return None
        else:  # Slice: its axes must be constant and never the last one
            axes = g.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if axes is None:
                return None
            rank = _rank_hint(g, node)
            axes = [None if a is None else int(a) for a in np.asarray(axes, dtype=object).reshape(-1)]
            if any(a is None or a == -1 or (rank is not None and a == rank - 1) for a in axes) or rank is None:
                return None
        node = g.producer.get(node.input[0])
        seen += 1
    if node is None or node.op_type != "Add":
        return None
    for b_slot in (0, 1):
        bias = _array(g, node.input[b_slot])
        other = node.input[1 - b_slot]
        if bias is not None and bias.shape == (channels,) and _array(g, other) is None:
            return node.input[b_slot], node, other
    return None


def _rank_hint(g: _Graph, slice_node) -> int | None:
    """The rank of a Slice's data when a Reshape with a constant-length shape made it (the windowed layers'
    un-partition: Reshape -> Slice -> Slice), else None."""
    node = g.producer.get(slice_node.input[0])
    while node is not None and node.op_type == "Slice":
        node = g.producer.get(node.input[0])
    if node is not None and node.op_type == "Reshape":
        shape = g.const(node.input[1])
        if shape is not None:
            return len(shape)
    return None


def fuse_skip_layernorm(onnx_model) -> tuple[int, int]:
    """Every LayerNormalization over the last axis whose input is Add(a, b) of two computed tensors becomes one
    SkipLayerNormalization (bias folded where `_channel_bias` allows); returns how many, and how many biases."""
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    g = _Graph(graph)
    _prepare(g)
    outputs = {o.name for o in graph.output}
    replacement, removed, rewired, fused, biases = {}, set(), {}, 0, 0
    for ln in list(graph.node):
        if ln.op_type != "LayerNormalization" or len(ln.input) < 2 or _attr(ln, "axis", -1) not in (-1,):
            continue
        if len([o for o in ln.output if o]) != 1:
            continue
        add = g.op(ln.input[0], "Add")
        # Both terms computed from the graph's inputs: a term made of constants alone (a position table) may be
        # [1, S, C] against the stream's [B, S, C], and SkipLayerNormalization would give its shape to the output.
        if add is None or id(add) in removed or id(add) in replacement or not all(i in g.dynamic for i in add.input):
            continue
        gamma = _array(g, ln.input[1])
        if gamma is None or gamma.ndim != 1:
            continue
        channels = int(gamma.shape[0])
        tag = f"fused_skipln_{fused}"
        a, b = add.input
        bias = None
        for first, second in ((a, b), (b, a)):
            found = _channel_bias(g, second, channels, outputs)
            if found and id(found[1]) not in removed:
                bias, bias_add, bare = found
                a, b = first, second
                # The node after the bias Add reads the un-biased product (or the residual Add reads it directly).
                rewired[bias_add.output[0]] = bare
                removed.add(id(bias_add))
                biases += 1
                break
        nodes = [
            helper.make_node("Shape", [a], [f"{tag}_shape"], name=f"{tag}_shape"),
            helper.make_node("Reshape", [a, f"{tag}_bsc"], [f"{tag}_input"], name=f"{tag}_input"),
            helper.make_node("Reshape", [b, f"{tag}_bsc"], [f"{tag}_skip"], name=f"{tag}_skip"),
        ]
        graph.initializer.append(numpy_helper.from_array(np.array([0, -1, channels], np.int64), f"{tag}_bsc"))
        inputs = [f"{tag}_input", f"{tag}_skip", ln.input[1], ln.input[2] if len(ln.input) > 2 else "",
                  bias or ""]
        while inputs and not inputs[-1]:
            inputs.pop()
        keeps_sum = len(g.consumers.get(add.output[0], [])) > 1 or add.output[0] in outputs
        sln_outputs = [f"{tag}_out"] + (["", "", f"{tag}_sum"] if keeps_sum else [])
        nodes.append(helper.make_node("SkipLayerNormalization", inputs, sln_outputs, name=tag, domain=MS_DOMAIN,
                                      epsilon=float(_attr(ln, "epsilon", 1e-5))))
        nodes.append(helper.make_node("Reshape", [f"{tag}_out", f"{tag}_shape"], [ln.output[0]],
                                      name=f"{tag}_out"))
        if keeps_sum:
            nodes.append(helper.make_node("Reshape", [f"{tag}_sum", f"{tag}_shape"], [add.output[0]],
                                          name=f"{tag}_sum"))
        # In the Add's place: its inputs are ready there, and whatever reads the sum between it and the LayerNorm
        # (Shape nodes) still comes after it.
        replacement[id(add)] = nodes
        removed.add(id(ln))
        fused += 1
    if not fused:
        return 0, 0
    replace_nodes(graph, replacement, removed, rewired)
    use_ms_domain(onnx_model)
    return fused, biases


def _attention_of(g: _Graph, tensor: str, graph_outputs: set[str]):
    """The MultiHeadAttention node `tensor` feeds through head reshapes, transposes, casts and RoPE only (a
    projection's way into its attention block), else None."""
    for _ in range(8):
        readers = [n for n in g.consumers.get(tensor, []) if n.op_type != "Shape"]
        if len(readers) != 1 or tensor in graph_outputs or tensor in g.subgraph_reads:
            return None
        node = readers[0]
        if node.op_type == "MultiHeadAttention":
            return node
        if node.op_type not in ("Reshape", "Transpose", "Cast", "RotaryEmbedding", "Squeeze", "Unsqueeze"):
            return None
        tensor = node.output[0]
    return None


def pack_projections(onnx_model) -> int:
    """Two or more MatMul(x, W_i) + Add(., b_i) on one input x, with [K, N_i] constant weights and [N_i] constant
    biases, that feed one attention block (q/k/v of a ViT layer; q and k of a DETR self-attention, whose v reads
    another tensor) become MatMul(x, [W_1 .. W_n]) + Add + Split; returns how many groups. Projections of one input
    into different blocks (every decoder layer's k/v of the text features) are left alone: packed, all of them
    would be computed before the first layer and held until the last."""
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    g = _Graph(graph)
    _prepare(g)
    outputs = {o.name for o in graph.output}
    groups: dict[str, list] = {}
    for mm in graph.node:
        w = _array(g, mm.input[1]) if mm.op_type == "MatMul" else None
        if w is None:
            continue
        readers = g.consumers.get(mm.output[0], [])
        if w.ndim != 2 or len(readers) != 1 or readers[0].op_type != "Add" or mm.output[0] in outputs:
            continue
        add = readers[0]
        bias_name = next((i for i in add.input if i != mm.output[0]), None)
        bias = _array(g, bias_name)
        if bias is None or bias.shape != (w.shape[1],) or bias.dtype != w.dtype:
            continue
        attention = _attention_of(g, add.output[0], outputs)
        if attention is not None:
            groups.setdefault((mm.input[0], id(attention)), []).append((mm, add, w, bias))
    replacement, removed, packed = {}, set(), 0
    for (x, _), members in groups.items():
        if len(members) < 2 or len({m[2].shape[0] for m in members}) != 1 or len({m[2].dtype for m in members}) != 1:
            continue
        tag = f"packed_proj_{packed}"
        weight = np.concatenate([m[2] for m in members], axis=1)
        bias = np.concatenate([m[3] for m in members])
        sizes = np.array([m[2].shape[1] for m in members], np.int64)
        graph.initializer.extend([numpy_helper.from_array(weight, f"{tag}_w"),
                                  numpy_helper.from_array(bias, f"{tag}_b"),
                                  numpy_helper.from_array(sizes, f"{tag}_sizes")])
        nodes = [helper.make_node("MatMul", [x, f"{tag}_w"], [f"{tag}_mm"], name=f"{tag}_mm"),
                 helper.make_node("Add", [f"{tag}_mm", f"{tag}_b"], [f"{tag}_sum"], name=f"{tag}_add"),
                 helper.make_node("Split", [f"{tag}_sum", f"{tag}_sizes"], [m[1].output[0] for m in members],
                                  name=f"{tag}_split", axis=-1)]
        # In place of the first projection (its input x is ready there; the others' readers come after it).
        first = min(members, key=lambda m: list(graph.node).index(m[0]))
        replacement[id(first[0])] = nodes
        for mm, add, _, _ in members:
            removed.update((id(mm), id(add)))
        removed.discard(id(first[0]))
        packed += 1
    if not packed:
        return 0
    replace_nodes(graph, replacement, removed)
    return packed


def fuse_layers(onnx_model) -> dict:
    """Both rewrites on one graph, in place: projections first (their Split outputs keep the old names)."""
    packed = pack_projections(onnx_model)
    fused, biases = fuse_skip_layernorm(onnx_model)
    return {"skip_layernorm": fused, "biases_folded": biases, "packed_projections": packed}


def convert_model_dir(src: Path, out: Path | None = None) -> dict:
    """The vision and decoder graphs of an export with fused layers (in place, or into `out` with the other files
    copied); the manifest records `"layers": "fused"` and the new checksums."""
    return rewrite_export(src, out, FUSED_GRAPHS, fuse_layers, {"layers": "fused"})


def _synthetic_checks() -> list[str]:
    """Two one-layer graphs run on the CPU provider at batch 2: a residual Add of two computed [B, S, C] terms must
    fuse and keep its values; one whose term is made of constants alone ([1, S, C], broadcast over the batch) must
    be left as it is (fused, the output took that term's batch of 1). Returns what failed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    s, c = 5, 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, s, c)).astype(np.float32)

    def build(term: str):
        inits = [numpy_helper.from_array(rng.standard_normal((1, s, c)).astype(np.float32), "table"),
                 numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                 numpy_helper.from_array(np.linspace(0.5, 1.5, c).astype(np.float32), "gamma"),
                 numpy_helper.from_array(np.linspace(-0.1, 0.1, c).astype(np.float32), "beta")]
        nodes = [helper.make_node("Mul", ["table", "two"], ["const_term"]),
                 helper.make_node("Sigmoid", ["x"], ["computed_term"]),
                 helper.make_node("Relu", ["x"], ["stream"]),
                 helper.make_node("Add", [term, "stream"], ["sum"]),
                 helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
        graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", s, c])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]

    failed = []
    for term, want in (("computed_term", 1), ("const_term", 0)):
        model = build(term)
        before = run(model)
        got = fuse_skip_layernorm(model)[0]
        after = run(model)
        if got != want:
            failed.append(f"{term}: {got} fused, expected {want}")
        if after.shape != before.shape or np.abs(after - before).max() > 1e-5:
            failed.append(f"{term}: output {after.shape} differs from {before.shape}")
    return failed


def check_fixtures(fixtures: Path) -> int:
    """The eager fixture graphs with attention, RoPE and then these fused, checked by check_onnx.py."""
    import tempfile

    import check_onnx
    import fused_attention
    import fused_rope

    failed = _synthetic_checks()
    if failed:
        print(f"synthetic graphs: {failed}", file=sys.stderr)
        return 1
    print("synthetic graphs: a residual of computed terms fused, a constant-only (broadcast) term left alone")
    with tempfile.TemporaryDirectory() as tmp:
        eager, attention, rope, layers = (Path(tmp) / n for n in ("eager", "attention", "rope", "layers"))
        fused_attention.eager_fixture_export(eager)
        fused_attention.convert_model_dir(eager, attention)
        fused_rope.convert_model_dir(attention, rope)
        counts = convert_model_dir(rope, layers)
        print(f"fused layers: {counts}")
        if any(c["skip_layernorm"] == 0 for c in counts.values()) or counts["vision"]["packed_projections"] == 0:
            print("expected SkipLayerNorm in both graphs and packed projections in the vision graph",
                  file=sys.stderr)
            return 1
        return check_onnx.main(["--model-dir", str(layers), "--fixtures", str(fixtures)])


def main(argv=None) -> int:
    return converter_main(
        argv, __doc__, "convert the eager fixture graphs (attention, RoPE, then layers) and check them (CI)",
        check_fixtures, convert_model_dir, lambda c: f"fused per graph {c}",
        lambda c: "nothing matched" if all(
            g["skip_layernorm"] == 0 and g["packed_projections"] == 0 for g in c.values()) else None)


if __name__ == "__main__":
    sys.exit(main())
