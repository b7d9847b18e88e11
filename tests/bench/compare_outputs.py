#!/usr/bin/env python3
"""Checks that a change left the orchestrator's outputs as they were: every output image under BEFORE has its
counterpart under AFTER (two `orchestrator-bench --keep-outputs DIR` runs on the same photos), with the same size and
a mean absolute difference of at most --max-mean codes (default 1, issue 13's "within 1 code mean"). Prints one line
per worst file and exits 1 on any failure.

  .venv-bench/bin/python tests/bench/compare_outputs.py BEFORE AFTER
"""
import argparse
import os
import sys

import cv2
import numpy as np


def images(root):
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            yield os.path.relpath(path, root)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--max-mean", type=float, default=1.0)
    args = ap.parse_args()
    failures, worst, n = [], (0.0, ""), 0
    for rel in sorted(images(args.before)):
        a = cv2.imread(os.path.join(args.before, rel), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(os.path.join(args.after, rel), cv2.IMREAD_UNCHANGED)
        if b is None:
            failures.append(f"{rel}: missing after")
            continue
        if a.shape != b.shape:
            failures.append(f"{rel}: {a.shape} -> {b.shape}")
            continue
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        mean = float(diff.mean())
        n += 1
        worst = max(worst, (mean, rel))
        if mean > args.max_mean:
            failures.append(f"{rel}: mean |diff| {mean:.3f} codes (max {int(diff.max())})")
    print(f"{n} outputs compared; worst mean |diff| {worst[0]:.3f} codes ({worst[1]})")
    for f in failures:
        print("FAIL", f)
    if n == 0:
        print("FAIL no outputs found under", args.before)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
