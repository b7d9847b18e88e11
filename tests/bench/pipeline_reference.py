#!/usr/bin/env python3
"""The per-image pipeline around the model, the way a careful Python worker (the seed's) would write it with NumPy and
OpenCV, for orchestrator-bench to measure itself against in the same run.

For each photo: decode the JPEG; upsample every instance mask from model resolution into its box on a full-frame
plane and PNG-encode the box (stored masks are crops, as the orchestrator's); per rule, build the region from the concept's instances (the same colour-guided
refinement as ours, from the rules bench reference) and apply the same maths as ours (recolour, tone, texture:
orchestrator-svc/rules/bench/reference.py, whose outputs the rules bench checks against the Rust rules), encode the
output as JPEG; then a 256-px preview of the first output. Single-threaded (cv2.setNumThreads(1)): the ratio is per
core. Segmentation is not part of it: the masks are synthetic blobs of the same count and resolution as the
segmenter's.

Times are CPU seconds of this process (time.process_time), as the bench's own figures are: wall time inflated the
reference, and so the ratio, whenever the machine was busy (at load ~7 on 2 cores the 1 MP reference read 0.77 s
per image by the clock, 0.40 s at load ~3.5).

Prints one JSON line: {"images": n, "seconds_per_image": s, "stages": {...}}.
"""
import argparse
import glob
import json
import os
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../orchestrator-svc/rules/bench"))
import reference  # noqa: E402  (the rules bench's NumPy implementation of our maths)


def instance_masks(rng, n, size):
    """n soft blobs at model resolution, as a segmenter returns them (u8 probabilities)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
        out.append((np.clip(1.5 - d, 0, 1) * 255).astype(np.uint8))
    return out


def boxes(rng, n, w, h):
    out = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, 0.5) * w, rng.uniform(0, 0.5) * h
        out.append((int(x0), int(y0), int(x0 + rng.uniform(0.3, 0.5) * w), int(y0 + rng.uniform(0.3, 0.5) * h)))
    return out


def region(photo, union, feather=1.0):
    """As region.rs without occluders: colour-guided refinement of the concept's union, then a feather."""
    h, w = union.shape
    r = int(np.clip(round(5 * max(w, h) / 1024), 2, 40))
    a = reference.guided(photo.astype(np.float32) / 255.0, union.astype(np.float32) / 255.0, r)
    a = cv2.GaussianBlur(a, (0, 0), feather / 2)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", required=True, help="folder of JPEG photos (the bench's inputs)")
    ap.add_argument("--instances", type=int, required=True, help="instance masks per photo, over the 3 concepts")
    ap.add_argument("--mask-size", type=int, required=True, help="model mask resolution (square)")
    ap.add_argument("--limit", type=int, default=4, help="photos to time")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(7)
    swatch = (rng.random((256, 256, 3)) * 80 + 150).astype(np.uint8)
    files = sorted(glob.glob(os.path.join(args.photos, "*.jpg")))[: args.limit]
    if not files:
        sys.exit(f"no photos in {args.photos}")
    per_concept = [args.instances // 3 + (1 if i < args.instances % 3 else 0) for i in range(3)]
    stages = {"decode": 0.0, "masks": 0.0, "rules": 0.0, "preview": 0.0}
    encoded = 0
    for f in files:
        data = open(f, "rb").read()
        t = time.process_time()
        photo = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        h, w = photo.shape[:2]
        t1 = time.process_time()
        unions = []
        for count in per_concept:
            union = np.zeros((h, w), np.uint8)
            for m, (x0, y0, x1, y1) in zip(instance_masks(rng, count, args.mask_size), boxes(rng, count, w, h)):
                plane = np.zeros((h, w), np.uint8)
                plane[y0:y1, x0:x1] = cv2.resize(m, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
                ok, png = cv2.imencode(".png", plane[y0:y1, x0:x1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
                encoded += len(png)
                np.maximum(union, plane, out=union)
            unions.append(union)
        t2 = time.process_time()
        outputs = []
        for rule, union in zip(["recolor", "tone", "texture"], unions):
            reg = region(photo, union)
            if rule == "recolor":
                out = reference.recolor(photo, reg)
            elif rule == "tone":
                out = reference.tone(photo, reg, brightness=0.0, contrast=0.0, saturation=0.0, warmth=0.3)
            else:
                out = reference.texture(photo, reg, swatch, rotation=0.0)
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            outputs.append(out)
        t3 = time.process_time()
        s = 256 / max(w, h)
        small = cv2.resize(outputs[0], (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        t4 = time.process_time()
        for k, dt in zip(stages, [t1 - t, t2 - t1, t3 - t2, t4 - t3]):
            stages[k] += dt
    n = len(files)
    print(json.dumps({
        "images": n,
        "seconds_per_image": sum(stages.values()) / n,
        "stages": {k: v / n for k, v in stages.items()},
        "mask_png_bytes_per_image": encoded / n,
    }))


if __name__ == "__main__":
    main()
