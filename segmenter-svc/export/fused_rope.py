#!/usr/bin/env python3
"""Fused rotary position embedding: every RoPE application in the vision graph (q and k of each ViT layer) becomes
one `com.microsoft` `RotaryEmbedding` node.

Why: HF's SAM3 ViT applies its 2-D axial RoPE the eager way, and the export traces it as

    x [B,H,S,D] -> Mul(x, COS[1,S,D])                                                        -> Add -> out
                -> Reshape [..,D/2,2] -> Split(-1) -> Squeeze x2 -> Neg -> Unsqueeze x2 -> Concat(-1)
                   -> Reshape [..,D] -> Mul(., SIN[1,S,D])                                   -/

plus the Shape/Gather/Concat arithmetic of its two Reshapes: about 6 GPU kernels and 20 host nodes per application,
64 applications per full-size vision run (~380 kernels over 10 MB tensors and ~1,300 CPU nodes per run, most of the
~1,600 CPU nodes the first H200 profile counted). `RotaryEmbedding` with `interleaved=1` computes
out[2i] = x[2i]·cos_i − x[2i+1]·sin_i, out[2i+1] = x[2i+1]·cos_i + x[2i]·sin_i from caches [S, D/2] indexed by
position, which is exactly the traced form when the caches are the even columns of COS and SIN (each angle is
written twice, once per element of its pair: checked) and the positions are 0..S-1 (position_ids [0]): the 2-D
angles are simply a per-token table. One CUDA kernel per application, and ONNX Runtime runs it on the CPU too.

Where the RoPE input is a head split, Transpose(Reshape(proj, [b,s,H,D]), [0,2,1,3]), and its output goes back to
[b,s,H·D] for MultiHeadAttention (Transpose [0,2,1,3] -> Reshape [0,0,-1], what fused_attention.py leaves), the node
takes the 3-D [b, s, H·D] form instead and both transposes go as well.

export_sam3.py applies `fuse_rope` by default, in memory before its save (`--rope traced` opts out); this script
converts existing exports (not fp32 full-size ones: their vision graph is in external data). Measured on an H200 (2026-12-04, segmenter-svc/bench/gpu-run.sh `bench_fp16_rope`): vision
27.0 -> 23.5 ms at full size in fp16, 1 image + 3 concepts 52.4 -> 48.8 ms, the same masks. Torch-free, like
fused_attention.py; run it after fused_attention.py (or on any export it produced):

    python fused_rope.py --model-dir /models/sam3                          # in place (vision graph, manifest)
    python fused_rope.py --src EXPORT --out /tmp/r --check                  # a converted copy, checked against the
                                                                             # PyTorch references (exit 1 on failure)
    python fused_rope.py --check-fixtures    # CI: the eager fixture graphs, attention then RoPE fused, checked
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from fused_attention import (MS_DOMAIN, SWAP_SN, _Graph, _perm, converter_main, replace_nodes, rewrite_export,
                             use_ms_domain)

POSITIONS = "fused_rope_position_ids"
BSH_SHAPE = "fused_rope_bsh"


def _rotated_pairs(g: _Graph, tensor: str) -> str | None:
    """The x of a traced `rotate pairs` (Reshape [..,-1,2] -> Split -> Squeeze -> Neg ... -> Concat -> Reshape) whose
    output is `tensor`, or None when `tensor` is not one."""
    back = g.op(tensor, "Reshape")
    concat = back and g.op(back.input[0], "Concat")
    if not concat or len(concat.input) != 2:
        return None
    first, second = (g.op(i, "Unsqueeze") for i in concat.input)
    neg = first and g.op(first.input[0], "Neg")
    if not (neg and second):
        return None
    odd, even = g.op(neg.input[0], "Squeeze"), g.op(second.input[0], "Squeeze")
    split = odd and even and g.op(odd.input[0], "Split")
    # (−x_odd, x_even) per pair: Split's second output negated first, its first output second.
    if not split or odd.input[0] != split.output[1] or even.input[0] != split.output[0]:
        return None
    pairs = g.op(split.input[0], "Reshape")
    shape = pairs and g.const(pairs.input[1])
    if shape is None or list(np.asarray(shape, dtype=object).reshape(-1))[-1] != 2:
        return None
    return pairs.input[0]


def _caches(table) -> np.ndarray | None:
    """A [1|-, S, D] COS or SIN constant as the [S, D/2] cache RotaryEmbedding reads, if each angle is written twice
    (pairs (2i, 2i+1) share it, the interleaved layout); None otherwise."""
    if table is None or isinstance(table, list):
        return None
    table = np.asarray(table)
    if table.ndim == 3 and table.shape[0] == 1:
        table = table[0]
    if table.ndim != 2 or table.shape[1] % 2:
        return None
    even, odd = table[:, 0::2], table[:, 1::2]
    return np.ascontiguousarray(even) if np.array_equal(even, odd) else None


def _match(g: _Graph, add):
    """One traced RoPE ending in `add`: its input x, the caches, and the nodes only it uses."""
    muls = [g.op(i, "Mul") for i in add.input]
    if None in muls:
        return None
    for cos_mul, sin_mul in (muls, muls[::-1]):
        for x_slot in (0, 1):
            x, cos = cos_mul.input[x_slot], cos_mul.input[1 - x_slot]
            for r_slot in (0, 1):
                rotated, sin = sin_mul.input[r_slot], sin_mul.input[1 - r_slot]
                if _rotated_pairs(g, rotated) != x:
                    continue
                cos_cache, sin_cache = _caches(g.const(cos)), _caches(g.const(sin))
                if cos_cache is None or sin_cache is None or cos_cache.shape != sin_cache.shape:
                    continue
                return {"add": add, "x": x, "cos": cos_cache, "sin": sin_cache}
    return None


def _head_merge(g: _Graph, out: str):
    """Transpose(out, [0,2,1,3]) -> Reshape [0,0,-1] when that is all that reads `out` (fused_attention.py's q/k
    input to MultiHeadAttention): the two nodes, else None."""
    readers = g.consumers.get(out, [])
    if len(readers) != 1 or readers[0].op_type != "Transpose" or _perm(readers[0]) != SWAP_SN:
        return None
    transpose = readers[0]
    readers = g.consumers.get(transpose.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Reshape":
        return None
    shape = g.const(readers[0].input[1])
    if shape is None or [None if v is None else int(v) for v in np.asarray(shape, dtype=object).reshape(-1)] != [
            0, 0, -1]:
        return None
    return transpose, readers[0]


def _head_split(g: _Graph, x: str):
    """(the [b,s,H,D] tensor, H, the Cast to keep or None) when `x` is [Cast](Transpose(Reshape(., [b,s,H,D]),
    [0,2,1,3])), else None."""
    cast = g.op(x, "Cast")
    transpose = g.op(cast.input[0] if cast else x, "Transpose")
    if not transpose or _perm(transpose) != SWAP_SN:
        return None
    split = g.op(transpose.input[0], "Reshape")
    shape = split and g.const(split.input[1])
    if shape is None:
        return None
    dims = list(np.asarray(shape, dtype=object).reshape(-1))
    if len(dims) != 4 or dims[2] is None or int(dims[2]) <= 0:
        return None
    return transpose.input[0], int(dims[2]), cast


def fuse_rope(onnx_model) -> dict:
    """Rewrites every traced RoPE of the graph into RotaryEmbedding, in place; returns how many, and how many of them
    took the 3-D form."""
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    g = _Graph(graph)
    found = [m for m in (_match(g, n) for n in graph.node if n.op_type == "Add") if m is not None]
    if not found:
        return {"rope": 0, "bsh": 0}
    graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), POSITIONS))
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), BSH_SHAPE))
    caches: dict[str, str] = {}

    def cache(values: np.ndarray, kind: str) -> str:
        """One initializer per distinct table (every windowed layer shares one, every global layer another)."""
        key = kind + hashlib.sha256(values.tobytes() + str(values.dtype).encode()).hexdigest()[:16]
        if key not in caches:
            caches[key] = f"fused_rope_{kind}_{len(caches)}"
            graph.initializer.append(numpy_helper.from_array(values, caches[key]))
        return caches[key]

    replacement, removed, bsh = {}, set(), 0
    for i, m in enumerate(found):
        tag = f"fused_rope_{i}"
        add = m["add"]
        nodes = []
        merge, split = _head_merge(g, add.output[0]), _head_split(g, m["x"])
        attrs = {"interleaved": 1}
        if merge and split:
            # 3-D: read the projection's [b,s,H,D] as [b,s,H·D], write where the head merge wrote.
            heads_bshd, heads, cast = split
            source = f"{tag}_bsh_in"
            nodes.append(helper.make_node("Reshape", [heads_bshd, BSH_SHAPE], [source], name=f"{tag}_merge_in"))
            if cast is not None:
                nodes.append(helper.make_node("Cast", [source], [f"{tag}_bsh_cast"], name=f"{tag}_cast",
                                              to=helper.get_attribute_value(cast.attribute[0])))
                source = f"{tag}_bsh_cast"
            output = merge[1].output[0]
            attrs["num_heads"] = heads
            removed.update(id(n) for n in merge)
            bsh += 1
        else:
            source, output = m["x"], add.output[0]
        nodes.append(helper.make_node(
            "RotaryEmbedding", [source, POSITIONS, cache(m["cos"], "cos"), cache(m["sin"], "sin")], [output],
            name=tag, domain=MS_DOMAIN, **attrs))
        replacement[id(add)] = nodes
    replace_nodes(graph, replacement, removed)
    use_ms_domain(onnx_model)
    return {"rope": len(found), "bsh": bsh}


def convert_model_dir(src: Path, out: Path | None = None) -> dict:
    """The vision graph of an export with fused RoPE (in place, or into `out` with the other files copied); the
    manifest records `"rope": "fused"` and the new checksum."""
    return rewrite_export(src, out, ["vision"], fuse_rope, {"rope": "fused"})["vision"]


def check_fixtures(fixtures: Path) -> int:
    """The eager tiny graphs the repository keeps (fused_attention.py's fixture export), their attention fused, then
    their RoPE (every application in the 3-D form: 2 per layer), then check_onnx.py on the result. Independent of
    the bundled model, which a regeneration with today's exporter writes with its RoPE already fused."""
    import tempfile

    import check_onnx
    import fused_attention

    with tempfile.TemporaryDirectory() as tmp:
        eager, attention, rope = Path(tmp) / "eager", Path(tmp) / "attention", Path(tmp) / "rope"
        fused_attention.eager_fixture_export(eager)
        fused_attention.convert_model_dir(eager, attention)
        counts = convert_model_dir(attention, rope)
        print(f"fused RoPE: {counts}")
        if counts["rope"] == 0 or counts["bsh"] != counts["rope"]:
            print("expected every RoPE of the fixture vision graph fused in the 3-D form", file=sys.stderr)
            return 1
        return check_onnx.main(["--model-dir", str(rope), "--fixtures", str(fixtures)])


def main(argv=None) -> int:
    return converter_main(
        argv, __doc__, "convert the eager fixture graphs (attention, then RoPE) and check them (CI)", check_fixtures,
        convert_model_dir, lambda c: f"RoPE applications fused {c}",
        lambda c: "no RoPE matched in the vision graph" if c["rope"] == 0 else None)


if __name__ == "__main__":
    sys.exit(main())
