//! Exemplar-based hole filling: coarse-to-fine patch-based completion (Wexler, Shechtman & Irani 2007) with a
//! PatchMatch nearest-neighbour field (Barnes et al. 2009), propagated in red-black (checkerboard) passes as GPU
//! PatchMatch does: every pixel of one colour reads only neighbours of the other, so a pass runs on all cores and
//! the result does not depend on the thread count (each pixel's random search is seeded by its position). It copies real texture from around the hole instead of
//! diffusing colours inward (Telea/Navier-Stokes), so periodic and stochastic textures stay sharp. It cannot invent
//! what was never visible: a large object on a structured background needs a learned model (LaMa-class).

use crate::filter::{Plane, gaussian};
use crate::mask::nonzero_bounds;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

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
    /// A generator for one (level, iteration, pass, pixel): splitmix64 of the key, so neighbouring keys give
    /// unrelated streams.
    fn keyed(key: u64) -> Self {
        let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
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

/// Whether `inpaint` has anything to fill `hole` from: a pixel of the photo outside it. A region over the whole
/// photo (a wall that fills the frame, grown) has none.
pub fn has_fill_source(hole: &GrayImage) -> bool {
    hole.as_raw().contains(&0)
}

/// Fills every pixel where `hole` > 0 from the rest of the photo; other pixels are returned unchanged (all of them
/// when there is no rest: `has_fill_source`).
pub fn inpaint(photo: &RgbImage, hole: &GrayImage) -> RgbImage {
    let mut out = photo.clone();
    let b = nonzero_bounds(hole);
    if b.is_empty() || !has_fill_source(hole) {
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

/// Whether a level keeps a pixel outside the hole. A coarser level without one would seed the fill with black (its
/// hole pixels start at 0 and `onion_fill` has nothing to spread): a pyramid stops before it, so its coarsest level
/// always has what the finest had to fill from, if less detail (a hole leaving a rim thinner than the shrink).
fn has_known(l: &Level) -> bool {
    l.hole.iter().any(|&h| !h)
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
        if !has_known(&next) {
            break;
        }
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
    let (w, h) = (l.w, l.h);
    let mut prev = l.img.clone();
    for _ in 0..iters {
        prev.copy_from_slice(&l.img);
        let (prev, hole) = (&prev, &l.hole);
        l.img
            .par_chunks_mut(w as usize)
            .enumerate()
            .for_each(|(y, row)| {
                let y = y as i32;
                for x in 0..w {
                    let i = (y * w + x) as usize;
                    if !hole[i] {
                        continue;
                    }
                    let n = [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)]
                        .map(|(a, b)| prev[(b.clamp(0, h - 1) * w + a.clamp(0, w - 1)) as usize]);
                    row[x as usize] =
                        std::array::from_fn(|k| 0.25 * (n[0][k] + n[1][k] + n[2][k] + n[3][k]));
                }
            });
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
        if !has_known(&next) {
            break;
        }
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
        let iters = if li == coarsest {
            8
        } else if li == 0 {
            2
        } else {
            4
        };
        for it in 0..iters {
            for colour in 0..2 {
                let key = ((li as u64) << 40) | ((it as u64) << 32) | ((colour as u64) << 31);
                patchmatch(l, &src_ok, &mut nnf, colour, key);
            }
            vote(l, &nnf);
        }
    }
    pyr.swap_remove(0)
}

/// Fills a (small, coarse) hole by peeling: each pass sets boundary hole pixels to the mean of known neighbours.
fn onion_fill(l: &mut Level) {
    // Ring by ring, each ring the hole pixels next to the last (the first: next to a known pixel), every pixel of a
    // ring computed before any is marked known. The same values as peeling the whole level pass after pass, in time
    // proportional to the level rather than to its area times the hole's depth (a 65535 x 24 strip's coarsest
    // level is 32768 x 12: ~16k passes over 393k pixels by peeling).
    let mut known: Vec<bool> = l.hole.iter().map(|h| !h).collect();
    let mut queued = known.clone();
    let mut ring = Vec::new();
    for y in 0..l.h {
        for x in 0..l.w {
            let i = l.idx(x, y);
            if !known[i] && neighbours(l, x, y).any(|n| known[n]) {
                queued[i] = true;
                ring.push((x, y));
            }
        }
    }
    while !ring.is_empty() {
        let values: Vec<(usize, Px)> = ring
            .iter()
            .map(|&(x, y)| {
                let (mut acc, mut n) = ([0.0f32; 3], 0.0);
                for j in neighbours(l, x, y).filter(|&j| known[j]) {
                    (0..3).for_each(|k| acc[k] += l.img[j][k]);
                    n += 1.0;
                }
                (l.idx(x, y), acc.map(|v| v / n))
            })
            .collect();
        for (i, v) in values {
            l.img[i] = v;
            known[i] = true;
        }
        let mut next = Vec::new();
        for &(x, y) in &ring {
            for (dx, dy) in NEIGHBOURS {
                let (nx, ny) = (x + dx, y + dy);
                if nx >= 0 && ny >= 0 && nx < l.w && ny < l.h && !queued[l.idx(nx, ny)] {
                    queued[l.idx(nx, ny)] = true;
                    next.push((nx, ny));
                }
            }
        }
        ring = next;
    }
}

/// The 8-neighbourhood, in the order a pixel's neighbours are summed (the order fixes the float sums' bits).
const NEIGHBOURS: [(i32, i32); 8] = [
    (-1, 0),
    (1, 0),
    (0, -1),
    (0, 1),
    (-1, -1),
    (1, 1),
    (-1, 1),
    (1, -1),
];

/// Indices of (x, y)'s neighbours inside the level, in `NEIGHBOURS` order.
fn neighbours(l: &Level, x: i32, y: i32) -> impl Iterator<Item = usize> + '_ {
    NEIGHBOURS.iter().filter_map(move |&(dx, dy)| {
        let (nx, ny) = (x + dx, y + dy);
        (nx >= 0 && ny >= 0 && nx < l.w && ny < l.h).then(|| l.idx(nx, ny))
    })
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

/// A random patch centre from `ok`: a few uniform draws over the level, which nearly always land, then one draw from
/// the list of all of them. The list is built once per level and only when needed: where sources are scarce (the
/// coarse level of a thin strip, a rim around a large hole) a scan of the level for every target was quadratic
/// (a 65535 x 24 photo: 15 s in this step alone), and always answering the first source gave every such target
/// the same start.
fn random_source(l: &Level, ok: &[bool], all: &mut Option<Vec<u32>>, rng: &mut Rng) -> (i32, i32) {
    for _ in 0..64 {
        let (x, y) = (rng.below(l.w), rng.below(l.h));
        if ok[l.idx(x, y)] {
            return (x, y);
        }
    }
    let all = all.get_or_insert_with(|| (0..ok.len() as u32).filter(|&i| ok[i as usize]).collect());
    let i = all
        .get(rng.below(all.len() as i32) as usize)
        .map_or(0, |&i| i as i32);
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
    let mut all_sources = None;
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
                random_source(l, ok, &mut all_sources, rng)
            };
        }
    }
    nnf
}

/// Sum of squared differences between the patch at t (clamped at the border) and the interior patch at s, stopping
/// once it reaches `best`. A patch row is 7 pixels x 3 channels = 21 contiguous floats on both sides, so the common
/// case (target away from the border) is a straight-line loop over two slices.
#[inline]
fn dist(l: &Level, t: (i32, i32), s: (i32, i32), best: f32) -> f32 {
    let flat = l.img.as_flattened();
    let row = (2 * PR + 1) as usize * 3;
    let interior = t.0 >= PR && t.0 < l.w - PR;
    let mut d = 0.0;
    for dy in -PR..=PR {
        let ty = (t.1 + dy).clamp(0, l.h - 1);
        let so = l.idx(s.0 - PR, s.1 + dy) * 3;
        let src = &flat[so..so + row];
        if interior {
            let to = l.idx(t.0 - PR, ty) * 3;
            d += ssd(&flat[to..to + row], src);
        } else {
            for (k, dx) in (-PR..=PR).enumerate() {
                let a = l.img[l.idx((t.0 + dx).clamp(0, l.w - 1), ty)];
                let b = &src[k * 3..k * 3 + 3];
                d += (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2);
            }
        }
        if d >= best {
            return d;
        }
    }
    d
}

/// Sum of squared differences of two equal-length rows, in four independent lanes so it compiles to SIMD (a single
/// running float sum is a dependency chain the compiler may not reorder).
#[inline]
fn ssd(a: &[f32], b: &[f32]) -> f32 {
    let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    let mut acc = [0.0f32; 4];
    for (x, y) in ac.zip(bc) {
        for k in 0..4 {
            let d = x[k] - y[k];
            acc[k] += d * d;
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// One red-black PatchMatch pass over the pixels with (x + y) % 2 == colour: propagate the offsets of the four
/// neighbours (all of the other colour, so not written in this pass), then random search in shrinking windows.
fn patchmatch(l: &Level, ok: &[bool], nnf: &mut [(i32, i32)], colour: i32, key: u64) {
    let prev = nnf.to_vec();
    let w = l.w as usize;
    nnf.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        let y = y as i32;
        for x in ((y + colour) % 2..l.w).step_by(2) {
            let cur = row[x as usize];
            if cur.0 < 0 {
                continue;
            }
            let mut best = cur;
            let mut best_d = dist(l, (x, y), cur, f32::INFINITY);
            let try_cand = |c: (i32, i32), best: &mut (i32, i32), best_d: &mut f32| {
                if c.0 >= 0
                    && c.1 >= 0
                    && c.0 < l.w
                    && c.1 < l.h
                    && ok[l.idx(c.0, c.1)]
                    && c != *best
                {
                    let d = dist(l, (x, y), c, *best_d);
                    if d < *best_d {
                        (*best, *best_d) = (c, d);
                    }
                }
            };
            for (nx, ny) in [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)] {
                if nx >= 0 && ny >= 0 && nx < l.w && ny < l.h {
                    let n = prev[l.idx(nx, ny)];
                    if n.0 >= 0 {
                        try_cand((n.0 + (x - nx), n.1 + (y - ny)), &mut best, &mut best_d);
                    }
                }
            }
            let mut rng = Rng::keyed(key ^ l.idx(x, y) as u64);
            let mut r = l.w.max(l.h);
            while r >= 1 {
                let c = (
                    best.0 + rng.below(2 * r + 1) - r,
                    best.1 + rng.below(2 * r + 1) - r,
                );
                try_cand(c, &mut best, &mut best_d);
                r /= 2;
            }
            row[x as usize] = best;
        }
    });
}

/// Re-estimates hole pixels as the weighted mean of what every overlapping patch's match says they should be.
/// Weights favour well-matched patches (Wexler's similarity weight) so good copies win over poor averages. Written
/// as a gather (each hole pixel visits the patches covering it) so rows run in parallel without write conflicts.
fn vote(l: &mut Level, nnf: &[(i32, i32)]) {
    let w = l.w as usize;
    let ds: Vec<f32> = nnf
        .par_iter()
        .enumerate()
        .map(|(i, &s)| {
            if s.0 >= 0 {
                dist(l, (i as i32 % l.w, i as i32 / l.w), s, f32::INFINITY)
            } else {
                f32::NAN
            }
        })
        .collect();
    let mut valid: Vec<f32> = ds.iter().copied().filter(|d| !d.is_nan()).collect();
    if valid.is_empty() {
        return;
    }
    let q = valid.len() * 3 / 4;
    let sigma2 = valid.select_nth_unstable_by(q, f32::total_cmp).1.max(1.0);
    let wgt: Vec<f32> = ds
        .par_iter()
        .map(|&d| {
            if d.is_nan() {
                0.0
            } else {
                (-d / (2.0 * sigma2)).exp().max(1e-6)
            }
        })
        .collect();
    let lv = &*l;
    let mut next = l.img.clone();
    next.par_chunks_mut(w).enumerate().for_each(|(py, row)| {
        let py = py as i32;
        for px in 0..lv.w {
            if !lv.hole[lv.idx(px, py)] {
                continue;
            }
            let mut a = [0.0f32; 4];
            for dy in -PR..=PR {
                let ty = py - dy;
                if ty < 0 || ty >= lv.h {
                    continue;
                }
                for dx in -PR..=PR {
                    let tx = px - dx;
                    if tx < 0 || tx >= lv.w {
                        continue;
                    }
                    let t = lv.idx(tx, ty);
                    let s = nnf[t];
                    if s.0 < 0 {
                        continue;
                    }
                    let v = lv.img[lv.idx(s.0 + dx, s.1 + dy)];
                    let k = wgt[t];
                    (0..3).for_each(|c| a[c] += k * v[c]);
                    a[3] += k;
                }
            }
            if a[3] > 0.0 {
                row[px as usize] = [a[0] / a[3], a[1] / a[3], a[2] / a[3]];
            }
        }
    });
    l.img = next;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_identical_for_any_thread_count() {
        let room = crate::synth::room(160, 120);
        let run = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| inpaint(&room.photo, &room.sofa))
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one, run(1), "same request, same fill");
        // Only hole pixels change.
        for ((a, b), h) in one
            .pixels()
            .zip(room.photo.pixels())
            .zip(room.sofa.pixels())
        {
            if h[0] == 0 {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn a_hole_with_a_thin_rim_left_is_filled_from_the_rim_not_with_black() {
        // A region over all but a 3 px rim: every coarse level is all hole (a coarse pixel is a hole if any child
        // is), and no 7 x 7 patch is whole at full size. The fill must still take the rim's colour.
        let (w, h, rim) = (160u32, 120u32, 3u32);
        let wall = [150u8, 120, 90];
        let photo = RgbImage::from_fn(w, h, |x, y| {
            let inside = x >= rim && y >= rim && x < w - rim && y < h - rim;
            image::Rgb(if inside { [200, 30, 30] } else { wall })
        });
        let hole = GrayImage::from_fn(w, h, |x, y| {
            let inside = x >= rim && y >= rim && x < w - rim && y < h - rim;
            image::Luma([if inside { 255 } else { 0 }])
        });
        assert!(has_fill_source(&hole));
        let filled = inpaint(&photo, &hole);
        for (x, y) in [(w / 2, h / 2), (10, 10), (w - 10, h - 10)] {
            let p = filled.get_pixel(x, y).0;
            let off = p
                .iter()
                .zip(wall)
                .map(|(&a, b)| a.abs_diff(b))
                .max()
                .unwrap();
            assert!(off <= 12, "({x}, {y}) is {p:?}, the rim is {wall:?}");
        }
    }

    #[test]
    fn scarce_sources_are_drawn_from_all_of_them_not_the_first_each_time() {
        // One patch centre in 4,000 is a source: the uniform draws mostly miss, so most answers come from the list.
        let (w, h) = (4000, 8);
        let l = Level {
            w,
            h,
            img: vec![[0.0; 3]; (w * h) as usize],
            hole: vec![false; (w * h) as usize],
        };
        let ok: Vec<bool> = (0..w * h).map(|i| i % (w + 1) == 7).collect();
        let (mut all, mut rng) = (None, Rng(7));
        let picked: std::collections::BTreeSet<(i32, i32)> = (0..200)
            .map(|_| random_source(&l, &ok, &mut all, &mut rng))
            .collect();
        assert!(picked.iter().all(|&(x, y)| ok[l.idx(x, y)]), "{picked:?}");
        assert_eq!(
            picked.len(),
            ok.iter().filter(|&&v| v).count(),
            "every source drawn: {picked:?}"
        );
        assert_eq!(
            all.map(|a| a.len()),
            Some(8),
            "the list is built once, of the sources"
        );
    }

    #[test]
    fn a_hole_over_the_whole_photo_has_nothing_to_fill_from_and_changes_nothing() {
        let photo = RgbImage::from_pixel(40, 30, image::Rgb([150, 120, 90]));
        let hole = GrayImage::from_pixel(40, 30, image::Luma([1]));
        assert!(!has_fill_source(&hole));
        assert_eq!(inpaint(&photo, &hole), photo);
    }

    /// Peeling pass after pass over the whole level: what `onion_fill` computes ring by ring.
    fn onion_fill_by_passes(l: &mut Level) {
        let mut known: Vec<bool> = l.hole.iter().map(|h| !h).collect();
        loop {
            let mut changed = Vec::new();
            for y in 0..l.h {
                for x in 0..l.w {
                    if known[l.idx(x, y)] {
                        continue;
                    }
                    let (mut acc, mut n) = ([0.0f32; 3], 0.0);
                    for (dx, dy) in NEIGHBOURS {
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

    #[test]
    fn ring_by_ring_fills_the_same_bits_as_peeling_pass_after_pass() {
        let mut rng = Rng(7);
        for (w, h) in [(1, 1), (5, 3), (40, 23), (97, 8), (8, 61)] {
            for holes_in_100 in [30, 80, 97, 100] {
                let mut l = Level {
                    w,
                    h,
                    img: (0..w * h)
                        .map(|_| std::array::from_fn(|_| rng.below(256) as f32))
                        .collect(),
                    hole: (0..w * h).map(|_| rng.below(100) < holes_in_100).collect(),
                };
                // A pixel known in the middle: a hole that spreads out of it in every direction.
                let centre = l.idx(w / 2, h / 2);
                l.hole[centre] = false;
                let mut by_passes = l.clone();
                onion_fill(&mut l);
                onion_fill_by_passes(&mut by_passes);
                let bits = |l: &Level| -> Vec<u32> {
                    l.img.iter().flatten().map(|v| v.to_bits()).collect()
                };
                assert_eq!(
                    bits(&l),
                    bits(&by_passes),
                    "{w}x{h}, {holes_in_100} % holes"
                );
            }
        }
    }

    #[test]
    fn row_ssd_matches_the_plain_sum() {
        let a: Vec<f32> = (0..21).map(|i| (i * 7 % 13) as f32).collect();
        let b: Vec<f32> = (0..21).map(|i| (i * 5 % 11) as f32).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        assert_eq!(ssd(&a, &b), plain);
    }
}
