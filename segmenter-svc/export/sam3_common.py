"""Torch-free pieces shared by export_sam3.py and check_onnx.py: the graph contract, preprocessing, token padding,
post-processing into expected.json, and file hashing.

Only numpy and Pillow are needed here (plus `tokenizers` for the functions that build or use tokenizer.json), so CI
can check the committed fixtures without installing torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

FORMAT = "palette-sam3-onnx"
FORMAT_VERSION = 1
OPSET = 17
CONTEXT_LENGTH = 32
BOS_ID = 49406
EOS_ID = 49407
PAD_ID = EOS_ID
VOCAB_SIZE = 49408
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]
RESIZE = "bilinear_antialias"
OUTPUT_NAMES = ("pred_masks", "pred_boxes", "pred_logits", "presence_logits", "semantic_seg")
# The decoder's outputs when it selects its best K queries itself (--topk K): the dense [N, Q, M, M] mask tensor then
# never leaves ONNX Runtime (on CUDA: never crosses to the host; 66 MB per phrase at full size).
TOPK_OUTPUT_NAMES = ("topk_masks", "topk_boxes", "topk_logits", "topk_queries", "presence_logits", "semantic_seg")
# 20 = segmenter-svc's default MAX_INSTANCES_PER_CONCEPT: more rows would only cross from the device to be dropped.
DEFAULT_TOPK = 20


def decoder_output_names(topk: int) -> tuple:
    return TOPK_OUTPUT_NAMES if topk else OUTPUT_NAMES
FPN_NAMES = ("fpn_0", "fpn_1", "fpn_2")

# Known ids from the CLIP BPE vocabulary; a tokenizer.json that disagrees is built from the wrong files.
TOKENIZER_CHECKS = {
    "wall": [BOS_ID, 2569, EOS_ID],
    "floor": [BOS_ID, 4125, EOS_ID],
    "sofa": [BOS_ID, 15723, EOS_ID],
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The vision graph's image input. "u8" (the default since 2026-11-30): the resized photo as it is, uint8 HWC
# [B, S, S, 3], normalised inside the graph (a quarter of the bytes to the GPU, no float pass on the host). "f32":
# normalised float32 CHW [B, 3, S, S], what older exports take (the server reads either from the manifest).
IMAGE_INPUTS = {"u8": ("image_u8", "uint8"), "f32": ("pixel_values", "float32")}


def image_input_spec(image_input: str, image_size: int) -> dict:
    name, dtype = IMAGE_INPUTS[image_input]
    shape = ["B", image_size, image_size, 3] if image_input == "u8" else ["B", 3, image_size, image_size]
    return {"name": name, "dtype": dtype, "shape": shape}


def to_image_u8(pixel_values: np.ndarray) -> np.ndarray:
    """f32 [B,3,S,S] normalised with IMAGE_MEAN/IMAGE_STD -> the uint8 [B,S,S,3] it came from (exact: the resize
    writes 8-bit pixels before the normalisation)."""
    mean = np.asarray(IMAGE_MEAN, np.float32)[None, :, None, None]
    std = np.asarray(IMAGE_STD, np.float32)[None, :, None, None]
    u8 = np.rint((pixel_values * std + mean) * 255.0)
    assert np.abs((pixel_values * std + mean) * 255.0 - u8).max() < 1e-3, "not 8-bit pixels"
    return np.ascontiguousarray(u8.astype(np.uint8).transpose(0, 2, 3, 1))


# The decoder's mask planes (masks, semantic map). "u8" (the default since 2026-11-30): round(σ(logit) · 255) as uint8,
# computed in the graph (mask_output.py), a quarter of the bytes from the device. "f32": the logits, what older
# exports return (the server reads either; the manifest's output dtype says which).
MASK_OUTPUTS = {"u8": "uint8", "f32": "float32"}
MASK_PLANES = ("topk_masks", "pred_masks", "semantic_seg")


def mask_output_of(manifest: dict) -> str:
    """"u8" or "f32": how an export's decoder returns its mask planes (read from the manifest's output dtypes)."""
    dtype = next(o["dtype"] for o in manifest["graphs"]["decoder"]["outputs"] if o["name"] in MASK_PLANES)
    return next(kind for kind, d in MASK_OUTPUTS.items() if d == dtype)


def mask_codes(logits: np.ndarray) -> np.ndarray:
    """What a u8-mask decoder returns for these logits: round(σ(logit) · 255), half up."""
    return np.floor(sigmoid(logits) * 255.0 + 0.5).astype(np.uint8)


def output_delta(want: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |Δ|, tolerance) of a decoder output against a float reference: float outputs within 1e-4 + 1e-4·max|ref|;
    uint8 mask planes against the reference's codes within one code (the sigmoid and the rounding boundary)."""
    if got.dtype == np.uint8:
        return float(np.abs(mask_codes(want).astype(np.int16) - got.astype(np.int16)).max()), 1.0
    return float(np.abs(want - got).max()), 1e-4 + 1e-4 * float(np.abs(want).max())


def graph_contract(image_size: int, fpn_channels: int, text_feature_dim: int, num_queries: int,
                   topk: int = 0, image_input: str = "f32", masks: str = "f32") -> dict:
    """Names, dtypes and shapes of the three graphs; symbols are the dynamic dims (B images, N phrases). With topk > 0
    the decoder returns its best `topk` queries per phrase (by logit, best first) instead of all of them; with
    masks="u8" its mask planes are uint8 probabilities (MASK_OUTPUTS)."""
    s, c, d, q = image_size, fpn_channels, text_feature_dim, num_queries
    m = mask_size(image_size)
    t = CONTEXT_LENGTH
    plane = MASK_OUTPUTS[masks]

    def io(name, dtype, shape):
        return {"name": name, "dtype": dtype, "shape": shape}

    fpn_b = [io("fpn_0", "float32", ["B", c, m, m]), io("fpn_1", "float32", ["B", c, m // 2, m // 2]),
             io("fpn_2", "float32", ["B", c, m // 4, m // 4])]
    fpn_1 = [dict(x, shape=[1] + x["shape"][1:]) for x in fpn_b]
    return {
        "vision": {"inputs": [image_input_spec(image_input, s)], "outputs": fpn_b},
        "text": {
            "inputs": [io("input_ids", "int64", ["N", t]), io("attention_mask", "int64", ["N", t])],
            "outputs": [io("text_features", "float32", ["N", t, d])],
        },
        "decoder": {
            "inputs": fpn_1 + [io("text_features", "float32", ["N", t, d]), io("text_mask", "int64", ["N", t])],
            "outputs": [
                io("topk_masks", plane, ["N", topk, m, m]),
                io("topk_boxes", "float32", ["N", topk, 4]),
                io("topk_logits", "float32", ["N", topk]),
                io("topk_queries", "int64", ["N", topk]),
                io("presence_logits", "float32", ["N", 1]),
                io("semantic_seg", plane, ["N", 1, m, m]),
            ] if topk else [
                io("pred_masks", plane, ["N", q, m, m]),
                io("pred_boxes", "float32", ["N", q, 4]),
                io("pred_logits", "float32", ["N", q]),
                io("presence_logits", "float32", ["N", 1]),
                io("semantic_seg", plane, ["N", 1, m, m]),
            ],
        },
    }


def to_topk(dense: dict, k: int) -> dict:
    """The dense (PyTorch reference) outputs in the decoder's top-k form: best k queries by logit, best first."""
    order = np.argsort(-dense["pred_logits"], axis=1, kind="stable")[:, :k]
    return {
        "topk_masks": np.take_along_axis(dense["pred_masks"], order[:, :, None, None], axis=1),
        "topk_boxes": np.take_along_axis(dense["pred_boxes"], order[:, :, None], axis=1),
        "topk_logits": np.take_along_axis(dense["pred_logits"], order, axis=1),
        "topk_queries": order.astype(np.int64),
        "presence_logits": dense["presence_logits"],
        "semantic_seg": dense["semantic_seg"],
    }


def align_topk(dense: dict, queries: np.ndarray) -> dict:
    """The dense (PyTorch reference) outputs at the queries a top-k graph returned, in its order. Queries whose logits
    nearly tie can swap places between PyTorch and ONNX Runtime (fp16 above all); compared rank by rank, a mask would
    then be compared with its neighbour's. Whether the graph kept the right queries is checked apart (`topk_rank_gap`)."""
    q = queries.astype(np.int64)
    return {
        "topk_masks": np.take_along_axis(dense["pred_masks"], q[:, :, None, None], axis=1),
        "topk_boxes": np.take_along_axis(dense["pred_boxes"], q[:, :, None], axis=1),
        "topk_logits": np.take_along_axis(dense["pred_logits"], q, axis=1),
        "topk_queries": q,
        "presence_logits": dense["presence_logits"],
        "semantic_seg": dense["semantic_seg"],
    }


def topk_rank_gap(dense_logits: np.ndarray, queries: np.ndarray) -> float:
    """How far below the reference's own k-th best logit the graph's kept queries fall, in reference logits: 0 when it
    kept exactly the reference's top k, small when near-ties swapped across the cut; inf for a query index out of
    range or one kept twice."""
    n, q = dense_logits.shape
    kept = queries.astype(np.int64)
    if kept.min() < 0 or kept.max() >= q or any(len(set(row)) != len(row) for row in kept.tolist()):
        return float("inf")
    kth = -np.sort(-dense_logits, axis=1)[:, kept.shape[1] - 1:kept.shape[1]]
    return float(np.maximum(kth - np.take_along_axis(dense_logits, kept, axis=1), 0).max())


def mask_size(image_size: int) -> int:
    # The ViT has patch 14 and the highest FPN level is upsampled 4x: M = 4 * S / 14.
    return 4 * image_size // 14


def load_oriented_rgb(path: Path) -> Image.Image:
    """Decode, apply the EXIF orientation, convert to RGB (what the Rust side must do first)."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def preprocess(image: Image.Image, image_size: int) -> np.ndarray:
    """RGB PIL image -> f32 [1,3,S,S]. PIL's BILINEAR filter antialiases on downscale (support grows with scale)."""
    resized = image.resize((image_size, image_size), Image.BILINEAR)
    x = np.asarray(resized, dtype=np.float32) / 255.0
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def pad_token_ids(ids_list: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """[BOS, ..., EOS] lists -> (input_ids, attention_mask) i64 [N,32]: truncate keeping EOS last, pad with EOS."""
    n = len(ids_list)
    input_ids = np.full((n, CONTEXT_LENGTH), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((n, CONTEXT_LENGTH), dtype=np.int64)
    for i, ids in enumerate(ids_list):
        if len(ids) > CONTEXT_LENGTH:
            ids = ids[: CONTEXT_LENGTH - 1] + [EOS_ID]
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer  # optional for check_onnx.py

    return Tokenizer.from_file(str(path))


def tokenize(tokenizer, concepts: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Returns input_ids, attention_mask and the untruncated token count per concept."""
    raw = [tokenizer.encode(c).ids for c in concepts]
    ids, mask = pad_token_ids(raw)
    return ids, mask, [len(r) for r in raw]


def check_tokenizer(tokenizer) -> dict:
    got = {word: tokenizer.encode(word).ids for word in TOKENIZER_CHECKS}
    bad = {w: ids for w, ids in got.items() if ids != TOKENIZER_CHECKS[w]}
    if bad:
        raise SystemExit(f"tokenizer check failed: {bad} (expected {TOKENIZER_CHECKS})")
    return got


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def expected_instances(outputs: dict, concepts: list[str], threshold: float, width: int, height: int) -> dict:
    """Per concept: presence score and kept instances (score = σ(logit)·σ(presence) > threshold), best first."""
    presence = sigmoid(outputs["presence_logits"][:, 0])
    if "topk_queries" in outputs:  # positions are ranks; the query index comes with them
        logits, boxes, queries = outputs["topk_logits"], outputs["topk_boxes"], outputs["topk_queries"]
    else:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        queries = np.broadcast_to(np.arange(logits.shape[1]), logits.shape)
    scores = sigmoid(logits) * presence[:, None]
    scale = np.array([width, height, width, height], dtype=np.float64)
    result = []
    for n, concept in enumerate(concepts):
        keep = np.nonzero(scores[n] > threshold)[0]
        keep = keep[np.argsort(-scores[n][keep], kind="stable")]
        instances = []
        for pos in keep:
            box = boxes[n, pos].astype(np.float64) * scale
            box = np.clip(box, 0, scale)
            instances.append({"query": int(queries[n, pos]), "score": float(scores[n, pos]),
                              "box": [float(v) for v in box]})
        result.append({"concept": concept, "presence_score": float(presence[n]), "instances": instances})
    return {"score_threshold": threshold, "image_width": width, "image_height": height, "concepts": result}


def save_onnx(onnx_model, path: Path) -> list[Path]:
    """Saves a graph; past protobuf's 2 GB cap (an fp32 full-size vision graph) its weights go to one external file
    beside it, which is returned (empty list otherwise). Stale files of an earlier save are removed first."""
    import onnx

    data = path.with_name(path.name + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    if onnx_model.ByteSize() > 1_800_000_000:
        onnx.save_model(onnx_model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [data]
    onnx.save_model(onnx_model, str(path))
    return []


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
