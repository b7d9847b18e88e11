#!/usr/bin/env python3
"""Fused vs eager attention on the CPU provider: time and peak memory of the vision graph (1 image) and the decoder
(N phrases), each variant in a fresh process, with the ratio against the eager graph measured in the same run.

    python bench_attention.py --model-dir ../models/sam3-tiny            # eager export; fused copy made in a temp dir
    python bench_attention.py --model-dir EAGER --fused-dir FUSED --phrases 3 --runs 10 --threads 2

Peak memory = the process's high-water mark (VmHWM, reset after the session is built) minus its RSS after the
session was built: what running the graph adds (ONNX Runtime's arena, the score tensors). Time = median of --runs
runs after one warm-up. The variants alternate (eager, fused, eager, fused) so load on a shared machine hits both.
Torch-free: numpy, onnx, onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import sam3_common as common

HERE = Path(__file__).resolve().parent


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _inputs(model_dir: Path, graph: str, phrases: int) -> dict:
    """Deterministic inputs: a random photo of the model's size; FPN levels and text features from the export's own
    vision and text graphs (so the decoder sees realistic values)."""
    import onnxruntime as ort

    manifest = json.loads((model_dir / "manifest.json").read_text())
    s = manifest["image_size"]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    spec = manifest["graphs"]["vision"]["inputs"][0]
    if spec["name"] == "pixel_values":
        image = ((image.transpose(0, 3, 1, 2).astype(np.float32) / 255.0) - 0.5) / 0.5
    feeds = {spec["name"]: image}
    if graph == "vision":
        return feeds
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    vision = ort.InferenceSession(str(model_dir / "vision.onnx"), opts, providers=["CPUExecutionProvider"])
    fpn = vision.run(list(common.FPN_NAMES), feeds)
    del vision
    words = list(common.TOKENIZER_CHECKS.values())
    ids, mask = common.pad_token_ids([words[i % len(words)] for i in range(phrases)])
    text = ort.InferenceSession(str(model_dir / "text.onnx"), opts, providers=["CPUExecutionProvider"])
    (tf,) = text.run(["text_features"], {"input_ids": ids, "attention_mask": mask})
    return dict(zip(common.FPN_NAMES, fpn), text_features=tf, text_mask=mask)


def child(args) -> None:
    """One variant of one graph in this process: prints a JSON line."""
    import onnxruntime as ort

    feeds = dict(np.load(args.inputs))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = args.threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(Path(args.child_dir) / f"{args.graph}.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    build_s = time.perf_counter() - t0
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    rss0 = _status_kb("VmRSS")
    session.run(None, feeds)  # warm-up (first run at a shape allocates)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"build_s": build_s, "median_ms": statistics.median(times) * 1e3,
                      "peak_mb": (_status_kb("VmHWM") - rss0) / 1024}))


def agreement(eager_dir: Path, fused_dir: Path, graph: str, feeds: dict) -> str:
    """Fused vs eager outputs on the same inputs: max |Δ| of the FPN levels (vision); mask IoU (logit > 0, rows of
    the same query) and the largest score difference (decoder)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    outs = []
    for d in (eager_dir, fused_dir):
        session = ort.InferenceSession(str(d / f"{graph}.onnx"), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outs.append(dict(zip(names, session.run(names, feeds))))
        del session
    a, b = outs
    if graph == "vision":
        worst = max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-9)) for k in common.FPN_NAMES)
        return f"FPN max |Δ|/max|x| {worst:.1e}"
    masks, logits = ("topk_masks", "topk_logits") if "topk_masks" in a else ("pred_masks", "pred_logits")
    same = a["topk_queries"] == b["topk_queries"] if "topk_queries" in a else np.ones(a[logits].shape, bool)
    ma, mb = a[masks][same] > 0, b[masks][same] > 0
    union = np.logical_or(ma, mb).sum()
    iou = float(np.logical_and(ma, mb).sum() / union) if union else 1.0
    score = lambda o: common.sigmoid(o[logits]) * common.sigmoid(o["presence_logits"])  # noqa: E731
    return (f"mask IoU {iou:.4f} over {int(same.sum())}/{same.size} rows with the same query, "
            f"max score |Δ| {float(np.abs(score(a) - score(b)).max()):.1e}")


def measure(model_dir: Path, graph: str, inputs: Path, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child-dir", str(model_dir), "--graph", graph, "--inputs",
                          str(inputs), "--runs", str(args.runs), "--threads", str(args.threads)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{model_dir.name}/{graph}.onnx failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="an export with eager attention")
    ap.add_argument("--fused-dir", type=Path,
                    help="the same export with fused attention (converted into it when it holds no manifest.json; "
                         "default: a temporary folder)")
    ap.add_argument("--phrases", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--graphs", default="vision,decoder", help="which graphs, comma-separated (default both)")
    ap.add_argument("--rounds", type=int, default=2, help="eager/fused pairs per graph (default 2)")
    ap.add_argument("--child-dir", help=argparse.SUPPRESS)
    ap.add_argument("--graph", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_dir:
        child(args)
        return 0
    if not args.model_dir:
        ap.error("--model-dir is required")
    with tempfile.TemporaryDirectory() as tmp:
        fused = args.fused_dir or Path(tmp) / "fused"
        if not (fused / "manifest.json").exists():
            import fused_attention

            print(f"converting {args.model_dir} into {fused}: {fused_attention.convert_model_dir(args.model_dir, fused)}")
        print(f"CPU provider, {args.threads} threads, median of {args.runs} runs after 1 warm-up, "
              f"{args.rounds} alternating rounds per variant; decoder at N={args.phrases}")
        print("| graph | eager ms | fused ms | fused/eager time | eager peak MB | fused peak MB | fused/eager peak |")
        print("|---|---|---|---|---|---|---|")
        rows, notes = [], []
        for graph in args.graphs.split(","):
            inputs = Path(tmp) / f"{graph}.npz"
            feeds = _inputs(args.model_dir, graph, args.phrases)
            np.savez(inputs, **feeds)
            runs = {"eager": [], "fused": []}
            for _ in range(args.rounds):
                runs["eager"].append(measure(args.model_dir, graph, inputs, args))
                runs["fused"].append(measure(fused, graph, inputs, args))
            ms = {k: statistics.median(r["median_ms"] for r in v) for k, v in runs.items()}
            mb = {k: max(r["peak_mb"] for r in v) for k, v in runs.items()}
            label = graph if graph == "vision" else f"decoder N={args.phrases}"
            rows.append(f"| {label} | {ms['eager']:.1f} | {ms['fused']:.1f} | {ms['fused'] / ms['eager']:.2f}x | "
                        f"{mb['eager']:.1f} | {mb['fused']:.1f} | {mb['fused'] / max(mb['eager'], 1e-9):.2f}x |")
            print(rows[-1], flush=True)
            notes.append(f"{label}: fused vs eager {agreement(args.model_dir, fused, graph, feeds)}")
        print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
