#!/usr/bin/env python3
"""Check an exported model directory against committed PyTorch reference outputs, without torch.

Needs only numpy, onnxruntime and Pillow (`tokenizers` optional: when installed, tokenizer.json is checked too), so
CI can run it cheaply:

    pip install numpy onnxruntime==1.31.1 pillow tokenizers
    python segmenter-svc/export/check_onnx.py                       # defaults: the committed tiny model + fixtures
    python check_onnx.py --model-dir ../models/sam3-tiny --fixtures ../tests/fixtures/reference

For every fixtures/case_N it verifies:
  - the manifest: format, file hashes, graph input/output names, dtypes and shapes;
  - preprocessing: PIL decode + EXIF orientation + resize reproduces pixel_values.npy and the oriented size;
  - tokenization (if `tokenizers` is importable): the concepts reproduce input_ids.npy / attention_mask.npy;
  - ONNX Runtime (CPU) vision -> text -> decoder on the saved inputs vs the saved PyTorch outputs (max |Δ| printed;
    uint8 mask planes against round(σ(logit) · 255) of the saved logits, within one code);
  - expected.json: the kept instances recomputed from the ORT outputs;
  - batching: a decoder run per concept equals the batched run, and vision on a batch of 2 equals single runs.
Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

import sam3_common as common

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent / "models" / "sam3-tiny"
DEFAULT_FIXTURES = HERE.parent / "tests" / "fixtures" / "reference"
ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(uint8)": "uint8"}


class Checker:
    def __init__(self):
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            print(f"  FAIL {what}")
        return ok


def check_manifest(model_dir: Path, c: Checker) -> tuple[dict, dict]:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    c.check(manifest.get("format") == common.FORMAT and manifest.get("format_version") == common.FORMAT_VERSION,
            "manifest format / format_version")
    tok = manifest["tokenizer"]
    c.check(common.sha256_file(model_dir / tok["file"]) == tok["sha256"], "tokenizer.json sha256")
    sessions = {}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for name in ("vision", "text", "decoder"):
        g = manifest["graphs"][name]
        c.check(common.sha256_file(model_dir / g["file"]) == g["sha256"], f"{g['file']} sha256")
        for ext in g.get("external_data", []):
            c.check(common.sha256_file(model_dir / ext["file"]) == ext["sha256"], f"{ext['file']} sha256")
        sess = ort.InferenceSession(str(model_dir / g["file"]), opts, providers=["CPUExecutionProvider"])
        for kind, actual in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
            got = [{"name": a.name, "dtype": ORT_DTYPES.get(a.type, a.type), "shape": list(a.shape)} for a in actual]
            c.check(got == g[kind], f"{name} {kind} match the manifest: {got} vs {g[kind]}")
        sessions[name] = sess
    image_input = image_input_of(manifest)
    contract = common.graph_contract(manifest["image_size"], manifest["fpn_channels"], manifest["text_feature_dim"],
                                     manifest["num_queries"], manifest.get("decoder_topk", 0), image_input,
                                     common.mask_output_of(manifest))
    c.check(0 <= manifest.get("decoder_topk", 0) <= manifest["num_queries"], "decoder_topk within [0, num_queries]")
    for name, spec in contract.items():
        c.check({k: manifest["graphs"][name][k] for k in ("inputs", "outputs")} == spec,
                f"{name} graph follows the contract")
    c.check(manifest["mask_size"] == common.mask_size(manifest["image_size"]), "mask_size = 4*S/14")
    return manifest, sessions


def image_input_of(manifest: dict) -> str:
    """"u8" or "f32": which image input the export's vision graph takes (see sam3_common.IMAGE_INPUTS)."""
    name = manifest["graphs"]["vision"]["inputs"][0]["name"]
    return next((kind for kind, (n, _) in common.IMAGE_INPUTS.items() if n == name), name)


def run_vision(sessions: dict, pixel_values):
    """The FPN levels for normalised f32 pixels, fed the way the graph takes them (uint8 HWC or f32 CHW)."""
    (name,) = [i.name for i in sessions["vision"].get_inputs()]
    if name == common.IMAGE_INPUTS["u8"][0]:
        return sessions["vision"].run(list(common.FPN_NAMES), {name: common.to_image_u8(pixel_values)})
    return sessions["vision"].run(list(common.FPN_NAMES), {name: pixel_values})


def run_graphs(sessions: dict, pixel_values, input_ids, attention_mask) -> dict:
    fpn = run_vision(sessions, pixel_values)
    (text_features,) = sessions["text"].run(["text_features"], {"input_ids": input_ids,
                                                               "attention_mask": attention_mask})
    return run_decoder(sessions, fpn, text_features, attention_mask)


def run_decoder(sessions: dict, fpn, text_features, text_mask) -> dict:
    """All decoder outputs by name: the dense form or the top-k form, whichever the graph has."""
    feeds = dict(zip(common.FPN_NAMES, fpn), text_features=text_features, text_mask=text_mask)
    names = [o.name for o in sessions["decoder"].get_outputs()]
    return dict(zip(names, sessions["decoder"].run(names, feeds)))


def check_batching(sessions: dict, pixel_values, input_ids, attention_mask, c: Checker) -> float:
    """1 image x N prompts == N single-prompt runs; a vision batch of 2 == two single runs. Returns worst |Δ| of the
    float outputs (uint8 mask planes may differ by one code where a logit sits on a rounding boundary)."""
    fpn = run_vision(sessions, pixel_values)
    (tf,) = sessions["text"].run(["text_features"], {"input_ids": input_ids, "attention_mask": attention_mask})
    batched = run_decoder(sessions, fpn, tf, attention_mask)
    worst, worst_code = 0.0, 0
    for n in range(input_ids.shape[0]):
        single = run_decoder(sessions, fpn, tf[n:n + 1], attention_mask[n:n + 1])
        for k in single:
            delta = np.abs(single[k][0].astype(np.float64) - batched[k][n]).max()
            if single[k].dtype == np.uint8:
                worst_code = max(worst_code, int(delta))
            else:
                worst = max(worst, float(delta))
    c.check(worst_code <= 1, f"batched vs single runs: uint8 masks within one code (max {worst_code})")
    flipped = np.ascontiguousarray(pixel_values[:, :, :, ::-1])
    pair = run_vision(sessions, np.concatenate([pixel_values, flipped]))
    other = run_vision(sessions, flipped)
    for a, b, p in zip(fpn, other, pair):
        worst = max(worst, float(np.abs(p[0] - a[0]).max()), float(np.abs(p[1] - b[0]).max()))
    c.check(worst <= 1e-4, f"batched vs single runs agree (max |Δ| {worst:.2e})")
    return worst


def check_expected(case: dict, outputs: dict, expected: dict, c: Checker) -> list[int]:
    """Recompute kept instances from ORT outputs. A score within 1e-4 of the threshold may flip; none should be."""
    got = common.expected_instances(outputs, case["concepts"], case["score_threshold"], case["oriented_width"],
                                    case["oriented_height"])
    kept = []
    for g, e in zip(got["concepts"], expected["concepts"]):
        kept.append(len(e["instances"]))
        c.check(g["concept"] == e["concept"], f"concept order {g['concept']!r}")
        c.check(abs(g["presence_score"] - e["presence_score"]) < 1e-4, f"{e['concept']!r} presence score")
        c.check([i["query"] for i in g["instances"]] == [i["query"] for i in e["instances"]],
                f"{e['concept']!r} kept queries {[i['query'] for i in g['instances']]} vs "
                f"{[i['query'] for i in e['instances']]}")
        for gi, ei in zip(g["instances"], e["instances"]):
            c.check(abs(gi["score"] - ei["score"]) < 1e-4, f"{e['concept']!r} q{ei['query']} score")
            c.check(np.allclose(gi["box"], ei["box"], atol=1e-2), f"{e['concept']!r} q{ei['query']} box (pixels)")
    return kept


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    args = ap.parse_args(argv)

    c = Checker()
    print(f"model: {args.model_dir}")
    manifest, sessions = check_manifest(args.model_dir, c)
    tokenizer = None
    try:
        tokenizer = common.load_tokenizer(args.model_dir / manifest["tokenizer"]["file"])
        print(f"tokenizer checks: {common.check_tokenizer(tokenizer)}")
    except ImportError:
        print("tokenizers not installed: skipping the tokenizer checks")

    cases = sorted(p for p in args.fixtures.glob("case_*") if p.is_dir())
    c.check(bool(cases), f"fixtures found under {args.fixtures}")
    for case_dir in cases:
        case = json.loads((case_dir / "case.json").read_text())
        saved = {p.stem: np.load(p) for p in case_dir.glob("*.npy")}
        print(f"{case_dir.name}: {case['image']} concepts={case['concepts']}")

        image = common.load_oriented_rgb(case_dir / case["image"])
        c.check(image.size == (case["oriented_width"], case["oriented_height"]),
                f"oriented size {image.size} vs case.json")
        pixel_values = common.preprocess(image, manifest["image_size"])
        d = float(np.abs(pixel_values - saved["pixel_values"]).max())
        c.check(d <= 1e-6, f"preprocessing reproduces pixel_values.npy (max |Δ| {d:.2e})")
        if tokenizer is not None:
            ids, mask, _ = common.tokenize(tokenizer, case["concepts"])
            c.check(np.array_equal(ids, saved["input_ids"]) and np.array_equal(mask, saved["attention_mask"]),
                    "tokenizer reproduces input_ids.npy / attention_mask.npy")

        outputs = run_graphs(sessions, saved["pixel_values"], saved["input_ids"], saved["attention_mask"])
        # The fixtures hold PyTorch's dense outputs; a top-k decoder is compared with them at the queries it kept, and
        # the queries it kept with PyTorch's top k (near-ties may swap across the cut).
        topk = manifest.get("decoder_topk", 0)
        want = common.align_topk(saved, outputs["topk_queries"]) if topk else saved
        if topk:
            gap = common.topk_rank_gap(saved["pred_logits"], outputs["topk_queries"])
            _, tol = common.output_delta(want["topk_logits"], outputs["topk_logits"])
            ok = c.check(gap <= tol, f"topk_queries: kept queries {gap:.3e} below PyTorch's k-th best > {tol:.1e}")
            print(f"  {'topk set':16s} kept vs PyTorch's top {topk}: {gap:.3e} below its k-th best (tol {tol:.1e}) "
                  f"{'ok' if ok else 'FAIL'}")
        for name in common.decoder_output_names(topk):
            ref = want[name]
            c.check(outputs[name].shape == ref.shape, f"{name} shape {outputs[name].shape} vs {ref.shape}")
            delta, tol = common.output_delta(ref, outputs[name])
            ok = c.check(delta <= tol, f"{name} max |Δ| {delta:.3e} > {tol:.1e}")
            print(f"  {name:16s} max|Δ| ORT vs PyTorch = {delta:.3e} (tol {tol:.1e}) {'ok' if ok else 'FAIL'}")
        expected = json.loads((case_dir / "expected.json").read_text())
        kept = check_expected(case, outputs, expected, c)
        worst = check_batching(sessions, saved["pixel_values"], saved["input_ids"], saved["attention_mask"], c)
        print(f"  kept instances per concept {kept} (threshold {case['score_threshold']}); "
              f"batched vs single max |Δ| {worst:.2e}")

    if c.failures:
        print(f"FAILED: {len(c.failures)} check(s)")
        return 1
    print(f"all checks passed ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
