//! Separable O(1)-per-pixel filters on f32 planes: box mean, Gaussian (three boxes), max/min, and integer-factor
//! down/upsampling. Rows run in parallel; the vertical pass works on bands of rows so it parallelises too.

use rayon::prelude::*;

/// A single-channel f32 image, row-major.
#[derive(Clone, Debug)]
pub struct Plane {
    pub w: usize,
    pub h: usize,
    pub data: Vec<f32>,
}

impl Plane {
    pub fn new(w: usize, h: usize) -> Plane {
        Plane {
            w,
            h,
            data: vec![0.0; w * h],
        }
    }
    #[inline]
    pub fn at(&self, x: usize, y: usize) -> f32 {
        self.data[y * self.w + x]
    }
}

const BAND: usize = 64;

/// Mean over the (2r+1)^2 window clipped to the image (edge windows divide by their true pixel count).
pub fn box_mean(src: &Plane, r: usize) -> Plane {
    if r == 0 {
        return src.clone();
    }
    let (w, h) = (src.w, src.h);
    let mut tmp = vec![0.0f32; w * h];
    tmp.par_chunks_mut(w)
        .zip(src.data.par_chunks(w))
        .for_each(|(dst, row)| box_row(row, dst, r));
    vertical_pass(&tmp, w, h, r)
}

/// box_mean(a * b) without materialising the product plane (the guided filter takes ten of these per call).
pub fn box_mean_product(a: &Plane, b: &Plane, r: usize) -> Plane {
    let (w, h) = (a.w, a.h);
    debug_assert_eq!((b.w, b.h), (w, h));
    let mut tmp = vec![0.0f32; w * h];
    tmp.par_chunks_mut(w)
        .zip(a.data.par_chunks(w).zip(b.data.par_chunks(w)))
        .for_each_init(
            || vec![0.0f32; w],
            |prod, (dst, (ra, rb))| {
                multiply(prod, ra, rb);
                if r == 0 {
                    dst.copy_from_slice(prod);
                } else {
                    box_row(prod, dst, r);
                }
            },
        );
    if r == 0 {
        return Plane { w, h, data: tmp };
    }
    vertical_pass(&tmp, w, h, r)
}

/// The vertical half of a box mean, over the horizontal pass's output, in bands of rows run in parallel.
fn vertical_pass(tmp: &[f32], w: usize, h: usize, r: usize) -> Plane {
    let mut out = Plane::new(w, h);
    out.data
        .par_chunks_mut(w * BAND)
        .enumerate()
        .for_each(|(band, dst)| {
            let y0 = band * BAND;
            let rows = dst.len() / w;
            let mut acc = vec![0.0f32; w];
            // Invariant before row y: acc holds rows y-r-1 ..= y+r-1 (clipped), so the loop's add/subtract stay paired.
            for yy in y0.saturating_sub(r + 1)..(y0 + r).min(h) {
                add_row(&mut acc, &tmp[yy * w..(yy + 1) * w], 1.0);
            }
            for i in 0..rows {
                let y = y0 + i;
                if y + r < h {
                    add_row(&mut acc, &tmp[(y + r) * w..(y + r + 1) * w], 1.0);
                }
                if y > r {
                    add_row(&mut acc, &tmp[(y - r - 1) * w..(y - r) * w], -1.0);
                }
                let inv = 1.0 / ((y + r).min(h - 1) + 1 - y.saturating_sub(r)) as f32;
                scale_row(&mut dst[i * w..(i + 1) * w], &acc, inv);
            }
        });
    out
}

/// One row of the horizontal pass. Split into the two edges, where the window is clipped and divides by its true
/// count, and the interior, where it is a running sum times one constant: no branches or divisions per pixel there.
fn box_row(row: &[f32], dst: &mut [f32], r: usize) {
    let w = row.len();
    let mut acc: f32 = row[..r.min(w)].iter().sum();
    // Invariant before pixel x: acc = sum of row[x-r-1+1 ..= x+r-1], clipped.
    let edge = |x: usize, acc: &mut f32| {
        if x + r < w {
            *acc += row[x + r];
        }
        if x > r {
            *acc -= row[x - r - 1];
        }
        let n = (x + r).min(w - 1) + 1 - x.saturating_sub(r);
        *acc / n as f32
    };
    let (lo, hi) = ((r + 1).min(w), w.saturating_sub(r).max((r + 1).min(w)));
    for (x, d) in dst.iter_mut().enumerate().take(lo) {
        *d = edge(x, &mut acc);
    }
    let inv = 1.0 / (2 * r + 1) as f32;
    for (x, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
        acc += row[x + r] - row[x - r - 1];
        *d = acc * inv;
    }
    for (x, d) in dst.iter_mut().enumerate().skip(hi) {
        *d = edge(x, &mut acc);
    }
}

crate::simd::kernel! {
    fn add_row(acc: &mut [f32], row: &[f32], s: f32) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += s * v;
        }
    }
}

crate::simd::kernel! {
    fn scale_row(dst: &mut [f32], src: &[f32], k: f32) {
        for (d, a) in dst.iter_mut().zip(src) {
            *d = a * k;
        }
    }
}

crate::simd::kernel! {
    fn multiply(dst: &mut [f32], a: &[f32], b: &[f32]) {
        for ((p, x), y) in dst.iter_mut().zip(a).zip(b) {
            *p = x * y;
        }
    }
}

/// Gaussian blur approximated by three box means (within ~3 % of a true Gaussian); below sigma 0.8 three boxes
/// of radius 1 would already blur to sigma 1.4, so small sigmas use a 3-tap kernel of the same variance.
pub fn gaussian(src: &Plane, sigma: f32) -> Plane {
    match three_tap_weight(sigma) {
        Some(0.0) => return src.clone(),
        Some(wt) => return three_tap(src, wt),
        None => {}
    }
    let r = (((12.0 * sigma * sigma / 3.0 + 1.0).sqrt() - 1.0) / 2.0)
        .round()
        .max(1.0) as usize;
    box_mean(&box_mean(&box_mean(src, r), r), r)
}

/// The weight w of the 3-tap kernel `gaussian` uses for `sigma` (0 where it blurs nothing); None where it uses three
/// boxes instead. Lets a caller fuse the blur into its own passes (`region`) with the same numbers.
pub fn three_tap_weight(sigma: f32) -> Option<f32> {
    if sigma < 0.3 {
        Some(0.0)
    } else if sigma < 0.8 {
        Some(0.5 * sigma * sigma)
    } else {
        None
    }
}

/// Separable [w, 1 - 2w, w] blur (variance 2w per axis), edges clamped.
fn three_tap(src: &Plane, wt: f32) -> Plane {
    let (w, h) = (src.w, src.h);
    let mut tmp = vec![0.0f32; w * h];
    tmp.par_chunks_mut(w)
        .zip(src.data.par_chunks(w))
        .for_each(|(d, r)| three_tap_row(r, d, wt));
    let mut out = Plane::new(w, h);
    out.data.par_chunks_mut(w).enumerate().for_each(|(y, d)| {
        let (up, dn) = (y.saturating_sub(1), (y + 1).min(h - 1));
        let row = |k: usize| &tmp[k * w..(k + 1) * w];
        three_tap_column(row(up), row(y), row(dn), d, wt);
    });
    out
}

crate::simd::kernel! {
    /// The horizontal pass of `three_tap` on one row.
    pub fn three_tap_row(r: &[f32], d: &mut [f32], wt: f32) {
        let (w, c) = (r.len(), 1.0 - 2.0 * wt);
        let tap = |x: usize| c * r[x] + wt * (r[x.saturating_sub(1)] + r[(x + 1).min(w - 1)]);
        if w < 3 {
            (0..w).for_each(|x| d[x] = tap(x));
            return;
        }
        (d[0], d[w - 1]) = (tap(0), tap(w - 1));
        // The interior as three shifted slices, the same sums: clamped indices kept it from vectorising.
        for (((d, l), m), rt) in d[1..w - 1].iter_mut().zip(r).zip(&r[1..]).zip(&r[2..]) {
            *d = c * m + wt * (l + rt);
        }
    }
}

crate::simd::kernel! {
    /// The vertical pass of `three_tap` for one row, from the horizontal pass's rows above, at and below it.
    pub fn three_tap_column(up: &[f32], mid: &[f32], dn: &[f32], d: &mut [f32], wt: f32) {
        let c = 1.0 - 2.0 * wt;
        for (x, d) in d.iter_mut().enumerate() {
            *d = c * mid[x] + wt * (up[x] + dn[x]);
        }
    }
}

/// Max (grow) or min (shrink) over a square window of radius r; soft values stay soft.
pub fn morph(src: &Plane, r: usize, max: bool) -> Plane {
    if r == 0 {
        return src.clone();
    }
    let pick = move |a: f32, b: f32| if max { a.max(b) } else { a.min(b) };
    let (w, h) = (src.w, src.h);
    let mut tmp = vec![0.0f32; w * h];
    tmp.par_chunks_mut(w)
        .zip(src.data.par_chunks(w))
        .for_each(|(dst, row)| {
            for (x, d) in dst.iter_mut().enumerate() {
                let lo = x.saturating_sub(r);
                let hi = (x + r).min(w - 1);
                *d = row[lo..=hi].iter().copied().reduce(pick).unwrap_or(0.0);
            }
        });
    let mut out = Plane::new(w, h);
    out.data.par_chunks_mut(w).enumerate().for_each(|(y, dst)| {
        let lo = y.saturating_sub(r);
        let hi = (y + r).min(h - 1);
        dst.copy_from_slice(&tmp[lo * w..(lo + 1) * w]);
        for yy in lo + 1..=hi {
            for (d, v) in dst.iter_mut().zip(&tmp[yy * w..(yy + 1) * w]) {
                *d = pick(*d, *v);
            }
        }
    });
    out
}

/// Area-average downsample by an integer factor (partial blocks at the edge average what they have).
pub fn downsample(src: &Plane, s: usize) -> Plane {
    if s <= 1 {
        return src.clone();
    }
    let (w, h) = (src.w.div_ceil(s), src.h.div_ceil(s));
    let mut out = Plane::new(w, h);
    out.data.par_chunks_mut(w).enumerate().for_each(|(y, dst)| {
        let (y0, y1) = (y * s, ((y + 1) * s).min(src.h));
        for (x, d) in dst.iter_mut().enumerate() {
            let (x0, x1) = (x * s, ((x + 1) * s).min(src.w));
            let mut acc = 0.0;
            for yy in y0..y1 {
                acc += src.data[yy * src.w + x0..yy * src.w + x1]
                    .iter()
                    .sum::<f32>();
            }
            *d = acc / ((y1 - y0) * (x1 - x0)) as f32;
        }
    });
    out
}

/// Bilinear upsample (half-pixel centres) of a plane made by `downsample(_, s)` back to w x h.
pub fn upsample(src: &Plane, s: usize, w: usize, h: usize) -> Plane {
    if s <= 1 {
        return src.clone();
    }
    let coord = |i: usize, n: usize| {
        let f = ((i as f32 + 0.5) / s as f32 - 0.5).clamp(0.0, (n - 1) as f32);
        let k = f.floor() as usize;
        (k, (k + 1).min(n - 1), f - k as f32)
    };
    let xs: Vec<_> = (0..w).map(|x| coord(x, src.w)).collect();
    let mut out = Plane::new(w, h);
    out.data.par_chunks_mut(w).enumerate().for_each(|(y, dst)| {
        let (j, j1, wy) = coord(y, src.h);
        let (r0, r1) = (&src.data[j * src.w..], &src.data[j1 * src.w..]);
        for (d, &(i, i1, wx)) in dst.iter_mut().zip(&xs) {
            let top = r0[i] + wx * (r0[i1] - r0[i]);
            let bot = r1[i] + wx * (r1[i1] - r1[i]);
            *d = top + wy * (bot - top);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_box(p: &Plane, r: usize) -> Plane {
        let mut o = Plane::new(p.w, p.h);
        for y in 0..p.h {
            for x in 0..p.w {
                let (mut s, mut n) = (0.0, 0);
                for yy in y.saturating_sub(r)..=(y + r).min(p.h - 1) {
                    for xx in x.saturating_sub(r)..=(x + r).min(p.w - 1) {
                        s += p.at(xx, yy);
                        n += 1;
                    }
                }
                o.data[y * p.w + x] = s / n as f32;
            }
        }
        o
    }

    #[test]
    fn box_mean_matches_naive_across_bands() {
        let mut p = Plane::new(37, 150);
        for (i, v) in p.data.iter_mut().enumerate() {
            *v = ((i * 7919) % 101) as f32 / 100.0;
        }
        for r in [1, 3, 40] {
            let (a, b) = (box_mean(&p, r), naive_box(&p, r));
            let err = a
                .data
                .iter()
                .zip(&b.data)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-4, "r={r} err={err}");
        }
    }

    #[test]
    fn box_mean_of_a_product_equals_box_mean_of_the_product_plane() {
        let (w, h) = (41, 70);
        let a = Plane {
            w,
            h,
            data: (0..w * h).map(|i| ((i * 31) % 17) as f32 / 16.0).collect(),
        };
        let b = Plane {
            w,
            h,
            data: (0..w * h).map(|i| ((i * 13) % 23) as f32 / 22.0).collect(),
        };
        let prod = Plane {
            w,
            h,
            data: a.data.iter().zip(&b.data).map(|(x, y)| x * y).collect(),
        };
        for r in [0, 1, 4, 50] {
            let (got, want) = (box_mean_product(&a, &b, r), box_mean(&prod, r));
            assert_eq!(got.data, want.data, "r={r}");
        }
    }

    #[test]
    fn morph_grows_and_shrinks() {
        let mut p = Plane::new(9, 9);
        p.data[4 * 9 + 4] = 1.0;
        let g = morph(&p, 2, true);
        assert_eq!(g.at(2, 2), 1.0);
        assert_eq!(g.at(1, 4), 0.0);
        assert_eq!(morph(&g, 2, false).data, p.data);
    }
}
