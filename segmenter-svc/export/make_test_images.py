#!/usr/bin/env python3
"""Procedurally generate the "real-looking" test photos used by the reference fixtures.

Deterministic (fixed seeds, numpy + Pillow only), so the committed images can be regenerated bit for bit with the
same numpy/Pillow versions. Nothing here needs torch.

    python make_test_images.py --out ../tests/fixtures/reference/images

Writes:
  room_640x480.jpg          a living room: shaded wall with a light gradient, wood-grain floor, a sofa, a frame
  mug_480x720.png           a product shot: a mug on a wooden tabletop against a soft backdrop (portrait)
  corner_exif6_500x375.jpg  a room corner with a rug and a lamp, stored rotated with EXIF Orientation = 6; shown
                            upright (after the orientation step) it is 500x375, the raw pixel grid is 375x500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112


def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs / max(w - 1, 1), ys / max(h - 1, 1)


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    gw, gh = w // cell + 2, h // cell + 2
    coarse = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0


def _wall(rng, w, h, base, light_x=0.2):
    x, y = _grid(w, h)
    shade = 0.78 + 0.22 * np.exp(-((x - light_x) ** 2) / 0.35) - 0.10 * y
    shade = shade + 0.03 * (_smooth_noise(rng, w, h, 24) - 0.5)
    return np.clip(np.asarray(base, np.float32)[None, None, :] * shade[..., None], 0, 255)


def _wood(rng, w, h, base=(150, 100, 60), plank=40, horizontal=True):
    x, y = np.mgrid[0:h, 0:w].astype(np.float32)
    along, across = (x, y) if horizontal else (y, x)
    plank_id = np.floor(across / plank)
    offsets = rng.random(int(plank_id.max()) + 2) * 500
    phase = offsets[plank_id.astype(int)]
    warp = 6.0 * _smooth_noise(rng, w, h, 30)
    grain = 0.5 + 0.5 * np.sin((across + warp * 3 + 0.02 * (along + phase)) * 0.9 + phase)
    rings = 0.5 + 0.5 * np.sin((along + phase) * 0.015 + warp)
    tone = 0.80 + 0.12 * grain * rings + 0.08 * _smooth_noise(rng, w, h, 8)
    tone = tone * (0.9 + 0.2 * (offsets[plank_id.astype(int)] % 1.0))  # plank-to-plank tint
    seam = (np.mod(across, plank) < 1.5).astype(np.float32)
    tone = tone * (1.0 - 0.35 * seam)
    return np.clip(np.asarray(base, np.float32)[None, None, :] * tone[..., None], 0, 255)


def _rounded_box(w, h, x0, y0, x1, y1, r):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = np.clip(xs, x0 + r, x1 - r)
    cy = np.clip(ys, y0 + r, y1 - r)
    return ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r) & (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


def _paint(img, mask, color, shade=None):
    col = np.asarray(color, np.float32)[None, None, :]
    layer = col if shade is None else col * shade[..., None]
    img[mask] = np.broadcast_to(layer, img.shape)[mask]


def room(w=640, h=480, seed=1) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = _wall(rng, w, h, (196, 188, 172))
    horizon = int(h * 0.62)
    img[horizon:] = _wood(rng, w, h - horizon, plank=28)
    img[horizon - 6:horizon] = (235, 232, 225)  # skirting board
    _, y = _grid(w, h)
    # picture frame on the wall
    frame = _rounded_box(w, h, 380, 70, 540, 190, 2)
    inner = _rounded_box(w, h, 392, 82, 528, 178, 1)
    _paint(img, frame, (60, 45, 35))
    _paint(img, inner, (90, 130, 150), 0.85 + 0.3 * _smooth_noise(rng, w, h, 12))
    # sofa: back, seat, two arms, cushions, legs; soft top-left light
    light = 0.75 + 0.35 * (1 - y) + 0.08 * (_smooth_noise(rng, w, h, 6) - 0.5)
    sofa = (70, 92, 120)
    _paint(img, _rounded_box(w, h, 90, 215, 470, 330, 18), sofa, light * 0.95)
    _paint(img, _rounded_box(w, h, 80, 300, 480, 380, 14), sofa, light * 1.05)
    _paint(img, _rounded_box(w, h, 60, 260, 118, 385, 16), sofa, light * 0.9)
    _paint(img, _rounded_box(w, h, 442, 260, 500, 385, 16), sofa, light * 0.9)
    for x0 in (128, 245, 362):
        _paint(img, _rounded_box(w, h, x0, 240, x0 + 105, 305, 20), (84, 108, 138), light)
    for x0 in (95, 460):
        _paint(img, _rounded_box(w, h, x0, 385, x0 + 12, 405, 2), (40, 30, 25))
    # contact shadow under the sofa
    shadow = _rounded_box(w, h, 70, 385, 500, 410, 10)
    img[shadow] *= 0.6
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def product(w=480, h=720, seed=2) -> Image.Image:
    rng = np.random.default_rng(seed)
    x, y = _grid(w, h)
    backdrop = 0.95 - 0.25 * y + 0.05 * np.cos(3 * (x - 0.5))
    img = np.asarray((225, 222, 218), np.float32)[None, None, :] * backdrop[..., None]
    table_top = int(h * 0.58)
    img[table_top:] = _wood(rng, w, h - table_top, base=(170, 120, 80), plank=60, horizontal=True)
    img[table_top:table_top + 4] *= 0.7  # table edge
    # mug: a cylinder with cylindrical shading, an elliptical rim and a handle
    cx, r, top, bottom = 230, 95, 300, 520
    xs = np.arange(w, dtype=np.float32)
    u = np.clip((xs - cx) / r, -1, 1)
    cyl = 0.55 + 0.5 * np.sqrt(1 - u * u) * (1 - 0.35 * u)
    body = (np.abs(xs[None, :] - cx) <= r) & (np.arange(h)[:, None] >= top) & (np.arange(h)[:, None] <= bottom)
    ys, xg = np.mgrid[0:h, 0:w].astype(np.float32)
    bottom_ell = ((xg - cx) / r) ** 2 + ((ys - bottom) / 16) ** 2 <= 1
    _paint(img, body | bottom_ell, (200, 60, 50), np.broadcast_to(cyl[None, :], (h, w)))
    rim = ((xg - cx) / r) ** 2 + ((ys - top) / 18) ** 2 <= 1
    inside = ((xg - cx) / (r - 8)) ** 2 + ((ys - top) / 13) ** 2 <= 1
    _paint(img, rim, (215, 75, 62))
    _paint(img, inside, (90, 30, 25))
    ring = (((xg - (cx + r)) / 55) ** 2 + ((ys - 405) / 70) ** 2 <= 1) & (
        ((xg - (cx + r)) / 33) ** 2 + ((ys - 405) / 48) ** 2 > 1) & (xg > cx + r - 4)
    _paint(img, ring, (185, 55, 45))
    shadow = (((xg - cx - 40) / 150) ** 2 + ((ys - bottom - 6) / 22) ** 2 <= 1) & ~(body | bottom_ell)
    img[shadow] *= 0.7
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def corner(w=500, h=375, seed=3) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    split = int(w * 0.45)
    img[:, :split] = _wall(rng, split, h, (170, 190, 180), light_x=0.9)
    img[:, split:] = _wall(rng, w - split, h, (185, 205, 195), light_x=0.1)
    img[:, split - 1:split + 1] *= 0.8
    floor_y = int(h * 0.68)
    img[floor_y:] = _wood(rng, w, h - floor_y, base=(120, 85, 55), plank=22)
    # rug: a patterned ellipse on the floor
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    rug = ((xs - 250) / 170) ** 2 + ((ys - 330) / 34) ** 2 <= 1
    stripes = 0.8 + 0.2 * np.sign(np.sin(xs * 0.12))
    _paint(img, rug, (160, 60, 70), stripes)
    # floor lamp: a base, a pole and a conical shade with a glow
    _paint(img, _rounded_box(w, h, 395, 282, 445, 292, 4), (40, 40, 40))
    _paint(img, _rounded_box(w, h, 417, 120, 423, 285, 1), (50, 50, 50))
    shade = (ys >= 70) & (ys <= 125) & (np.abs(xs - 420) <= 22 + (ys - 70) * 0.45)
    glow = np.exp(-(((xs - 420) / 90) ** 2 + ((ys - 110) / 70) ** 2))
    img *= (1 + 0.25 * glow)[..., None]
    _paint(img, shade, (245, 225, 170), 0.85 + 0.15 * (ys - 70) / 55)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def save_with_orientation_6(upright: Image.Image, path: Path, quality: int) -> None:
    """Store the pixels rotated 90 degrees counter-clockwise and tag Orientation = 6 ("rotate 90 CW to view")."""
    raw = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    raw.save(path, quality=quality, exif=exif.tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    room().save(args.out / "room_640x480.jpg", quality=88)
    product().save(args.out / "mug_480x720.png", optimize=True)
    save_with_orientation_6(corner(), args.out / "corner_exif6_500x375.jpg", quality=88)
    for p in sorted(args.out.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
