#!/usr/bin/env python3
"""HF PyTorch reference timings for the segmenter benchmark, measured on the same machine in the same run.

Builds the SAME model the exporter builds (`export_sam3.load_model`: `--random-init full|tiny`, same seed, same
fan-in re-initialisation; or real weights with `--model`), then times with CUDA synchronisation and warm-up, median
over K runs, per precision mode:

  vision_b1      get_vision_features on one preprocessed image already on the device
  text_nN        get_text_features for N phrases (tokens already on the device)
  decoder_nN     Sam3Model.forward(vision_embeds=<one image expanded to N>, text_embeds=.., attention_mask=..)
  e2e N          image file bytes -> PIL decode + EXIF + RGB -> resize S×S bilinear -> (x/255-0.5)/0.5 -> device,
                 tokenize N phrases, text + vision + decoder, score = σ(logit)·σ(presence) > threshold (top 20),
                 kept masks upsampled (bilinear) to the original size, > 0, copied to the host
  e2e_cached_text N   the same without the text encoder (the segmenter caches text features per phrase, and the
                 benchmark repeats the same phrases, so after warm-up its requests never run the text graph)

Modes: bf16 (torch.autocast bfloat16; the reference the issue's goal is stated against), tf32 (fp32 weights, TF32
matmuls/convs), fp32 (TF32 off). The first mode listed is the "primary" one: its e2e medians become the top-level
`e2e_ms` the benchmark client reads with --reference-json:

  {"name": "...", "e2e_ms": {"1": p50, "3": p50, "8": p50}, "stages_ms": {...}, "modes": {...}, ...}

  # CPU smoke test (tiny random model; seconds)
  .venv-export/bin/python segmenter-svc/bench/hf_reference.py --device cpu --random-init tiny --runs 3 --warmup 1 \
      --out /tmp/hf_reference.json
  # GPU (gpu-run.sh does this)
  python3 segmenter-svc/bench/hf_reference.py --device cuda --random-init full --modes bf16,tf32 --out $OUT/hf_reference.json

Random weights give real speed, not real masks: the number of kept instances (which drives the post-processing cost)
differs from a real model's, so post-processing is a small, approximate part of e2e here.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPORT_DIR = HERE.parent / "export"
sys.path.insert(0, str(EXPORT_DIR))

# The segmenter-bench client's concept list (segmenter-svc/src/bin/segmenter-bench.rs): the same phrases, so the
# tokens (and the text encoder's work) are the same on both sides.
WORDS = ["wall", "floor", "sofa", "table", "chair", "lamp", "rug", "window", "plant", "ceiling", "curtain", "cabinet"]
DEFAULT_IMAGE = HERE.parent / "tests/fixtures/reference/images/room_640x480.jpg"


def concepts(n: int) -> list[str]:
    return [WORDS[i % len(WORDS)] + (" two" if i >= len(WORDS) else "") for i in range(n)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--random-init", choices=["tiny", "full"], default=None,
                     help="random weights as export_sam3.py --random-init builds them (default: full)")
    src.add_argument("--model", default=None, help="HF repo id or local snapshot (real weights, as the exporter)")
    ap.add_argument("--revision", default=None)
    ap.add_argument("--seed", type=int, default=0, help="same meaning as export_sam3.py --seed (default 0)")
    ap.add_argument("--device", default="cuda", help="cuda | cpu (default cuda)")
    ap.add_argument("--modes", default="bf16", help="comma-separated: bf16,tf32,fp32; the first is primary")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="attention implementation (default sdpa, HF's default; the exporter traces eager)")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="JPEG/PNG sent end to end")
    ap.add_argument("--concepts", default="1,3,8", help="concept counts for decoder and e2e (default 1,3,8)")
    ap.add_argument("--text-n", type=int, default=3, help="phrases for the text-encoder stage (default 3)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs first (first runs at a shape are slow)")
    ap.add_argument("--threshold", type=float, default=0.5, help="score threshold in e2e post-processing")
    ap.add_argument("--max-instances", type=int, default=20, help="instances kept per concept (segmenter default 20)")
    ap.add_argument("--clip-bpe", default=None, help="bpe_simple_vocab_16e6.txt.gz (as export_sam3.py --clip-bpe)")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="torch threads with --device cpu (default 1: steadier on a shared machine)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="skip the remaining modes once this many seconds have passed (0 = no limit)")
    ap.add_argument("--out", type=Path, required=True, help="reference JSON to write")
    args = ap.parse_args(argv)
    if args.model is None and args.random_init is None:
        args.random_init = "full"
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in ("bf16", "tf32", "fp32"):
            ap.error(f"unknown mode {m!r}")
    args.concepts = [int(x) for x in args.concepts.split(",") if x.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from PIL import Image, ImageOps
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    import export_sam3
    import sam3_common as common

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    if not cuda:
        torch.set_num_threads(max(1, args.cpu_threads))

    tokenizer = export_sam3.build_clip_tokenizer(export_sam3.find_clip_bpe(args.clip_bpe))
    common.check_tokenizer(tokenizer)

    t0 = time.time()
    load_ns = argparse.Namespace(random_init=args.random_init, seed=args.seed, model=args.model,
                                 revision=args.revision)
    model, info = export_sam3.load_model(load_ns)  # the exporter's own model building (seed, re-init, eager)
    attn = "eager"
    if args.attn != "eager":
        try:
            model.set_attn_implementation(args.attn)
            attn = args.attn
        except Exception as e:  # an implementation this transformers version does not offer for Sam3
            print(f"attention {args.attn!r} not available ({e}); using eager", file=sys.stderr)
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    dims = export_sam3.model_dims(model)
    size = dims["image_size"]
    print(f"model ready: {n_params:,} parameters, {info['random_init'] or info['source_model']}, image {size}, "
          f"attention {attn}, on {device} ({time.time() - t0:.1f} s)", flush=True)

    image_bytes = args.image.read_bytes()
    with Image.open(io.BytesIO(image_bytes)) as im:
        orig_w, orig_h = ImageOps.exif_transpose(im).size

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def measure(fn, runs=None, warmup=None):
        runs = args.runs if runs is None else runs
        for _ in range(args.warmup if warmup is None else warmup):
            fn()
        sync()
        times = []
        for _ in range(runs):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        return {"p50": statistics.median(times), "min": times[0],
                "p90": times[min(len(times) - 1, round(0.9 * (len(times) - 1)))], "runs": len(times)}

    def tokens(n):
        ids, mask, _ = common.tokenize(tokenizer, concepts(n))
        return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

    def vision(pv):
        return model.get_vision_features(pixel_values=pv)

    def text(ids, mask):
        return model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output

    def decoder(vis, text_features, mask):
        n = text_features.shape[0]
        vis_n = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(f.expand(n, -1, -1, -1) for f in vis.fpn_hidden_states),
            fpn_position_encoding=tuple(p.expand(n, -1, -1, -1) for p in vis.fpn_position_encoding))
        return model(vision_embeds=vis_n, text_embeds=BaseModelOutputWithPooling(pooler_output=text_features),
                     attention_mask=mask)

    def postprocess(out):
        """σ(logit)·σ(presence) > threshold, best first, at most max_instances; kept masks to the original size."""
        scores = torch.sigmoid(out.pred_logits.float()) * torch.sigmoid(out.presence_logits.float())
        kept = 0
        for n in range(scores.shape[0]):
            s, q = torch.topk(scores[n], min(args.max_instances, scores.shape[1]))
            q = q[s > args.threshold]
            if q.numel():
                m = F.interpolate(out.pred_masks[n, q][None].float(), size=(orig_h, orig_w), mode="bilinear",
                                  align_corners=False)[0] > 0
                boxes = (out.pred_boxes[n, q].float() * torch.tensor([orig_w, orig_h, orig_w, orig_h],
                                                                     device=device)).cpu()
                m = m.cpu()  # the device->host copy of the kept masks is part of the answer
                kept += int(q.numel())
        return kept

    def preprocess():
        im = common.load_oriented_rgb(io.BytesIO(image_bytes))
        return torch.from_numpy(common.preprocess(im, size)).to(device)

    def e2e(n, with_text=True, cached=None):
        pv = preprocess()
        if with_text:
            ids, mask = tokens(n)  # tokenization on the host is part of the request
            tf = text(ids, mask)
        else:
            tf, mask = cached
        return postprocess(decoder(vision(pv), tf, mask))

    gpu_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    result_modes = {}
    skipped = []
    pixel_values = preprocess()
    for mode in args.modes:
        if args.budget_s and time.time() - t_start > args.budget_s and result_modes:
            skipped.append(mode)
            print(f"[{mode}] skipped: {time.time() - t_start:.0f} s > budget {args.budget_s:.0f} s", flush=True)
            continue
        if cuda:
            # tf32: TF32 matmuls and convs; fp32: neither; bf16: PyTorch's defaults (matmul off, cuDNN convs on).
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
            torch.backends.cudnn.allow_tf32 = mode != "fp32"
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=(mode == "bf16"))
        tm = time.time()
        r = {}
        with torch.inference_mode(), autocast:
            r["vision_b1"] = measure(lambda: vision(pixel_values))
            ids, mask = tokens(args.text_n)
            r[f"text_n{args.text_n}"] = measure(lambda: text(ids, mask))
            vis = vision(pixel_values)
            for n in args.concepts:
                ids_n, mask_n = tokens(n)
                tf_n = text(ids_n, mask_n)
                r[f"decoder_n{n}"] = measure(lambda: decoder(vis, tf_n, mask_n))
            kept = {}
            for n in args.concepts:
                r.setdefault("e2e", {})[str(n)] = measure(lambda: e2e(n))
                ids_n, mask_n = tokens(n)
                cached = (text(ids_n, mask_n), mask_n)
                r.setdefault("e2e_cached_text", {})[str(n)] = measure(lambda: e2e(n, False, cached))
                kept[str(n)] = e2e(n)
            r["kept_instances"] = kept
        if cuda:
            r["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        r["seconds"] = time.time() - tm
        result_modes[mode] = r
        print_mode(mode, r, args.text_n, args.concepts)
    torch.backends.cuda.matmul.allow_tf32 = False

    primary = next(iter(result_modes))
    label = {"bf16": "bf16 autocast", "tf32": "fp32+TF32", "fp32": "fp32"}[primary]
    pr = result_modes[primary]
    out = {
        "name": f"HF PyTorch {label} ({attn} attention, {info['random_init'] or 'real'} weights, {gpu_name})",
        "e2e_ms": {k: v["p50"] for k, v in pr["e2e"].items()},
        "e2e_cached_text_ms": {k: v["p50"] for k, v in pr["e2e_cached_text"].items()},
        "stages_ms": {k: v["p50"] for k, v in pr.items() if isinstance(v, dict) and "p50" in v},
        "primary_mode": primary,
        "modes": result_modes,
        "skipped_modes": skipped,
        "config": {"device": str(device), "gpu": gpu_name, "attention": attn, "image": args.image.name,
                   "image_size_orig": [orig_w, orig_h], "model_image_size": size, "runs": args.runs,
                   "warmup": args.warmup, "threshold": args.threshold, "max_instances": args.max_instances,
                   "parameters": n_params, **info},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "total_seconds": time.time() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['name']}; {out['total_seconds']:.0f} s)")
    return 0


def print_mode(mode: str, r: dict, text_n: int, ns: list[int]) -> None:
    cols = ["vision_b1", f"text_n{text_n}"] + [f"decoder_n{n}" for n in ns]
    print(f"\n[{mode}] median ms ({r['vision_b1']['runs']} runs)")
    print("  " + " ".join(f"{c:>11}" for c in cols))
    print("  " + " ".join(f"{r[c]['p50']:>11.2f}" for c in cols))
    print("  " + " ".join(f"{'e2e n' + str(n):>11}" for n in ns) + " " +
          " ".join(f"{'cached n' + str(n):>11}" for n in ns))
    print("  " + " ".join(f"{r['e2e'][str(n)]['p50']:>11.2f}" for n in ns) + " " +
          " ".join(f"{r['e2e_cached_text'][str(n)]['p50']:>11.2f}" for n in ns))
    print(f"  kept instances per e2e run: {r['kept_instances']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
