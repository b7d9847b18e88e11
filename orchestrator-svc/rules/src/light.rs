//! The light model the surface edits share. A photographed wall is its surface (albedo) times the light falling on
//! it; recolour and texture replace the surface, tone changes the exposure, and all three keep the light. Light is
//! a pixel's linear luminance relative to the region's *lit level*, so shadows and fall-off are ratios below 1 and
//! stay the same ratios after the edit: a wall painted white keeps its shadows exactly as one painted navy does.
//!
//! **Lit level**: the alpha-weighted median of the brightest quarter of the region's luminance (its 87.5th
//! percentile). People judge a paint by the part of the wall in good light, so that part is what must read as the
//! chip. A median of the top quarter is blind to speculars and small bright patches (anything under ~12 % of the
//! wall) and still lands on the lit part when up to three quarters of the wall are in shadow. The mean, used before,
//! sits in the shadows of a half-shaded wall and gave light paints no room above it. Blind spot: a shaded wall with a
//! sun patch covering more than a quarter of it is exposed for the sun (the patch reads as the paint, the rest
//! darker); the light is still consistent, only anchored differently.
//!
//! **Highlights**: whatever is brighter than the lit level (sheen, a sun patch, a lamp's hot spot) comes out brighter
//! than the paint, and a light paint soon runs out of room below white. [`Shoulder`] rolls luminance off above a knee
//! so the brightest input lands on white and everything between stays graded: no plateau of clipped pixels.

use crate::color::{l_from_y, linear_table};
use crate::mask::Rect;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use std::sync::LazyLock;

/// Steps of the uniform luminance grid: statistics histogram on it, and luminance-indexed rules look a pixel up on
/// it. At 16k steps the coarsest L* spacing (near black, where L* is steepest) is 0.055, far below 8-bit output.
pub const Y_STEPS: usize = 1 << 14;

/// Fixed-point bits of the per-channel grid-index tables.
pub(crate) const FRAC: u32 = 8;

/// Per channel, each 8-bit code's contribution to the grid index in 1/2^FRAC steps: a pixel's index is three loads,
/// two adds and a shift, with no float work at all.
static Y_INDEX: LazyLock<[[u32; 256]; 3]> = LazyLock::new(|| {
    let lin = linear_table();
    std::array::from_fn(|c| std::array::from_fn(|code| (W[c] * lin[code] * GRID) as u32))
});

/// Per channel, the width (in the same units) of the luminance interval one 8-bit code stands for: from halfway to
/// the code below to halfway to the code above.
static Y_BIN: LazyLock<[[u32; 256]; 3]> = LazyLock::new(|| {
    let lin = linear_table();
    let mid = |a: usize, b: usize| 0.5 * (lin[a] + lin[b]);
    std::array::from_fn(|c| {
        std::array::from_fn(|code| {
            let lo = if code == 0 { 0.0 } else { mid(code - 1, code) };
            let hi = if code == 255 {
                1.0
            } else {
                mid(code, code + 1)
            };
            (W[c] * (hi - lo) * GRID) as u32
        })
    })
});

const W: [f32; 3] = [0.212_672_9, 0.715_152_2, 0.072_175];
const GRID: f32 = ((Y_STEPS - 1) << FRAC) as f32;

/// L* at each grid step.
static STEP_L: LazyLock<Vec<f32>> =
    LazyLock::new(|| (0..Y_STEPS).map(|i| l_from_y(step_y(i))).collect());

/// Linear luminance at grid step `i`.
#[inline]
pub fn step_y(i: usize) -> f32 {
    i as f32 / (Y_STEPS - 1) as f32
}

/// L* of every grid step, for building per-step tables from maps defined on lightness.
pub fn step_lightness() -> &'static [f32] {
    &STEP_L
}

/// Grid index of a pixel's luminance.
#[inline]
pub fn y_index(p: [u8; 3]) -> usize {
    grid_index(&Y_INDEX, p)
}

#[inline]
fn grid_index(t: &[[u32; 256]; 3], p: [u8; 3]) -> usize {
    let sum = t[0][p[0] as usize] + t[1][p[1] as usize] + t[2][p[2] as usize];
    (((sum + (1 << (FRAC - 1))) >> FRAC) as usize).min(Y_STEPS - 1)
}

/// The grid-index tables, for inner loops (one lazy-static access per call, not per pixel).
pub struct GridIndex {
    at: &'static [[u32; 256]; 3],
    bin: &'static [[u32; 256]; 3],
}

impl GridIndex {
    pub fn get() -> Self {
        GridIndex {
            at: &Y_INDEX,
            bin: &Y_BIN,
        }
    }

    /// The per-code tables behind `dithered` (grid position, bin width), for vector versions of it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn tables(&self) -> (&'static [[u32; 256]; 3], &'static [[u32; 256]; 3]) {
        (self.at, self.bin)
    }

    #[inline]
    pub fn index(&self, p: [u8; 3]) -> usize {
        grid_index(self.at, p)
    }

    /// The index of a point inside the luminance interval the pixel's codes stand for, picked by a hash of its
    /// position. An 8-bit input is a rounded value; a rule that spreads luminance (a pale paint on a dim wall spreads
    /// it up to ~3x in code terms) would turn each input code into its own output level with unused codes between
    /// them: visible banding on smooth walls. Placing each pixel anywhere in its input bin fills those gaps with a
    /// fine, fixed dither, and where the rule compresses luminance it moves the output by under half a code.
    #[inline]
    pub fn dithered(&self, p: [u8; 3], x: u32, y: u32) -> usize {
        let (r, g, b) = (p[0] as usize, p[1] as usize, p[2] as usize);
        let at = self.at[0][r] + self.at[1][g] + self.at[2][b];
        let bin = self.bin[0][r] + self.bin[1][g] + self.bin[2][b];
        // u in [0, 256): the offset into the bin, centred on the code's own value.
        let u = position_hash(x, y) >> 24;
        let v = at as i64 + (((u as i64 - 128) * bin as i64) >> 8);
        (((v.max(0) as u64 + (1 << (FRAC - 1))) >> FRAC) as usize).min(Y_STEPS - 1)
    }
}

/// A well-mixed 32-bit hash of a pixel position (fixed: the same photo always gets the same dither).
#[inline]
fn position_hash(x: u32, y: u32) -> u32 {
    let [mx, my, m1, m2] = HASH;
    let mut h = x.wrapping_mul(mx) ^ y.wrapping_mul(my);
    h ^= h >> 15;
    h = h.wrapping_mul(m1);
    h ^= h >> 12;
    h.wrapping_mul(m2)
}

/// `position_hash`'s multipliers, for vector versions of it.
pub(crate) const HASH: [u32; 4] = [0x9e37_79b1, 0x85eb_ca77, 0x2c1b_3c6d, 0x297a_2d39];

/// Alpha-weighted histogram of the region's luminance on the grid, from every `stride`-th row and column.
fn histogram(photo: &RgbImage, region: &GrayImage, b: Rect, stride: usize) -> Vec<u64> {
    let w = photo.width() as usize;
    let (x0, x1) = (b.x0 as usize, b.x1 as usize);
    photo
        .as_raw()
        .par_chunks(w * 3)
        .zip(region.as_raw().par_chunks(w))
        .skip(b.y0 as usize)
        .take(b.height() as usize)
        .step_by(stride)
        .fold(
            || vec![0u64; Y_STEPS],
            |mut h, (row, alpha)| {
                for x in (x0..x1).step_by(stride) {
                    let a = alpha[x];
                    if a != 0 {
                        h[y_index([row[x * 3], row[x * 3 + 1], row[x * 3 + 2]])] += a as u64;
                    }
                }
                h
            },
        )
        .reduce(
            || vec![0u64; Y_STEPS],
            |mut h, h2| {
                h.iter_mut().zip(&h2).for_each(|(a, b)| *a += b);
                h
            },
        )
}

/// Share of the region (by alpha) that lies below the lit level: the lit level is the median of the top quarter.
const LIT_QUANTILE: f64 = 0.875;

/// Pixels the lit level's histogram samples at least (up to every pixel of a tiny region): a percentile of ~250k
/// samples moves by far less than the grid's resolution.
const LIT_SAMPLES: f64 = 250_000.0;

/// Every `sample_stride`-th row and column of box `b`: one pixel in four up to ~1 MP boxes, coarser above so that
/// a 12 or 48 MP region is not read 3 or 12 million times for one percentile (~15 ms per rule at 12 MP, measured
/// with bench_kernels' recolour and texture).
fn sample_stride(b: Rect) -> usize {
    let area = f64::from(b.width()) * f64::from(b.height());
    ((area / LIT_SAMPLES).sqrt() as usize).max(2)
}

/// The region's lit level in linear luminance (see the module docs); None for an empty region. Statistics from
/// ~250k or more pixels of the region's box (`sample_stride`).
pub fn lit_level(photo: &RgbImage, region: &GrayImage, b: Rect) -> Option<f32> {
    if b.is_empty() {
        return None;
    }
    let mut hist = histogram(photo, region, b, sample_stride(b));
    if hist.iter().all(|&c| c == 0) {
        hist = histogram(photo, region, b, 1);
    }
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (LIT_QUANTILE * total as f64) as u64;
    let mut acc = 0;
    let i = hist
        .iter()
        .position(|&c| {
            acc += c;
            acc > want
        })
        .unwrap_or(Y_STEPS - 1);
    // A black region has no light to keep: anchor at one grid step so ratios stay finite.
    Some(step_y(i.max(1)))
}

/// Luminance above which highlights are rolled off (L* 91.7): high enough that mid and dark paints never reach it,
/// low enough that a white paint's lit level keeps a visible share of the room above it (L* ~97 of 100).
pub const KNEE: f32 = 0.8;

/// Maps luminance on [0, top] to [0, 1]: the identity below [`KNEE`], then an exponential shoulder that meets it
/// with the same slope (no kink) and reaches exactly 1 at `top`, so the brightest input is the only white. With
/// `top <= 1` nothing needs rolling off and the map is the identity.
#[derive(Clone, Copy, Debug)]
pub struct Shoulder {
    top: f32,
    /// Decay length of the exponential; infinite (None) when the map is the identity.
    c: Option<f32>,
}

impl Shoulder {
    pub fn new(top: f32) -> Self {
        if top.is_nan() || top <= 1.0 {
            return Shoulder { top, c: None };
        }
        // Slope at the knee, (1 - K) / c / (1 - exp(-(top - K) / c)), falls from +inf (c -> 0) to
        // (1 - K) / (top - K) < 1 (c -> inf): bisect (in log c) for slope 1.
        let (room, span) = (1.0 - KNEE as f64, (top - KNEE) as f64);
        let slope = |c: f64| room / c / (1.0 - (-span / c).exp());
        let (mut lo, mut hi) = (1e-6f64.ln(), 1e6f64.ln());
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if slope(mid.exp()) > 1.0 {
                lo = mid
            } else {
                hi = mid
            }
        }
        Shoulder {
            top,
            c: Some((0.5 * (lo + hi)).exp() as f32),
        }
    }

    /// Whether the map is the identity (nothing reaches past white).
    pub fn is_identity(&self) -> bool {
        self.c.is_none()
    }

    #[inline]
    pub fn apply(&self, y: f32) -> f32 {
        match self.c {
            Some(c) if y > KNEE => {
                let norm = 1.0 - (-(self.top - KNEE) / c).exp();
                KNEE + (1.0 - KNEE) * (1.0 - (-(y.min(self.top) - KNEE) / c).exp()) / norm
            }
            _ => y,
        }
    }
}

/// How much of the light above the lit level a finish shows: light ratios s <= 1 (diffuse light and shadow) are the
/// same on any paint; above it, `gain` < 1 (matte) damps sheen and hot spots and > 1 (gloss) lifts them. Applied to
/// log s with a smooth hand-over (slope 1 at s = 1, `gain` once s is ~10 % past it), so the tone curve has no kink.
#[inline]
pub fn finish_light(s: f32, gain: f32) -> f32 {
    if s <= 1.0 || gain == 1.0 {
        return s;
    }
    const HANDOVER: f32 = 0.1;
    let u = s.ln();
    (gain * u + (1.0 - gain) * HANDOVER * (1.0 - (-u / HANDOVER).exp())).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::nonzero_bounds;

    #[test]
    fn shoulder_meets_the_identity_smoothly_and_ends_on_white() {
        for top in [1.05f32, 1.4, 3.0, 50.0] {
            let s = Shoulder::new(top);
            assert!((s.apply(top) - 1.0).abs() < 1e-4, "{top}");
            assert_eq!(s.apply(0.5), 0.5);
            let h = 1e-3;
            let slope = (s.apply(KNEE + h) - s.apply(KNEE)) / h;
            assert!((slope - 1.0).abs() < 0.02, "{top}: slope {slope}");
            // Monotonic and below white everywhere short of the top.
            let mut prev = 0.0;
            for i in 0..=1000 {
                let y = top * i as f32 / 1000.0;
                let v = s.apply(y);
                assert!(v >= prev && v <= 1.0 + 1e-6, "{top}: {y} -> {v}");
                prev = v;
            }
        }
        assert!(Shoulder::new(0.9).is_identity());
        assert_eq!(Shoulder::new(0.9).apply(0.85), 0.85);
    }

    #[test]
    fn finish_only_touches_light_above_the_lit_level() {
        for g in [0.8f32, 1.0, 1.15] {
            assert_eq!(finish_light(0.4, g), 0.4);
            assert!((finish_light(1.0, g) - 1.0).abs() < 1e-6);
            let h = 1e-3;
            assert!(((finish_light(1.0 + h, g) - 1.0) / h - 1.0).abs() < 0.02);
        }
        assert!(finish_light(2.0, 0.8) < 2.0 && finish_light(2.0, 1.15) > 2.0);
    }

    #[test]
    fn lit_level_is_the_median_of_the_brightest_quarter() {
        // Left half in shadow (code 60), right half lit (code 200): the top quarter is lit wall.
        let photo = RgbImage::from_fn(64, 64, |x, _| {
            image::Rgb([if x < 32 { 60 } else { 200 }; 3])
        });
        let region = GrayImage::from_pixel(64, 64, image::Luma([255]));
        let lit = lit_level(&photo, &region, nonzero_bounds(&region)).unwrap();
        let want = linear_table()[200];
        assert!((lit - want).abs() < 1e-3, "{lit} vs {want}");
        let empty = GrayImage::new(64, 64);
        assert!(lit_level(&photo, &empty, nonzero_bounds(&empty)).is_none());
    }

    #[test]
    fn dither_stays_inside_the_codes_bin() {
        let g = GridIndex::get();
        for p in [
            [0u8, 0, 0],
            [17, 200, 255],
            [128, 128, 128],
            [255, 255, 255],
        ] {
            let c = g.index(p);
            let spread: Vec<usize> = (0..64).map(|i| g.dithered(p, i, 3 * i)).collect();
            let (lo, hi) = (*spread.iter().min().unwrap(), *spread.iter().max().unwrap());
            let bin = (0..3).map(|k| Y_BIN[k][p[k] as usize]).sum::<u32>() as usize >> FRAC;
            assert!(
                lo + bin / 2 + 1 >= c && hi <= c + bin / 2 + 1,
                "{p:?}: {lo}..{hi} around {c}"
            );
        }
    }
}
