#!/usr/bin/env python3
"""Hole-filling quality: palette-rules' exemplar fill (`remove` with mode "fill", via the CLI) against OpenCV's
Telea inpainting on synthetic textures with known ground truth, PSNR over the hole. Run from the repo root:

  cargo build --release -p palette-rules
  .venv-bench/bin/python orchestrator-svc/rules/bench/inpaint_compare.py [--bin target/release/palette-rules]
      [--reference]

--reference adds a column for bench/fill_reference.py (the NumPy port of the same fill that bench_rules times), to
show that port is faithful: it should land within noise of "ours".
"""
import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np

rng = np.random.default_rng(7)


def stripes(h, w):
    y, x = np.mgrid[0:h, 0:w]
    s = np.where(((x + y // 2) // 6) % 2 == 0, 1.0, 0.55)
    return s[..., None] * np.array([110, 150, 190]) * (1 + 0.04 * rng.standard_normal((h, w, 1)))


def checker(h, w):
    y, x = np.mgrid[0:h, 0:w]
    s = np.where(((x // 10) + (y // 10)) % 2 == 0, 0.9, 0.35)
    return s[..., None] * np.array([200, 200, 190]) + 6 * rng.standard_normal((h, w, 3))


def bricks(h, w):
    y, x = np.mgrid[0:h, 0:w]
    row = y // 12
    mortar = (y % 12 < 2) | (((x + 14 * (row % 2)) % 28) < 2)
    base = np.array([70, 90, 160]) * (0.9 + 0.2 * rng.random((h // 12 + 1, w // 14 + 2)))[row, (x + 14 * (row % 2)) // 28][..., None]
    img = np.where(mortar[..., None], np.array([200, 200, 200]), base)
    return img + 5 * rng.standard_normal((h, w, 3))


def grain(h, w):
    n = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 2.0)
    n = n / n.std()
    return np.array([120, 140, 150]) + 25 * n[..., None] + 4 * rng.standard_normal((h, w, 3))


def smooth(h, w):
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    return np.stack([60 + 120 * x, 80 + 100 * y, 200 - 80 * x * y], axis=2)


def psnr(a, b, m):
    d = (a.astype(np.float64) - b.astype(np.float64))[m > 0]
    return 10 * np.log10(255.0 ** 2 / max((d ** 2).mean(), 1e-9))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/palette-rules")
    ap.add_argument("--reference", action="store_true")
    args = ap.parse_args()
    if args.reference:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        import fill_reference
    h, w = 192, 256
    holes = {
        "square 40": lambda m: cv2.rectangle(m, (108, 76), (147, 115), 255, -1),
        "blob 64": lambda m: cv2.ellipse(m, (128, 96), (34, 26), 20, 0, 360, 255, -1),
        "scratch": lambda m: cv2.line(m, (30, 40), (220, 160), 255, 5),
    }
    textures = {"stripes": stripes, "checker": checker, "bricks": bricks, "grain": grain, "smooth": smooth}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for tname, tf in textures.items():
            truth = np.clip(tf(h, w), 0, 255).astype(np.uint8)
            for hname, hf in holes.items():
                mask = hf(np.zeros((h, w), np.uint8))
                holed = truth.copy()
                holed[mask > 0] = (0, 255, 0)
                cv2.imwrite(str(tmp / "in.png"), holed)
                cv2.imwrite(str(tmp / "mask.png"), mask)
                rule = json.dumps({"type": "remove",
                                   "params": {"mode": "fill", "refine": False, "feather": 0}})
                subprocess.run([args.bin, "apply", "--image", str(tmp / "in.png"), "--mask", str(tmp / "mask.png"),
                                "--rule", rule, "--out", str(tmp / "out.png")], check=True)
                ours = cv2.imread(str(tmp / "out.png"))
                telea = cv2.inpaint(holed, mask, 3, cv2.INPAINT_TELEA)
                port = fill_reference.fill(holed, mask) if args.reference else None
                rows.append((tname, hname, psnr(ours, truth, mask), psnr(telea, truth, mask),
                             psnr(port, truth, mask) if port is not None else None))
    extra = f" {'NumPy port dB':>14}" if args.reference else ""
    print(f"{'texture':<9} {'hole':<10} {'ours dB':>8} {'Telea dB':>9} {'gain':>6}{extra}")
    for t, hn, a, b, c in rows:
        extra = f" {c:14.2f}" if c is not None else ""
        print(f"{t:<9} {hn:<10} {a:8.2f} {b:9.2f} {a - b:+6.2f}{extra}")
    gains = [a - b for _, _, a, b, _ in rows]
    if args.reference:
        print(f"NumPy port mean {np.mean([c for *_, c in rows]):.2f} dB vs ours {np.mean([r[2] for r in rows]):.2f} dB")
    print(f"mean gain {np.mean(gains):+.2f} dB; ours better in {sum(g > 0 for g in gains)}/{len(gains)} cases")


if __name__ == "__main__":
    main()
