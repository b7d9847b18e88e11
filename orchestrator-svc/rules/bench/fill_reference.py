"""NumPy/OpenCV port of palette-rules' exemplar fill (src/inpaint.rs + ops::remove::fill): the same maths, written the
way a careful NumPy user would: every step vectorised over all pixels of a red-black pass (which is why the Rust code
uses red-black propagation too), OpenCV for dilation and box filters, np.bincount for the vote's scatter-add.

Not bit-identical to the Rust code: the random streams differ (same distribution) and the patch distance has no early
exit (same result, more work: NumPy cannot stop per element). bench/inpaint_compare.py --reference checks that it
reaches the same quality, so the speed comparison in bench_rules is like for like.
"""
import cv2
import numpy as np

PR = 3  # 7x7 patches
LOWPASS_SIGMA = 8.0
MAX_CORRECTION = 12.0


def hole_extent(hole):
    ys, xs = np.nonzero(hole)
    if len(ys) == 0:
        return 0
    return max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)


def shrink(img, hole):
    h, w = hole.shape
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    ip = np.pad(img, ((0, 2 * h2 - h), (0, 2 * w2 - w), (0, 0)), mode="edge")
    hp = np.pad(hole, ((0, 2 * h2 - h), (0, 2 * w2 - w)), mode="edge")
    kids = [(slice(dy, None, 2), slice(dx, None, 2)) for dy in (0, 1) for dx in (0, 1)]
    known = [~hp[k] for k in kids]
    n = sum(k.astype(np.float32) for k in known)
    acc = sum(ip[k] * kn[..., None] for k, kn in zip(kids, known))
    out = np.where(n[..., None] > 0, acc / np.maximum(n, 1)[..., None], 0).astype(np.float32)
    return out, n < 4


def onion_fill(img, hole):
    known = ~hole
    img = img.copy()
    while True:
        kp = np.pad(known, 1).astype(np.float32)
        ip = np.pad(img * known[..., None], ((1, 1), (1, 1), (0, 0)))
        h, w = hole.shape
        n = np.zeros((h, w), np.float32)
        acc = np.zeros_like(img)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    n += kp[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                    acc += ip[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        new = ~known & (n > 0)
        if not new.any():
            return img
        img[new] = acc[new] / n[new][:, None]
        known = known | new


def upsample_into(coarse, fine, hole):
    h, w = hole.shape
    ch, cw = coarse.shape[:2]
    fy = np.clip((np.arange(h) + 0.5) / 2 - 0.5, 0, ch - 1)
    fx = np.clip((np.arange(w) + 0.5) / 2 - 0.5, 0, cw - 1)
    y0, x0 = fy.astype(int), fx.astype(int)
    y1, x1 = np.minimum(y0 + 1, ch - 1), np.minimum(x0 + 1, cw - 1)
    ay, ax = (fy - y0)[:, None, None], (fx - x0)[None, :, None]
    top = coarse[y0][:, x0] + ax * (coarse[y0][:, x1] - coarse[y0][:, x0])
    bot = coarse[y1][:, x0] + ax * (coarse[y1][:, x1] - coarse[y1][:, x0])
    up = top + ay * (bot - top)
    out = fine.copy()
    out[hole] = up[hole]
    return out


def relax(img, hole, iters):
    img = img.copy()
    for _ in range(iters):
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        avg = 0.25 * (p[1:-1, :-2] + p[1:-1, 2:] + p[:-2, 1:-1] + p[2:, 1:-1])
        img[hole] = avg[hole]
    return img


def pyramid(img, hole, stop):
    pyr = [(img, hole)]
    while not stop(*pyr[-1]):
        pyr.append(shrink(*pyr[-1]))
    return pyr


def membrane(img, hole):
    pyr = pyramid(img, hole, lambda i, h: hole_extent(h) <= 2 or min(h.shape) < 8)
    cur = onion_fill(*pyr[-1])
    for li in range(len(pyr) - 1, -1, -1):
        if li < len(pyr) - 1:
            cur = upsample_into(cur, pyr[li][0], pyr[li][1])
        cur = relax(cur, pyr[li][1], 30)
    return cur


def dilate(hole, r):
    return cv2.dilate(hole.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0


class Patches:
    """Patch distances for many (target, source) pairs at once: 49 gathers of N pixels, on a border-replicated copy
    so target patches clamp at the edges as in the Rust code (sources are always interior)."""

    def __init__(self, img):
        h, w = img.shape[:2]
        self.w, self.h = w, h
        self.flat = img.reshape(-1, 3)
        self.padded = np.pad(img, ((PR, PR), (PR, PR), (0, 0)), mode="edge").reshape(-1, 3)
        self.pw = w + 2 * PR

    def dist(self, ty, tx, sy, sx):
        d = np.zeros(len(ty), np.float32)
        tbase = ty * self.pw + tx
        sbase = sy * self.w + sx
        for dy in range(-PR, PR + 1):
            for dx in range(-PR, PR + 1):
                a = self.padded[tbase + (dy + PR) * self.pw + (dx + PR)]
                b = self.flat[sbase + dy * self.w + dx]
                d += ((a - b) ** 2).sum(axis=1)
        return d


def patchmatch_pass(img, ok, nnf, colour, rng):
    h, w = ok.shape
    patches = Patches(img)
    ty, tx = np.nonzero((nnf[..., 0] >= 0) & ((np.add.outer(np.arange(h), np.arange(w)) % 2) == colour))
    prev = nnf.copy()
    best = nnf[ty, tx].copy()  # (N, 2) as (x, y)
    best_d = patches.dist(ty, tx, best[:, 1], best[:, 0])

    def try_cand(cx, cy, valid):
        nonlocal best, best_d
        inb = valid & (cx >= 0) & (cy >= 0) & (cx < w) & (cy < h)
        inb[inb] &= ok[cy[inb], cx[inb]]
        inb &= (cx != best[:, 0]) | (cy != best[:, 1])
        idx = np.flatnonzero(inb)
        d = patches.dist(ty[idx], tx[idx], cy[idx], cx[idx])
        better = d < best_d[idx]
        j = idx[better]
        best[j, 0], best[j, 1], best_d[j] = cx[j], cy[j], d[better]

    for ox, oy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nx, ny = tx + ox, ty + oy
        inb = (nx >= 0) & (ny >= 0) & (nx < w) & (ny < h)
        n = np.full((len(tx), 2), -1)
        n[inb] = prev[ny[inb], nx[inb]]
        valid = inb & (n[:, 0] >= 0)
        try_cand(n[:, 0] - ox, n[:, 1] - oy, valid)
    r = max(w, h)
    while r >= 1:
        cx = best[:, 0] + rng.integers(-r, r + 1, len(tx))
        cy = best[:, 1] + rng.integers(-r, r + 1, len(tx))
        try_cand(cx, cy, np.ones(len(tx), bool))
        r //= 2
    nnf[ty, tx] = best


def vote(img, hole, nnf):
    h, w = hole.shape
    ty, tx = np.nonzero(nnf[..., 0] >= 0)
    if len(ty) == 0:
        return img
    s = nnf[ty, tx]
    patches = Patches(img)
    ds = patches.dist(ty, tx, s[:, 1], s[:, 0])
    q = len(ds) * 3 // 4
    sigma2 = max(float(np.partition(ds, q)[q]), 1.0)
    wgt = np.maximum(np.exp(-ds / (2 * sigma2)), 1e-6)
    acc = np.zeros((h * w, 4))
    flat = img.reshape(-1, 3)
    for dy in range(-PR, PR + 1):
        for dx in range(-PR, PR + 1):
            py, px = ty + dy, tx + dx
            m = (py >= 0) & (px >= 0) & (py < h) & (px < w)
            m[m] &= hole[py[m], px[m]]
            dst = py[m] * w + px[m]
            v = flat[(s[m, 1] + dy) * w + s[m, 0] + dx]
            for c in range(3):
                acc[:, c] += np.bincount(dst, wgt[m] * v[:, c], h * w)
            acc[:, 3] += np.bincount(dst, wgt[m], h * w)
    out = img.copy().reshape(-1, 3)
    upd = hole.reshape(-1) & (acc[:, 3] > 0)
    out[upd] = acc[upd, :3] / acc[upd, 3:4]
    return out.reshape(h, w, 3).astype(np.float32)


def init_nnf(hole, ok, coarse, rng):
    h, w = hole.shape
    targets = dilate(hole, PR)
    nnf = np.full((h, w, 2), -1)
    ty, tx = np.nonzero(targets)
    cand = np.full((len(ty), 2), -1)
    if coarse is not None:
        c = coarse[ty // 2, tx // 2]
        cand = np.where(c >= 0, 2 * c + np.stack([tx % 2, ty % 2], 1), -1)
        good = (cand[:, 0] >= 0) & (cand[:, 0] < w) & (cand[:, 1] < h)
        good[good] &= ok[cand[good, 1], cand[good, 0]]
        cand[~good] = -1
    pool = np.flatnonzero(ok)
    miss = cand[:, 0] < 0
    pick = pool[rng.integers(0, len(pool), miss.sum())]
    cand[miss] = np.stack([pick % w, pick // w], 1)
    nnf[ty, tx] = cand
    return nnf


def exemplar(img, hole, rng):
    pyr = pyramid(img, hole, lambda i, h: hole_extent(h) <= 2 * PR or min(h.shape) < 8 * PR)
    coarsest = len(pyr) - 1
    cur = onion_fill(*pyr[-1])
    nnf = None
    for li in range(coarsest, -1, -1):
        lh = pyr[li][1]
        if li < coarsest:
            cur = upsample_into(cur, pyr[li][0], lh)
        h, w = lh.shape
        yy, xx = np.mgrid[0:h, 0:w]
        ok = (xx >= PR) & (yy >= PR) & (xx < w - PR) & (yy < h - PR) & ~dilate(lh, PR)
        if not ok.any():
            continue
        nnf = init_nnf(lh, ok, nnf if li < coarsest else None, rng)
        iters = 8 if li == coarsest else 2 if li == 0 else 4
        for _ in range(iters):
            for colour in (0, 1):
                patchmatch_pass(cur, ok, nnf, colour, rng)
            cur = vote(cur, lh, nnf)
    return cur


def box_mean(p, r):
    k = (2 * r + 1, 2 * r + 1)
    s = cv2.boxFilter(p, -1, k, normalize=False, borderType=cv2.BORDER_CONSTANT)
    n = cv2.boxFilter(np.ones_like(p), -1, k, normalize=False, borderType=cv2.BORDER_CONSTANT)
    return s / n


def lowpass(img):
    r = max(int(round(((12 * LOWPASS_SIGMA ** 2 / 3 + 1) ** 0.5 - 1) / 2)), 1)
    return box_mean(box_mean(box_mean(img, r), r), r)


def inpaint(photo, hole_mask):
    ys, xs = np.nonzero(hole_mask)
    out = photo.copy()
    if len(ys) == 0:
        return out
    h, w = hole_mask.shape
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    margin = int(np.clip(max(x1 - x0, y1 - y0), 24, 256))
    y0, x0, y1, x1 = max(y0 - margin, 0), max(x0 - margin, 0), min(y1 + margin, h), min(x1 + margin, w)
    img = photo[y0:y1, x0:x1].astype(np.float32)
    hole = hole_mask[y0:y1, x0:x1] > 0
    rng = np.random.default_rng(0x9E3779B9)
    smooth = membrane(img, hole)
    filled = exemplar(img, hole, rng)
    d = lowpass(smooth) - lowpass(filled)
    norm = np.sqrt((d ** 2).sum(axis=2, keepdims=True))
    keep = np.where(norm > MAX_CORRECTION, MAX_CORRECTION / np.maximum(norm, 1e-9), 1.0)
    fixed = np.clip(filled + keep * d + 0.5, 0, 255).astype(np.uint8)
    crop = out[y0:y1, x0:x1]
    crop[hole] = fixed[hole]
    return out


def fill(photo, region, strength=1.0):
    """ops::remove::fill: inpaint where region > 0, blend by min(1, 2 * alpha) * strength."""
    filled = inpaint(photo, region > 0).astype(np.float32)
    wgt = (np.minimum(region.astype(np.float32) * 2, 255) * (strength / 255.0))[..., None]
    src = photo.astype(np.float32)
    return np.clip(src + wgt * (filled - src) + 0.5, 0, 255).astype(np.uint8)
