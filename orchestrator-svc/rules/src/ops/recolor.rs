//! Paint a surface: move its lightness to the paint's while keeping local shading (a mask-restricted Reinhard
//! transfer on L*), take hue and chroma from the paint, and gamut-map by reducing chroma.

use super::{blend_masked, bounds};
use crate::color::{gamut_map, l_from_y, lab_to_lin, linear_table, to_srgb};
use crate::lut::Lut1;
use crate::mask::Rect;
use crate::rule::RecolorParams;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use std::sync::LazyLock;

/// Steps of the uniform luminance grid every recolour pixel is mapped through. The edited colour depends on the
/// input's luminance alone, so one table lookup per pixel replaces the Y -> L* -> paint chain; at 16k steps the
/// grid's coarsest L* spacing (near black, where L* is steepest) is 0.055, far below what an 8-bit output shows.
const Y_STEPS: usize = 1 << 14;

/// Fixed-point bits of the per-channel luminance tables.
const FRAC: u32 = 8;

/// Per channel, each 8-bit code's contribution to the grid index in 1/2^FRAC steps: a pixel's index is three
/// loads, two adds and a shift, with no float work at all.
static Y_INDEX: LazyLock<[[u32; 256]; 3]> = LazyLock::new(|| {
    let lin = linear_table();
    let scale = ((Y_STEPS - 1) << FRAC) as f32;
    let w = [0.212_672_9f32, 0.715_152_2, 0.072_175];
    std::array::from_fn(|c| std::array::from_fn(|code| (w[c] * lin[code] * scale) as u32))
});

/// L* at each grid step.
static STEP_L: LazyLock<Vec<f32>> = LazyLock::new(|| {
    (0..Y_STEPS)
        .map(|i| l_from_y(i as f32 / (Y_STEPS - 1) as f32))
        .collect()
});

#[inline]
fn y_index(t: &[[u32; 256]; 3], p: [u8; 3]) -> usize {
    let sum = t[0][p[0] as usize] + t[1][p[1] as usize] + t[2][p[2] as usize];
    (((sum + (1 << (FRAC - 1))) >> FRAC) as usize).min(Y_STEPS - 1)
}

/// Shading scale k in out L = L_target + (L - mean_L) * k. Shading multiplies reflected light, and L* is roughly a
/// cube root of it, so the same shadow spans fewer L* units on a darker paint: scale by (L_t + 16) / (mean + 16)
/// (clamped so a near-black wall does not blow up noise), times the finish's share of local contrast.
pub fn shading_scale(p: &RecolorParams, mean_l: f32) -> f32 {
    p.finish.contrast_kept() * ((p.lab[0] + 16.0) / (mean_l + 16.0)).clamp(0.35, 1.5)
}

/// Headroom kept free at either end of L* for the shading's 1st/99th percentile.
const TOP: f32 = 98.0;
const BOTTOM: f32 = 3.0;

pub fn recolor(photo: &RgbImage, region: &GrayImage, p: &RecolorParams) -> RgbImage {
    let b = bounds(region);
    let Some(stats) = lightness_stats(photo, region, b) else {
        return photo.clone();
    };
    let mean_l = stats.mean;
    // A light paint on a sunlit wall (or a dark one in shadow) would push the shading past white (black) and
    // flatten it there; shrink k just enough that the 1st..99th percentile still fits. Keeps shading linear.
    let mut k = shading_scale(p, mean_l);
    if stats.p99 > mean_l {
        k = k.min((TOP - p.lab[0]).max(0.0) / (stats.p99 - mean_l));
    }
    if stats.p01 < mean_l {
        k = k.min((p.lab[0] - BOTTOM).max(0.0) / (mean_l - stats.p01));
    }
    let [lt, at, bt] = p.lab;
    // The exact map, gamut mapping included, at 0.05 L* steps; then resampled onto the luminance grid so each
    // pixel costs one lookup.
    let paint = Lut1::build(0.0, 100.0, 2001, |l_in| {
        let c = gamut_map(soft_clip(lt + (l_in - mean_l) * k), at, bt, lab_to_lin);
        [to_srgb(c[0]), to_srgb(c[1]), to_srgb(c[2])]
    });
    let by_step: Vec<[f32; 3]> = STEP_L.iter().map(|&l| paint.eval(l)).collect();
    let t = &*Y_INDEX;
    blend_masked(photo, region, b, p.common.strength, |_, _, px| {
        by_step[y_index(t, px)]
    })
}

/// Knees of the roll-off at either end of L*.
const KNEE_HI: f32 = 90.0;
const KNEE_LO: f32 = 8.0;

/// Rolls lightness off smoothly toward 0 and 100 instead of clamping: a light paint on a sunlit wall would otherwise
/// flatten every highlight to the same white and lose the shading there. Monotonic and C1 at the knees.
#[inline]
pub fn soft_clip(l: f32) -> f32 {
    if l > KNEE_HI {
        let room = 100.0 - KNEE_HI;
        100.0 - room * (-(l - KNEE_HI) / room).exp()
    } else if l < KNEE_LO {
        KNEE_LO * ((l - KNEE_LO) / KNEE_LO).exp()
    } else {
        l
    }
}

pub struct LightnessStats {
    pub mean: f32,
    pub p01: f32,
    pub p99: f32,
}

/// Alpha-weighted mean and 1st/99th percentiles of L* over the region, from one pass that histograms the pixels
/// on the luminance grid (exact to the grid's 0.055 L*; the old 0.1 L* bins were coarser).
pub fn lightness_stats(photo: &RgbImage, region: &GrayImage, b: Rect) -> Option<LightnessStats> {
    if b.is_empty() {
        return None;
    }
    let w = photo.width() as usize;
    let (x0, x1) = (b.x0 as usize, b.x1 as usize);
    let t = &*Y_INDEX;
    let hist = photo
        .as_raw()
        .par_chunks(w * 3)
        .zip(region.as_raw().par_chunks(w))
        .skip(b.y0 as usize)
        .take(b.height() as usize)
        .fold(
            || vec![0u64; Y_STEPS],
            |mut h, (row, alpha)| {
                for x in x0..x1 {
                    let a = alpha[x];
                    if a != 0 {
                        h[y_index(t, [row[x * 3], row[x * 3 + 1], row[x * 3 + 2]])] += a as u64;
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
        );
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let step_l = &*STEP_L;
    let sum: f64 = hist
        .iter()
        .zip(step_l)
        .map(|(&c, &l)| c as f64 * l as f64)
        .sum();
    let pct = |q: f64| {
        let want = (q * total as f64) as u64;
        let mut acc = 0;
        for (i, &c) in hist.iter().enumerate() {
            acc += c;
            if acc > want {
                return step_l[i];
            }
        }
        100.0
    };
    Some(LightnessStats {
        mean: (sum / total as f64) as f32,
        p01: pct(0.01),
        p99: pct(0.99),
    })
}
