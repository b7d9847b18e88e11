//! Paint a surface: move its lightness to the paint's while keeping local shading (a mask-restricted Reinhard
//! transfer on L*), take hue and chroma from the paint, and gamut-map by reducing chroma.

use super::{blend_masked, bounds};
use crate::color::{gamut_map, l_from_y, lab_to_lin, linear_table, luminance, to_srgb};
use crate::lut::Lut1;
use crate::mask::Rect;
use crate::rule::RecolorParams;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use std::sync::LazyLock;

/// Y -> L* table: the cube root near black is steep, so 4k nodes keep interpolation error under 0.001 L*.
static Y_TO_L: LazyLock<Lut1<1>> = LazyLock::new(|| Lut1::build(0.0, 1.0, 4097, |y| [l_from_y(y)]));

#[inline]
fn lightness_with(lin: &[f32; 256], ytol: &Lut1<1>, p: [u8; 3]) -> f32 {
    ytol.eval(luminance(
        lin[p[0] as usize],
        lin[p[1] as usize],
        lin[p[2] as usize],
    ))[0]
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
    // The edited colour depends on the input's L* alone (hue and chroma come from the paint), so evaluate the
    // exact map, gamut mapping included, at 0.05 L* steps and interpolate.
    let paint = Lut1::build(0.0, 100.0, 2001, |l_in| {
        let c = gamut_map(soft_clip(lt + (l_in - mean_l) * k), at, bt, lab_to_lin);
        [to_srgb(c[0]), to_srgb(c[1]), to_srgb(c[2])]
    });
    let (lin, ytol) = (linear_table(), &*Y_TO_L);
    blend_masked(photo, region, b, p.common.strength, |_, _, px| {
        paint.eval(lightness_with(lin, ytol, px))
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

const BINS: usize = 1024;

/// Alpha-weighted mean and 1st/99th percentiles of L* over the region, from one pass (histogram of 0.1 L* bins).
pub fn lightness_stats(photo: &RgbImage, region: &GrayImage, b: Rect) -> Option<LightnessStats> {
    if b.is_empty() {
        return None;
    }
    let w = photo.width() as usize;
    let (x0, x1) = (b.x0 as usize, b.x1 as usize);
    let (lin, ytol) = (linear_table(), &*Y_TO_L);
    let (hist, sum) = photo
        .as_raw()
        .par_chunks(w * 3)
        .zip(region.as_raw().par_chunks(w))
        .skip(b.y0 as usize)
        .take(b.height() as usize)
        .fold(
            || (vec![0u64; BINS], 0.0f64),
            |(mut h, mut s), (row, alpha)| {
                for x in x0..x1 {
                    let a = alpha[x];
                    if a != 0 {
                        let l =
                            lightness_with(lin, ytol, [row[x * 3], row[x * 3 + 1], row[x * 3 + 2]]);
                        h[((l * 10.0) as usize).min(BINS - 1)] += a as u64;
                        s += (a as f32 * l) as f64;
                    }
                }
                (h, s)
            },
        )
        .reduce(
            || (vec![0u64; BINS], 0.0),
            |(mut h, s), (h2, s2)| {
                h.iter_mut().zip(&h2).for_each(|(a, b)| *a += b);
                (h, s + s2)
            },
        );
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let pct = |q: f64| {
        let want = (q * total as f64) as u64;
        let mut acc = 0;
        for (i, &c) in hist.iter().enumerate() {
            acc += c;
            if acc > want {
                return (i as f32 + 0.5) / 10.0;
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
