//! Exemplar-based hole filling: coarse-to-fine patch-based completion (Wexler, Shechtman & Irani 2007) with a
//! PatchMatch nearest-neighbour field (Barnes et al. 2009). It copies real texture from around the hole instead of
//! diffusing colours inward (Telea/Navier-Stokes), so periodic and stochastic textures stay sharp. It cannot invent
//! what was never visible: a large object on a structured background needs a learned model (LaMa-class).

use crate::filter::{Plane, gaussian};
use crate::mask::nonzero_bounds;
use image::{GrayImage, RgbImage};

/// Patch radius: 7x7 patches.
const PR: i32 = 3;

type Px = [f32; 3];

#[derive(Clone)]
struct Level {
    w: i32,
    h: i32,
    img: Vec<Px>,
    hole: Vec<bool>,
}

impl Level {
    fn idx(&self, x: i32, y: i32) -> usize {
        (y * self.w + x) as usize
    }
}

/// Xorshift: deterministic, so the same request gives the same fill.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: i32) -> i32 {
        (self.next() % n.max(1) as u64) as i32
    }
}

/// Fills every pixel where `hole` > 0 from the rest of the photo; other pixels are returned unchanged.
pub fn inpaint(photo: &RgbImage, hole: &GrayImage) -> RgbImage {
    let mut out = photo.clone();
    let b = nonzero_bounds(hole);
    if b.is_empty() {
        return out;
    }
    let (w, h) = photo.dimensions();
    let margin = (b.width().max(b.height())).clamp(24, 256);
    let c = b.grown(margin, w, h);
    let mut lvl = Level {
        w: c.width() as i32,
        h: c.height() as i32,
        img: Vec::new(),
        hole: Vec::new(),
    };
    for y in c.y0..c.y1 {
        for x in c.x0..c.x1 {
            lvl.img.push(photo.get_pixel(x, y).0.map(f32::from));
            lvl.hole.push(hole.get_pixel(x, y)[0] > 0);
        }
    }
    let filled = complete(lvl);
    for y in 0..c.height() {
        for x in 0..c.width() {
            let i = (y * c.width() + x) as usize;
            let p = filled.img[i].map(|v| (v + 0.5).clamp(0.0, 255.0) as u8);
            if filled.hole[i] {
                out.put_pixel(c.x0 + x, c.y0 + y, image::Rgb(p));
            }
        }
    }
    out
}

fn hole_extent(l: &Level) -> i32 {
    let (mut x0, mut y0, mut x1, mut y1) = (l.w, l.h, -1, -1);
    for y in 0..l.h {
        for x in 0..l.w {
            if l.hole[l.idx(x, y)] {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
    }
    (x1 - x0 + 1).max(y1 - y0 + 1).max(0)
}

/// Halves a level: a coarse pixel is a hole if any of its four children is; its colour averages the known ones.
fn shrink(l: &Level) -> Level {
    let (w, h) = ((l.w + 1) / 2, (l.h + 1) / 2);
    let mut out = Level {
        w,
        h,
        img: vec![[0.0; 3]; (w * h) as usize],
        hole: vec![false; (w * h) as usize],
    };
    for y in 0..h {
        for x in 0..w {
            let (mut acc, mut n, mut any_hole) = ([0.0f32; 3], 0.0, false);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let (sx, sy) = ((2 * x + dx).min(l.w - 1), (2 * y + dy).min(l.h - 1));
                let i = l.idx(sx, sy);
                if l.hole[i] {
                    any_hole = true;
                } else {
                    (0..3).for_each(|k| acc[k] += l.img[i][k]);
                    n += 1.0;
                }
            }
            let i = out.idx(x, y);
            out.hole[i] = any_hole;
            if n > 0.0 {
                out.img[i] = acc.map(|v| v / n);
            }
        }
    }
    out
}

/// Exemplar fill, then its low frequencies swapped for a smooth membrane's: copied patches carry their source's
/// brightness, which shows as a lighter or darker block on a wall with a light gradient.
fn complete(fine: Level) -> Level {
    let smooth = membrane(&fine);
    let mut out = exemplar(fine);
    let (gm, ge) = (lowpass(&out, &smooth), lowpass(&out, &out.img));
    for i in 0..out.img.len() {
        if out.hole[i] {
            let d: [f32; 3] = std::array::from_fn(|k| gm[k].data[i] - ge[k].data[i]);
            // Only shading-sized corrections: a large difference means the membrane smeared a real edge (a wall
            // meeting the floor) that the exemplar fill got right, so trust the exemplar there.
            let norm = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
            let keep = if norm > MAX_CORRECTION {
                MAX_CORRECTION / norm
            } else {
                1.0
            };
            out.img[i] = std::array::from_fn(|k| out.img[i][k] + keep * d[k]);
        }
    }
    out
}

/// Gaussian low-pass of each channel of `img` (laid out like `l`).
fn lowpass(l: &Level, img: &[Px]) -> [Plane; 3] {
    std::array::from_fn(|k| {
        let p = Plane {
            w: l.w as usize,
            h: l.h as usize,
            data: img.iter().map(|v| v[k]).collect(),
        };
        gaussian(&p, LOWPASS_SIGMA)
    })
}

const LOWPASS_SIGMA: f32 = 8.0;
/// Largest low-frequency correction applied, in 8-bit codes (RGB distance).
const MAX_CORRECTION: f32 = 12.0;

/// Smooth (membrane) fill: coarse-to-fine, each level seeded from the coarser one and relaxed by Jacobi steps.
fn membrane(fine: &Level) -> Vec<Px> {
    let mut pyr = vec![fine.clone()];
    loop {
        let last = pyr.last().expect("non-empty");
        if hole_extent(last) <= 2 || last.w.min(last.h) < 8 {
            break;
        }
        let next = shrink(last);
        pyr.push(next);
    }
    let coarsest = pyr.len() - 1;
    onion_fill(&mut pyr[coarsest]);
    for li in (0..pyr.len()).rev() {
        if li < coarsest {
            let (f, rest) = pyr[li..].split_at_mut(1);
            upsample_into(&rest[0], &mut f[0]);
        }
        relax(&mut pyr[li], 30);
    }
    pyr.swap_remove(0).img
}

/// Jacobi iterations of Laplace's equation on the hole pixels (known pixels are the boundary condition).
fn relax(l: &mut Level, iters: usize) {
    for _ in 0..iters {
        let prev = l.img.clone();
        for y in 0..l.h {
            for x in 0..l.w {
                let i = l.idx(x, y);
                if !l.hole[i] {
                    continue;
                }
                let n = [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)]
                    .map(|(a, b)| prev[l.idx(a.clamp(0, l.w - 1), b.clamp(0, l.h - 1))]);
                l.img[i] = std::array::from_fn(|k| 0.25 * (n[0][k] + n[1][k] + n[2][k] + n[3][k]));
            }
        }
    }
}

fn exemplar(fine: Level) -> Level {
    let mut pyr = vec![fine];
    loop {
        let last = pyr.last().expect("non-empty");
        if hole_extent(last) <= 2 * PR || last.w.min(last.h) < 8 * PR {
            break;
        }
        let next = shrink(last);
        pyr.push(next);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let coarsest = pyr.len() - 1;
    onion_fill(&mut pyr[coarsest]);
    let mut nnf: Vec<(i32, i32)> = Vec::new();
    for li in (0..pyr.len()).rev() {
        if li < coarsest {
            let (coarse, rest) = pyr[li..].split_at_mut(1);
            upsample_into(&rest[0], &mut coarse[0]);
        }
        let l = &mut pyr[li];
        let src_ok = sources(l);
        if !src_ok.iter().any(|&v| v) {
            continue;
        }
        nnf = init_nnf(l, &src_ok, &nnf, li < coarsest, &mut rng);
        let iters = if li == coarsest { 8 } else { 4 };
        for it in 0..iters {
            patchmatch(l, &src_ok, &mut nnf, it % 2 == 1, &mut rng);
            vote(l, &nnf);
        }
    }
    pyr.swap_remove(0)
}

/// Fills a (small, coarse) hole by peeling: each pass sets boundary hole pixels to the mean of known neighbours.
fn onion_fill(l: &mut Level) {
    let mut known: Vec<bool> = l.hole.iter().map(|h| !h).collect();
    loop {
        let mut changed = Vec::new();
        for y in 0..l.h {
            for x in 0..l.w {
                if known[l.idx(x, y)] {
                    continue;
                }
                let (mut acc, mut n) = ([0.0f32; 3], 0.0);
                for (dx, dy) in [
                    (-1, 0),
                    (1, 0),
                    (0, -1),
                    (0, 1),
                    (-1, -1),
                    (1, 1),
                    (-1, 1),
                    (1, -1),
                ] {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx >= 0 && ny >= 0 && nx < l.w && ny < l.h && known[l.idx(nx, ny)] {
                        (0..3).for_each(|k| acc[k] += l.img[l.idx(nx, ny)][k]);
                        n += 1.0;
                    }
                }
                if n > 0.0 {
                    changed.push((l.idx(x, y), acc.map(|v| v / n)));
                }
            }
        }
        if changed.is_empty() {
            break;
        }
        for (i, v) in changed {
            l.img[i] = v;
            known[i] = true;
        }
    }
}

/// Seeds the finer level's hole from the coarser fill (bilinear), keeping the finer level's known pixels.
fn upsample_into(coarse: &Level, fine: &mut Level) {
    for y in 0..fine.h {
        for x in 0..fine.w {
            let i = fine.idx(x, y);
            if !fine.hole[i] {
                continue;
            }
            let fx = ((x as f32 + 0.5) / 2.0 - 0.5).clamp(0.0, (coarse.w - 1) as f32);
            let fy = ((y as f32 + 0.5) / 2.0 - 0.5).clamp(0.0, (coarse.h - 1) as f32);
            let (x0, y0) = (fx as i32, fy as i32);
            let (x1, y1) = ((x0 + 1).min(coarse.w - 1), (y0 + 1).min(coarse.h - 1));
            let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
            let p = |xx, yy| coarse.img[coarse.idx(xx, yy)];
            fine.img[i] = std::array::from_fn(|k| {
                let top = p(x0, y0)[k] + ax * (p(x1, y0)[k] - p(x0, y0)[k]);
                let bot = p(x0, y1)[k] + ax * (p(x1, y1)[k] - p(x0, y1)[k]);
                top + ay * (bot - top)
            });
        }
    }
}

/// Patch centres whose whole patch is inside the image and outside the hole.
fn sources(l: &Level) -> Vec<bool> {
    let near_hole = dilate(l, PR);
    (0..l.w * l.h)
        .map(|i| {
            let (x, y) = (i % l.w, i / l.w);
            x >= PR && y >= PR && x < l.w - PR && y < l.h - PR && !near_hole[i as usize]
        })
        .collect()
}

/// Pixels within r (Chebyshev) of a hole pixel: the centres of patches that overlap the hole.
fn dilate(l: &Level, r: i32) -> Vec<bool> {
    let mut out = vec![false; (l.w * l.h) as usize];
    for y in 0..l.h {
        for x in 0..l.w {
            if l.hole[l.idx(x, y)] {
                for yy in (y - r).max(0)..=(y + r).min(l.h - 1) {
                    for xx in (x - r).max(0)..=(x + r).min(l.w - 1) {
                        out[l.idx(xx, yy)] = true;
                    }
                }
            }
        }
    }
    out
}

fn random_source(l: &Level, ok: &[bool], rng: &mut Rng) -> (i32, i32) {
    for _ in 0..64 {
        let (x, y) = (rng.below(l.w), rng.below(l.h));
        if ok[l.idx(x, y)] {
            return (x, y);
        }
    }
    let i = ok.iter().position(|&v| v).unwrap_or(0) as i32;
    (i % l.w, i / l.w)
}

/// NNF for every patch that overlaps the hole (others keep (-1, -1)); at finer levels, doubled from the coarse one.
fn init_nnf(
    l: &Level,
    ok: &[bool],
    coarse: &[(i32, i32)],
    from_coarse: bool,
    rng: &mut Rng,
) -> Vec<(i32, i32)> {
    let targets = dilate(l, PR);
    let cw = (l.w + 1) / 2;
    let mut nnf = vec![(-1, -1); (l.w * l.h) as usize];
    for y in 0..l.h {
        for x in 0..l.w {
            let i = l.idx(x, y);
            if !targets[i] {
                continue;
            }
            let mut s = (-1, -1);
            if from_coarse
                && let Some(&(cx, cy)) = coarse.get(((y / 2) * cw + x / 2) as usize)
                && cx >= 0
            {
                let cand = (2 * cx + x % 2, 2 * cy + y % 2);
                if cand.0 < l.w && cand.1 < l.h && ok[l.idx(cand.0, cand.1)] {
                    s = cand;
                }
            }
            nnf[i] = if s.0 >= 0 {
                s
            } else {
                random_source(l, ok, rng)
            };
        }
    }
    nnf
}

/// Sum of squared differences between the patch at t (clamped at the border) and the interior patch at s.
#[inline]
fn dist(l: &Level, t: (i32, i32), s: (i32, i32), best: f32) -> f32 {
    let mut d = 0.0;
    for dy in -PR..=PR {
        let ty = (t.1 + dy).clamp(0, l.h - 1);
        for dx in -PR..=PR {
            let tx = (t.0 + dx).clamp(0, l.w - 1);
            let (a, b) = (l.img[l.idx(tx, ty)], l.img[l.idx(s.0 + dx, s.1 + dy)]);
            d += (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2);
        }
        if d >= best {
            return d;
        }
    }
    d
}

/// One PatchMatch sweep: propagate good offsets from the previous neighbour, then random search in shrinking windows.
fn patchmatch(l: &Level, ok: &[bool], nnf: &mut [(i32, i32)], reverse: bool, rng: &mut Rng) {
    let step: i32 = if reverse { -1 } else { 1 };
    let order: Vec<i32> = if reverse {
        (0..l.w * l.h).rev().collect()
    } else {
        (0..l.w * l.h).collect()
    };
    for i in order {
        let (x, y) = (i % l.w, i / l.w);
        let cur = nnf[i as usize];
        if cur.0 < 0 {
            continue;
        }
        let mut best = cur;
        let mut best_d = dist(l, (x, y), cur, f32::INFINITY);
        let try_cand = |c: (i32, i32), best: &mut (i32, i32), best_d: &mut f32| {
            if c.0 >= 0 && c.1 >= 0 && c.0 < l.w && c.1 < l.h && ok[l.idx(c.0, c.1)] {
                let d = dist(l, (x, y), c, *best_d);
                if d < *best_d {
                    (*best, *best_d) = (c, d);
                }
            }
        };
        for (nx, ny) in [(x - step, y), (x, y - step)] {
            if nx >= 0 && ny >= 0 && nx < l.w && ny < l.h {
                let n = nnf[l.idx(nx, ny)];
                if n.0 >= 0 {
                    try_cand((n.0 + (x - nx), n.1 + (y - ny)), &mut best, &mut best_d);
                }
            }
        }
        let mut r = l.w.max(l.h);
        while r >= 1 {
            let c = (
                best.0 + rng.below(2 * r + 1) - r,
                best.1 + rng.below(2 * r + 1) - r,
            );
            try_cand(c, &mut best, &mut best_d);
            r /= 2;
        }
        nnf[i as usize] = best;
    }
}

/// Re-estimates hole pixels as the weighted mean of what every overlapping patch's match says they should be.
/// Weights favour well-matched patches (Wexler's similarity weight) so good copies win over poor averages.
fn vote(l: &mut Level, nnf: &[(i32, i32)]) {
    let mut ds: Vec<f32> = Vec::new();
    for (i, &s) in nnf.iter().enumerate() {
        if s.0 >= 0 {
            ds.push(dist(l, (i as i32 % l.w, i as i32 / l.w), s, f32::INFINITY));
        }
    }
    if ds.is_empty() {
        return;
    }
    let mut sorted = ds.clone();
    let q = sorted.len() * 3 / 4;
    let sigma2 = sorted.select_nth_unstable_by(q, f32::total_cmp).1.max(1.0);
    let mut acc = vec![[0.0f32; 4]; l.img.len()];
    let mut k = 0;
    for (i, &s) in nnf.iter().enumerate() {
        if s.0 < 0 {
            continue;
        }
        let wgt = (-ds[k] / (2.0 * sigma2)).exp().max(1e-6);
        k += 1;
        let (tx, ty) = (i as i32 % l.w, i as i32 / l.w);
        for dy in -PR..=PR {
            for dx in -PR..=PR {
                let (px, py) = (tx + dx, ty + dy);
                if px < 0 || py < 0 || px >= l.w || py >= l.h || !l.hole[l.idx(px, py)] {
                    continue;
                }
                let v = l.img[l.idx(s.0 + dx, s.1 + dy)];
                let a = &mut acc[l.idx(px, py)];
                (0..3).for_each(|c| a[c] += wgt * v[c]);
                a[3] += wgt;
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        if l.hole[i] && a[3] > 0.0 {
            l.img[i] = [a[0] / a[3], a[1] / a[3], a[2] / a[3]];
        }
    }
}
