#!/usr/bin/env python3
"""NumPy/OpenCV reference for the palette-rules benchmark: the same maths as the Rust rules, written the way a
careful NumPy user would (vectorised, OpenCV for colour conversion and box filters, work limited to the region's
bounding box). The Rust bench (examples/bench_rules.rs) writes raw inputs, runs this script and prints the ratio.

Input files (raw bytes, row-major): photo.rgb (h*w*3), region.gray, wall.gray, sofa.gray (h*w each).
Output: one JSON object per line: {"rule": ..., "seconds": best-of-reps}; with --write-outputs also each
deterministic rule's result as ref_<rule>.raw (same layout), which the bench compares with its own.
"""
import argparse
import json
import time

import cv2
import numpy as np

import fill_reference

# sRGB code -> linear light, as in the Rust LUT.
_c = np.arange(256, dtype=np.float32) / 255.0
SRGB_TO_LIN = np.where(_c <= 0.04045, _c / 12.92, ((_c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def encode(lin):
    lin = np.clip(lin, 0.0, 1.0)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.power(lin, 1 / 2.4) - 0.055) * 255.0


def bounds(region):
    ys, xs = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    return ys[0], ys[-1] + 1, xs[0], xs[-1] + 1


def blend(photo, region, edited_srgb, strength, box):
    y0, y1, x0, x1 = box
    out = photo.copy()
    src = photo[y0:y1, x0:x1].astype(np.float32)
    w = region[y0:y1, x0:x1].astype(np.float32)[..., None] * (strength / 255.0)
    out[y0:y1, x0:x1] = np.clip(src + w * (edited_srgb - src) + 0.5, 0, 255).astype(np.uint8)
    return out


def hex_to_lab(hex_color):
    rgb = np.array([[[int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]]], np.uint8)
    return tuple(float(v) for v in cv2.cvtColor(SRGB_TO_LIN[rgb], cv2.COLOR_LRGB2Lab)[0, 0])


Y_W = np.array([0.2126729, 0.7151522, 0.072175], np.float32)
KNEE = 0.8
STEPS = 1 << 14


def lit_level(Y, a):
    """As light.rs: alpha-weighted median of the brightest quarter (87.5th percentile) on a 16k-step luminance grid,
    from every second row and column."""
    ys, ws = Y[::2, ::2].ravel(), a[::2, ::2].ravel()
    idx = np.minimum(np.rint(ys * (STEPS - 1)).astype(np.int64), STEPS - 1)
    cdf = np.cumsum(np.bincount(idx, weights=ws, minlength=STEPS))
    i = int(np.searchsorted(cdf, 0.875 * cdf[-1], side="right"))
    return max(i, 1) / (STEPS - 1)


def shoulder(top):
    """As light::Shoulder: identity below KNEE, an exponential roll-off with slope 1 at the knee reaching 1 at top.
    Returns y -> rolled-off y / y (the factor a colour is scaled by)."""
    if top <= 1.0:
        return lambda y: np.ones_like(y)
    room, span = 1.0 - KNEE, top - KNEE
    lo, hi = np.log(1e-6), np.log(1e6)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        c = np.exp(mid)
        lo, hi = (mid, hi) if room / c / (1 - np.exp(-span / c)) > 1 else (lo, mid)
    c = float(np.exp(0.5 * (lo + hi)))
    norm = 1 - np.exp(-span / c)

    def factor(y):
        rolled = KNEE + room * (1 - np.exp(-(np.minimum(y, top) - KNEE) / c)) / norm
        return np.where(y > KNEE, rolled / np.maximum(y, 1e-9), 1.0).astype(np.float32)
    return factor


def finish_light(s, gain, handover=0.1):
    """As light::finish_light: light ratios above 1 raised to the finish's gain, with a smooth hand-over."""
    if gain == 1.0:
        return s
    u = np.log(np.maximum(s, 1e-12))
    lifted = np.exp(gain * u + (1 - gain) * handover * (1 - np.exp(-u / handover)))
    return np.where(s > 1, lifted, s).astype(np.float32)


def recolor(photo, region, target="#1f3a5f", gain=0.9, strength=1.0):
    # The bench's rule is {"color": "#1f3a5f"} (eggshell finish: highlight gain 0.9). The paint (an sRGB hex, so in
    # gamut) times each pixel's light over the lit level, its largest channel rolled off past the knee.
    paint = SRGB_TO_LIN[[int(target[i:i + 2], 16) for i in (1, 3, 5)]]
    box = bounds(region)
    y0, y1, x0, x1 = box
    lin = SRGB_TO_LIN[photo[y0:y1, x0:x1]]
    Y = lin @ Y_W
    lit = lit_level(Y, region[y0:y1, x0:x1].astype(np.float32))
    out = paint * finish_light(Y / lit, gain)[..., None]
    top = float(paint.max() * finish_light(np.float32(1 / lit), gain))
    out *= shoulder(top)(out.max(axis=-1))[..., None]
    return blend(photo, region, encode(out), strength, box)


M1 = np.array([[0.4122214708, 0.5363325363, 0.0514459929],
               [0.2119034982, 0.6806995451, 0.1073969566],
               [0.0883024619, 0.2817188376, 0.6299787005]], np.float32)
M2 = np.array([[0.2104542553, 0.7936177850, -0.0040720468],
               [1.9779984951, -2.4285922050, 0.4505937099],
               [0.0259040371, 0.7827717662, -0.8086757660]], np.float32)
M1I, M2I = np.linalg.inv(M1).astype(np.float32), np.linalg.inv(M2).astype(np.float32)


def tone(photo, region, brightness=0.3, contrast=0.2, saturation=0.1, warmth=0.5, strength=1.0):
    box = bounds(region)
    y0, y1, x0, x1 = box
    lin = SRGB_TO_LIN[photo[y0:y1, x0:x1]]
    ok = np.cbrt(lin @ M1.T) @ M2.T
    a = region[y0:y1, x0:x1].astype(np.float32)
    mean = float((ok[..., 0] * a).sum() / a.sum())
    # Brightness is exposure (1.5 stops at 1): a linear-light scale, i.e. all of Oklab times its cube root.
    exposure = np.float32(2.0 ** (1.5 * brightness)) ** (1 / 3)
    ok[..., 0] = np.maximum(mean + (ok[..., 0] - mean) * (1 + contrast), 0) * exposure
    ok[..., 1] = ok[..., 1] * exposure * (1 + saturation) + 0.01 * warmth
    ok[..., 2] = ok[..., 2] * exposure * (1 + saturation) + 0.035 * warmth
    to_lin = lambda o: ((o @ M2I.T) ** 3) @ M1I.T
    # As tone.rs: past the knee the colour scales with its largest channel's roll-off (cube root in Oklab).
    roll = shoulder(float(((mean + (1 - mean) * (1 + contrast)) * exposure) ** 3))
    ok *= np.cbrt(roll(to_lin(ok).max(axis=-1)))[..., None]
    ok[..., 0] = np.minimum(ok[..., 0], 1)
    out = to_lin(ok)
    # As color::gamut_map: colours pushed out of sRGB lose Oklch chroma (12-step bisection at constant L and hue)
    # instead of being clipped per channel. Only those pixels (a few percent) pay for it.
    outside = ((out < -1e-4) | (out > 1 + 1e-4)).any(axis=-1)
    if outside.any():
        o = ok[outside]
        lo, hi = np.zeros(len(o), np.float32), np.ones(len(o), np.float32)
        for _ in range(12):
            mid = 0.5 * (lo + hi)
            c = to_lin(o * np.stack([np.ones_like(mid), mid, mid], axis=-1))
            inside = ((c >= -1e-4) & (c <= 1 + 1e-4)).all(axis=-1)
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        out[outside] = to_lin(o * np.stack([np.ones_like(lo), lo, lo], axis=-1))
    return blend(photo, region, encode(out), strength, box)


def texture(photo, region, swatch, scale=1.0, rotation=20.0, opacity=1.0, strength=1.0):
    box = bounds(region)
    y0, y1, x0, x1 = box
    h, w = photo.shape[:2]
    tile = max(w, h) / 8 * scale
    per_px = swatch.shape[1] / tile
    c, s = np.cos(np.radians(rotation)), np.sin(np.radians(rotation))
    sw_lin = SRGB_TO_LIN[swatch]
    # As texture.rs: the mip level whose texels come closest to a pixel. The bench's swatch is 256x256, where the
    # Rust code's area-weighted halving is exactly the mean of each 2x2 block (linear light).
    assert swatch.shape[0] % 256 == 0 and swatch.shape[1] % 256 == 0, "power-of-two swatch expected"
    for _ in range(min(8, max(0, int(round(np.log2(per_px)))))):
        sw_lin = 0.25 * (sw_lin[0::2, 0::2] + sw_lin[1::2, 0::2] + sw_lin[0::2, 1::2] + sw_lin[1::2, 1::2])
    pu = per_px * sw_lin.shape[1] / swatch.shape[1]
    pv = per_px * sw_lin.shape[0] / swatch.shape[0]
    # Affine from output pixel to swatch coordinates (at pixel centres, as texture.rs); BORDER_WRAP tiles the swatch.
    xc, yc = x0 + 0.5, y0 + 0.5
    m = np.array([[c * pu, s * pu, (c * xc + s * yc) * pu],
                  [-s * pv, c * pv, (-s * xc + c * yc) * pv]], np.float32)
    tex = cv2.warpAffine(sw_lin, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_WRAP)
    lin = SRGB_TO_LIN[photo[y0:y1, x0:x1]]
    Y = lin @ Y_W
    # As texture.rs: the swatch times each pixel's light over the lit level, the largest channel rolled off.
    lit = lit_level(Y, region[y0:y1, x0:x1].astype(np.float32))
    t = tex * (Y / lit)[..., None]
    t *= shoulder(1 / lit)(t.max(axis=-1))[..., None]
    return blend(photo, region, encode(lin + opacity * (t - lin)), strength, box)


def cutout(photo, region):
    return np.dstack([photo, 255 - region])


def guided(guide, p, r, eps=0.01):
    s = max(-(-r // 2), 1)  # as guided.rs: coefficients at 1/s resolution, s = ceil(r/2)
    rs = max(r // s, 1)
    h, w = p.shape
    small = (int(np.ceil(w / s)), int(np.ceil(h / s)))
    I = cv2.resize(guide, small, interpolation=cv2.INTER_AREA)
    ps = cv2.resize(p, small, interpolation=cv2.INTER_AREA)
    box = lambda x: cv2.boxFilter(x, -1, (2 * rs + 1, 2 * rs + 1))
    mi, mp = box(I), box(ps)
    cov_ip = box(I * ps[..., None]) - mi * mp[..., None]
    var = np.empty(I.shape[:2] + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            v = box(I[..., i] * I[..., j]) - mi[..., i] * mi[..., j]
            var[..., i, j] = var[..., j, i] = v
    var += eps * np.eye(3, dtype=np.float32)
    a = np.linalg.solve(var, cov_ip[..., None])[..., 0]
    b = mp - (a * mi).sum(axis=2)
    ma = cv2.resize(box(a), (w, h), interpolation=cv2.INTER_LINEAR)
    mb = cv2.resize(box(b), (w, h), interpolation=cv2.INTER_LINEAR)
    q = (ma * guide).sum(axis=2) + mb
    return np.clip(0.5 + (q - 0.5) * 2.0, 0, 1)


def build_region(photo, wall, sofa, feather=1.0):
    h, w = wall.shape
    r = int(np.clip(round(5 * max(w, h) / 1024), 2, 40))
    guide = photo.astype(np.float32) / 255.0
    a = guided(guide, wall.astype(np.float32) / 255.0, r)
    a = cv2.GaussianBlur(a, (0, 0), feather / 2)
    o = guided(guide, sofa.astype(np.float32) / 255.0, r)
    return (np.clip(a * (1 - o), 0, 1) * 255 + 0.5).astype(np.uint8)


def timed(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fill-any-size", action="store_true", help="time the NumPy fill at 12 MP too (minutes a run)")
    ap.add_argument("--write-outputs", action="store_true",
                    help="also write each rule's output as ref_<rule>.raw, for the bench's agreement check")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)
    w, h = args.width, args.height
    rd = lambda n, c: np.fromfile(f"{args.dir}/{n}", np.uint8).reshape((h, w, c) if c > 1 else (h, w))
    photo, region, wall, sofa = rd("photo.rgb", 3), rd("region.gray", 1), rd("wall.gray", 1), rd("sofa.gray", 1)
    swatch = np.fromfile(f"{args.dir}/swatch.rgb", np.uint8).reshape(256, 256, 3)
    cases = {
        "recolor": lambda: recolor(photo, region),
        "tone": lambda: tone(photo, region),
        "texture": lambda: texture(photo, region, swatch),
        "cutout": lambda: cutout(photo, region),
        "region": lambda: build_region(photo, wall, sofa),
    }
    # The same exemplar fill in NumPy (fill_reference.py; ~10 s a run at 1 MP, so timed once, and at 12 MP, where it
    # takes minutes, only with --fill-any-size), and OpenCV's Telea, a different and much cheaper algorithm, for context.
    hole = (sofa > 0).astype(np.uint8)
    if max(w, h) <= 1200 or args.fill_any_size:
        cases["fill"] = lambda: fill_reference.fill(photo, sofa)
    cases["fill-telea"] = lambda: cv2.inpaint(photo, hole, 3, cv2.INPAINT_TELEA)
    for name, fn in cases.items():
        reps = 1 if name == "fill" else args.reps
        print(json.dumps({"rule": name, "seconds": timed(fn, reps)}), flush=True)
    if args.write_outputs:
        # Deterministic rules only (the fill's random search differs by design; Telea is another algorithm).
        for name in ["recolor", "tone", "texture", "cutout", "region"]:
            np.ascontiguousarray(cases[name]()).tofile(f"{args.dir}/ref_{name}.raw")


if __name__ == "__main__":
    main()
