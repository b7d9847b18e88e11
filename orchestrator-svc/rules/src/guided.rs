//! Colour-guided filter (He, Sun & Tang 2013) in its fast, subsampled form: the linear coefficients are smooth, so
//! they are solved at 1/s resolution and applied at full resolution. It snaps a blurry upsampled mask onto the
//! photo's own edges, including edges between regions of equal brightness but different hue.

use crate::filter::{Plane, downsample};
use crate::grid_rows::GridRows;
use crate::guide_stats::{GuideKey, GuideStats};
use crate::mask::Rect;
use crate::row_kernels::{add_codes, cell_means};
use image::RgbImage;
use rayon::prelude::*;

/// Filters `p` (the mask over `crop`, 0..1) guided by the photo's sRGB values (0..1) in `crop`. `r` is the
/// full-resolution radius. The guide is read straight from the 8-bit photo: at full resolution it is only needed in
/// the last step, fused with the upsampling of the coefficients, so no full-resolution float copies are made.
pub fn guided_filter(photo: &RgbImage, crop: Rect, p: &Plane, r: usize, eps: f32) -> Plane {
    let ps = downsample(p, scale(r));
    let coef = Coefficients::solve(photo, crop, &ps, r, eps);
    let mut out = Plane::new(p.w, p.h);
    out.data.par_chunks_mut(p.w).enumerate().for_each_init(
        || coef.rows(),
        |rows, (y, dst)| rows.apply(photo, crop, y, dst),
    );
    out
}

/// The factor the coefficients are solved at: s = ceil(r/2) (the paper suggests r/4): at ~1 MP (r = 5) r/4 meant
/// s = 1, the full-resolution filter, and 3x the time, for the same edge error on the quality test (0.50-0.54 vs
/// 0.38-0.52 mean |alpha - truth| at 1, 0.76 and 3 MP; tests/quality.rs). Rounding up rather than down changes odd
/// radii only (s 2 -> 3 at ~1 MP): the solve's grid is then the same size as at 12 MP, which took ~20 ms off a 1 MP
/// photo (three regions) for an edge error of 0.54 -> 0.55 at 1 MP. Callers that can build the mask at this scale
/// directly (`region`) skip its full-resolution plane.
pub fn scale(r: usize) -> usize {
    r.div_ceil(2).max(1)
}

/// The filter's linear coefficients (a . I + b), smoothed, at 1/s resolution: what `CoefficientRows` upsamples.
pub struct Coefficients {
    pub(crate) cp: Vec<Plane>,
    pub(crate) s: usize,
    /// Horizontal taps of the crop's columns.
    pub(crate) xs: ColumnTaps,
}

/// The crop's columns' horizontal taps on the 1/s grid. For the portable loop they are grouped: the columns between
/// the same two grid samples (about s of them) form a span, so interpolating a grid row costs two loads per span
/// and a contiguous loop over its columns' weights, which vectorises (two indexed loads per column did not, and took
/// as long as the apply step); the AVX2 path reads each column's samples and permutes them in registers.
pub(crate) struct ColumnTaps {
    /// (grid sample, next grid sample, first column, end column).
    spans: Vec<(usize, usize, usize, usize)>,
    /// Each column's weight of the next sample.
    weights: Vec<f32>,
    /// Each column's two grid samples, for the AVX2 path (which takes 8 columns at a time however short the spans).
    samples: Vec<[u32; 2]>,
}

impl ColumnTaps {
    /// Taps for `width` columns on a grid of `n` samples downsampled by `s` (`coord`).
    pub(crate) fn new(width: usize, s: usize, n: usize) -> Self {
        let mut spans: Vec<(usize, usize, usize, usize)> = Vec::new();
        let mut weights = Vec::with_capacity(width);
        let mut samples = Vec::with_capacity(width);
        for x in 0..width {
            let (i, i1, wx) = coord(x, s, n);
            samples.push([i as u32, i1 as u32]);
            match spans.last_mut() {
                Some((a, b, _, end)) if (*a, *b) == (i, i1) => *end = x + 1,
                _ => spans.push((i, i1, x, x + 1)),
            }
            weights.push(wx);
        }
        ColumnTaps {
            spans,
            weights,
            samples,
        }
    }

    fn len(&self) -> usize {
        self.weights.len()
    }
}

impl Coefficients {
    /// Solves them from `ps`, the mask over `crop` area-averaged by `scale(r)` (`filter::downsample`).
    pub fn solve(photo: &RgbImage, crop: Rect, ps: &Plane, r: usize, eps: f32) -> Self {
        Self::solve_at(photo, crop, ps, r, scale(r), eps)
    }

    /// `solve` at factor `s` instead of `scale(r)` (`ps` area-averaged by `s`). The photo's half of the work is
    /// `GuideStats`: regions of one photo over the same crop share it (`Coefficients::solve_with`).
    pub fn solve_at(
        photo: &RgbImage,
        crop: Rect,
        ps: &Plane,
        r: usize,
        s: usize,
        eps: f32,
    ) -> Self {
        Self::solve_with(&GuideStats::new(photo, GuideKey::new(crop, r, s, eps)), ps)
    }

    /// Applies the filter a row at a time (`CoefficientRows::apply`); rows are cheapest taken in increasing order.
    pub fn rows(&self) -> CoefficientRows<'_> {
        CoefficientRows {
            coef: self,
            rows: GridRows::new(4 * self.xs.len()),
        }
    }

    /// Row j of the 1/s grid's four coefficients, interpolated at every column of the crop: the four rows one
    /// after the other in `out` (planar, so that the apply step loads 8 columns of one coefficient at once).
    fn horizontal(&self, j: usize, out: &mut [f32]) {
        let w = self.cp[0].w;
        let planes: [&[f32]; 4] = std::array::from_fn(|k| &self.cp[k].data[j * w..(j + 1) * w]);
        let taps = &self.xs;
        #[cfg(target_arch = "x86_64")]
        if crate::simd::active() == crate::simd::Level::Avx2Fma {
            // SAFETY: `active` is at most `detected`, which found AVX2 and FMA on this CPU.
            #[allow(unsafe_code)]
            unsafe {
                avx2::interpolate_planes(out, planes, &taps.samples, &taps.weights)
            };
            return;
        }
        interpolate_row(out, planes, &taps.spans, &taps.weights);
    }
}

/// The filter's output q = a . I + b a row at a time, with a and b bilinearly upsampled (half-pixel centres) on the
/// fly. Each row of the 1/s coefficient grid is interpolated across the crop once and kept while output rows fall
/// between it and the next (s = 10 rows at 12 MP), so a pixel costs one vertical blend of each coefficient instead
/// of four gathers and eight blends (it used to interpolate vertically on the grid, then horizontally per pixel:
/// the same bilinear weights, so values equal to float rounding).
pub struct CoefficientRows<'c> {
    coef: &'c Coefficients,
    /// The grid rows above and below the current output row, their four coefficients at every column of the crop
    /// (planar: a_r for every column, then a_g, a_b, b).
    rows: GridRows<f32>,
}

impl CoefficientRows<'_> {
    /// Row y of the crop into `dst` (the crop's width).
    pub fn apply(&mut self, photo: &RgbImage, crop: Rect, y: usize, dst: &mut [f32]) {
        let coef = self.coef;
        let (j, j1, wy) = coord(y, coef.s, coef.cp[0].h);
        let (top, bot) = self
            .rows
            .around(j, j1, |row, line| coef.horizontal(row, line));
        let stride = photo.width() as usize * 3;
        let start = (crop.y0 as usize + y) * stride + crop.x0 as usize * 3;
        let src = &photo.as_raw()[start..start + dst.len() * 3];
        apply_row(dst, top, bot, wy, src);
    }
}

crate::simd::kernel! {
    /// `Coefficients::horizontal`'s loop: each of the four planes' row interpolated at the columns' taps
    /// (`ColumnTaps`), into its quarter of `out`.
    fn interpolate_row(
        out: &mut [f32],
        planes: [&[f32]; 4],
        spans: &[(usize, usize, usize, usize)],
        weights: &[f32],
    ) {
        for (o, p) in out.chunks_exact_mut(weights.len()).zip(planes) {
            for &(i, i1, x0, x1) in spans {
                let (a, b) = (p[i], p[i1]);
                for (d, &wx) in o[x0..x1].iter_mut().zip(&weights[x0..x1]) {
                    *d = a + wx * (b - a);
                }
            }
        }
    }
}

/// `CoefficientRows::apply`'s loop: the coefficients blended between the grid rows `top` and `bot` (planar, four
/// rows of `dst.len()`) by `wy`, applied to the photo's pixels `src` (RGB) and clamped to 0..1. The AVX2 path does 8
/// pixels a step with the same float operations in the same order (no FMA), so it gives the same values; the rest
/// (all of them below AVX2) go one at a time. The scalar loop did not vectorise: its RGB reads are 3 bytes apart.
fn apply_row(dst: &mut [f32], top: &[f32], bot: &[f32], wy: f32, src: &[u8]) {
    let n = dst.len();
    assert!(top.len() == 4 * n && bot.len() == 4 * n && src.len() == 3 * n);
    #[cfg(target_arch = "x86_64")]
    let done = if crate::simd::active() == crate::simd::Level::Avx2Fma {
        // SAFETY: `active` is at most `detected`, which found AVX2 and FMA on this CPU.
        #[allow(unsafe_code)]
        unsafe {
            avx2::apply_row(dst, top, bot, wy, src)
        }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for x in done..n {
        let c: [f32; 4] = std::array::from_fn(|k| {
            let (t, b) = (top[k * n + x], bot[k * n + x]);
            t + wy * (b - t)
        });
        let g = |k: usize| src[3 * x + k] as f32 * (1.0 / 255.0);
        dst[x] = (c[0] * g(0) + c[1] * g(1) + c[2] * g(2) + c[3]).clamp(0.0, 1.0);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::apply_row`] on whole groups of 8 pixels; returns how many pixels it did.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn apply_row(
        dst: &mut [f32],
        top: &[f32],
        bot: &[f32],
        wy: f32,
        src: &[u8],
    ) -> usize {
        let n = dst.len();
        let done = n / 8 * 8;
        assert!(top.len() == 4 * n && bot.len() == 4 * n && src.len() == 3 * n);
        let (wy, inv, zero, one) = (
            _mm256_set1_ps(wy),
            _mm256_set1_ps(1.0 / 255.0),
            _mm256_setzero_ps(),
            _mm256_set1_ps(1.0),
        );
        for x in (0..done).step_by(8) {
            let rgb = crate::simd::load_rgb8!(src[3 * x..3 * x + 24].as_ptr());
            let mut g = [zero; 3];
            for k in 0..3 {
                g[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(rgb[k]), inv);
            }
            let mut c = [zero; 4];
            for (k, c) in c.iter_mut().enumerate() {
                let at = k * n + x;
                // SAFETY: at + 8 <= 4n, the rows' length (asserted above).
                let (t, b) = unsafe {
                    (
                        _mm256_loadu_ps(top.as_ptr().add(at)),
                        _mm256_loadu_ps(bot.as_ptr().add(at)),
                    )
                };
                *c = _mm256_add_ps(t, _mm256_mul_ps(wy, _mm256_sub_ps(b, t)));
            }
            let q = _mm256_add_ps(
                _mm256_add_ps(
                    _mm256_add_ps(_mm256_mul_ps(c[0], g[0]), _mm256_mul_ps(c[1], g[1])),
                    _mm256_mul_ps(c[2], g[2]),
                ),
                c[3],
            );
            let q = _mm256_min_ps(_mm256_max_ps(q, zero), one);
            // SAFETY: x + 8 <= done <= n, dst's length.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(x), q) };
        }
        done
    }

    /// `Coefficients::horizontal`: each plane's row interpolated at every column's two `samples` by its weight,
    /// into its quarter of `out`, 8 columns a step wherever their samples lie within 8 consecutive ones (any scale
    /// s >= 2): one load of those 8 and two in-register permutes instead of 16 indexed loads, or the span loop's
    /// overhead at small s (3 columns per span at 1 MP). The same float operations as the span loop, so the same
    /// values; groups that do not fit (s = 1, the row's end) go a column at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn interpolate_planes(
        out: &mut [f32],
        planes: [&[f32]; 4],
        samples: &[[u32; 2]],
        weights: &[f32],
    ) {
        let n = weights.len();
        let len = planes[0].len();
        assert!(samples.len() == n && out.len() == 4 * n && planes.iter().all(|p| p.len() == len));
        let mut x = 0;
        while x < n {
            let base = samples[x][0] as usize;
            if x + 8 <= n && base + 8 <= len && (samples[x + 7][1] as usize) < base + 8 {
                let (mut lo, mut hi) = ([0i32; 8], [0i32; 8]);
                for k in 0..8 {
                    lo[k] = (samples[x + k][0] as usize - base) as i32;
                    hi[k] = (samples[x + k][1] as usize - base) as i32;
                }
                // SAFETY: `lo` and `hi` are 8 i32s each; x + 8 <= n, the weights' length.
                let (lo, hi, w) = unsafe {
                    (
                        _mm256_loadu_si256(lo.as_ptr() as *const __m256i),
                        _mm256_loadu_si256(hi.as_ptr() as *const __m256i),
                        _mm256_loadu_ps(weights.as_ptr().add(x)),
                    )
                };
                for (k, p) in planes.iter().enumerate() {
                    // SAFETY: base + 8 <= len, each plane's length; k n + x + 8 <= 4n, out's length.
                    unsafe {
                        let v = _mm256_loadu_ps(p.as_ptr().add(base));
                        let a = _mm256_permutevar8x32_ps(v, lo);
                        let b = _mm256_permutevar8x32_ps(v, hi);
                        let q = _mm256_add_ps(a, _mm256_mul_ps(w, _mm256_sub_ps(b, a)));
                        _mm256_storeu_ps(out.as_mut_ptr().add(k * n + x), q);
                    }
                }
                x += 8;
            } else {
                let [i, i1] = samples[x];
                for (k, p) in planes.iter().enumerate() {
                    let (a, b) = (p[i as usize], p[i1 as usize]);
                    out[k * n + x] = a + weights[x] * (b - a);
                }
                x += 1;
            }
        }
    }
}

/// Full-resolution index i on a grid downsampled by s with n samples: (sample, next sample, weight).
pub(crate) fn coord(i: usize, s: usize, n: usize) -> (usize, usize, f32) {
    let f = ((i as f32 + 0.5) / s as f32 - 0.5).clamp(0.0, (n - 1) as f32);
    let k = f.floor() as usize;
    (k, (k + 1).min(n - 1), f - k as f32)
}

/// The crop's sRGB planes (0..1), area-averaged by s, read directly from the 8-bit photo. Each band of s rows is
/// first summed column by column (a byte row added to u16 sums: it vectorises), then each cell's s columns: the
/// same integer sums as adding up each cell's pixels, in about half the time at 12 MP (perf). Written straight
/// into the three planes' rows (gathering rows of RGB triples into planes afterwards was 1.5 % of a 1 MP photo).
pub(crate) fn guide_small(photo: &RgbImage, crop: Rect, s: usize) -> Vec<Plane> {
    let (cw, ch) = (crop.width() as usize, crop.height() as usize);
    let (w, h) = (cw.div_ceil(s), ch.div_ceil(s));
    // A column's sum of s codes fits u16 (`refine_radius` keeps s at 21 or less).
    assert!(s * 255 <= u16::MAX as usize, "guide scale {s}");
    let stride = photo.width() as usize * 3;
    let raw = photo.as_raw();
    let mut planes: [Plane; 3] = std::array::from_fn(|_| Plane::new(w, h));
    let [r, g, b] = &mut planes;
    r.data
        .par_chunks_mut(w)
        .zip(g.data.par_chunks_mut(w))
        .zip(b.data.par_chunks_mut(w))
        .enumerate()
        .for_each_init(
            || (vec![0u16; cw * 3], Vec::new()),
            |(columns, window), (y, ((r, g), b))| {
                let (y0, y1) = (y * s, ((y + 1) * s).min(ch));
                columns.fill(0);
                for yy in y0..y1 {
                    let base = (crop.y0 as usize + yy) * stride + (crop.x0 as usize) * 3;
                    add_codes(columns, &raw[base..base + cw * 3]);
                }
                cell_means(columns, s, y1 - y0, window, [r, g, b]);
            },
        );
    planes.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snaps_a_blurred_mask_to_the_photo_edge() {
        // Photo: red left half, blue right half. Mask: a blurry ramp across the edge.
        let (w, h) = (64usize, 32usize);
        let photo = RgbImage::from_fn(w as u32, h as u32, |x, _| {
            image::Rgb(if x < 32 { [204, 51, 25] } else { [25, 51, 204] })
        });
        let p = Plane {
            w,
            h,
            data: (0..w * h)
                .map(|k| (1.0 - ((k % w) as f32 - 24.0) / 16.0).clamp(0.0, 1.0))
                .collect(),
        };
        let crop = Rect {
            x0: 0,
            y0: 0,
            x1: w as u32,
            y1: h as u32,
        };
        let q = guided_filter(&photo, crop, &p, 6, 1e-3);
        // The blurry ramp (1/16 per pixel) becomes a step at the colour edge, and values move away from 0.5 on
        // either side of it.
        let step = q.at(31, 16) - q.at(32, 16);
        assert!(step > 0.3, "step {step}");
        assert!(q.at(28, 16) > p.at(28, 16) + 0.04 && q.at(36, 16) < p.at(36, 16) - 0.04);
    }
}
