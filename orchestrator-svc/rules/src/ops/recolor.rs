//! Paint a surface: the paint becomes the surface's colour and the photo keeps carrying the light (see
//! `light.rs`). A pixel's light is its luminance over the region's lit level; the output is the paint's luminance
//! times that ratio, so the lit wall reads as the paint chip and a shadow that halved the light halves it on any
//! paint, white included. Hue and chroma come from the paint (a colour outside sRGB first loses chroma at constant
//! lightness and hue), and highlights roll off below white.

use super::{bounds, for_each_row};
use crate::color::{gamut_map, lab_to_lin, to_srgb};
use crate::light::{GridIndex, KNEE, Shoulder, Y_STEPS, finish_light, lit_level, step_y};
use crate::rule::RecolorParams;
use image::{GrayImage, RgbImage};

/// The photo with the paint applied (a copy: see `recolor_in_place`).
pub fn recolor(photo: &RgbImage, region: &GrayImage, p: &RecolorParams) -> RgbImage {
    let mut out = photo.clone();
    recolor_in_place(&mut out, region, p);
    out
}

/// Paints the region of `photo` in place: only pixels of non-zero weight change.
pub fn recolor_in_place(photo: &mut RgbImage, region: &GrayImage, p: &RecolorParams) {
    let b = bounds(region);
    let Some(lit) = lit_level(photo, region, b) else {
        return;
    };
    let map = PaintMap::new(p, lit);
    // The edited colour depends on the input's luminance alone: one table entry per step of the luminance grid,
    // so each pixel costs one lookup.
    // Padded to 16 bytes so that the AVX2 kernel loads an entry with one 128-bit load.
    let by_step: Vec<[f32; 4]> = (0..Y_STEPS)
        .map(|i| {
            let [r, g, b] = map.srgb(step_y(i));
            [r, g, b, 0.0]
        })
        .collect();
    let grid = GridIndex::get();
    let strength = p.common.strength;
    if b.is_empty() || strength <= 0.0 {
        return;
    }
    let k = strength / 255.0;
    for_each_row(photo, region, b, |y, px, alpha| {
        blend_row(&grid, &by_step, y, b.x0, px, alpha, k)
    });
}

/// One row of `blend_masked` with the paint as the edit, the row's pixels from column `x0`: each pixel whose
/// `alpha` is not 0 takes its dithered luminance step's colour, blended by alpha * `k`. The AVX2 path does 8 pixels
/// a step with the same integer and float operations in the same order, so it gives the same bytes.
fn blend_row(
    grid: &GridIndex,
    by_step: &[[f32; 4]],
    y: u32,
    x0: u32,
    px: &mut [u8],
    alpha: &[u8],
    k: f32,
) {
    let n = alpha.len().min(px.len() / 3);
    // Pixels done 8 at a time; the rest (all of them below AVX2) one at a time.
    #[cfg(target_arch = "x86_64")]
    let done = if crate::simd::active() == crate::simd::Level::Avx2Fma {
        // SAFETY: `active` is at most `detected`, which found AVX2 and FMA on this CPU.
        #[allow(unsafe_code)]
        unsafe {
            avx2::blend_row(grid, by_step, y, x0, &mut px[..3 * n], &alpha[..n], k)
        }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (x, (p, &a)) in (done..n).zip(px[3 * done..3 * n].chunks_exact_mut(3).zip(&alpha[done..n]))
    {
        if a == 0 {
            continue;
        }
        let src = [p[0], p[1], p[2]];
        let e = by_step[grid.dithered(src, x0 + x as u32, y)];
        let wgt = a as f32 * k;
        for c in 0..3 {
            let v = src[c] as f32 + wgt * (e[c] - src[c] as f32);
            p[c] = (v + 0.5) as u8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use crate::light::{FRAC, GridIndex, HASH, Y_STEPS};
    use std::arch::x86_64::*;

    /// [`super::blend_row`] on whole groups of 8 pixels; returns how many pixels it did. `GridIndex::dithered` in
    /// 32-bit lanes: its i64 arithmetic never leaves i32 here (grid positions are below 2^23 and the bin offset's
    /// product below 2^23 too), and an arithmetic shift floors as the i64 one does.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn blend_row(
        grid: &GridIndex,
        by_step: &[[f32; 4]],
        y: u32,
        x0: u32,
        px: &mut [u8],
        alpha: &[u8],
        k: f32,
    ) -> usize {
        let n = alpha.len() / 8 * 8;
        assert!(px.len() >= 3 * n && by_step.len() == Y_STEPS);
        let (at, bin) = grid.tables();
        let [mx, my, m1, m2] = HASH.map(|m| _mm256_set1_epi32(m as i32));
        let hy = _mm256_mullo_epi32(_mm256_set1_epi32(y as i32), my);
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut idx = [0i32; 8];
        for x in (0..n).step_by(8) {
            let a8 = u64::from_le_bytes(alpha[x..x + 8].try_into().unwrap());
            if a8 == 0 {
                continue;
            }
            let p = px[3 * x..3 * x + 24].as_mut_ptr();
            let rgb = crate::simd::load_rgb8!(p);
            let (mut pos, mut width) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for c in 0..3 {
                // SAFETY: codes are below 256, each table's length.
                let (t, w) = unsafe {
                    (
                        _mm256_i32gather_epi32::<4>(at[c].as_ptr() as *const i32, rgb[c]),
                        _mm256_i32gather_epi32::<4>(bin[c].as_ptr() as *const i32, rgb[c]),
                    )
                };
                pos = _mm256_add_epi32(pos, t);
                width = _mm256_add_epi32(width, w);
            }
            // position_hash(x0 + x + lane, y) >> 24, with wrapping 32-bit products.
            let xs = _mm256_add_epi32(_mm256_set1_epi32(x0.wrapping_add(x as u32) as i32), lanes);
            let mut h = _mm256_xor_si256(_mm256_mullo_epi32(xs, mx), hy);
            h = _mm256_xor_si256(h, _mm256_srli_epi32::<15>(h));
            h = _mm256_mullo_epi32(h, m1);
            h = _mm256_xor_si256(h, _mm256_srli_epi32::<12>(h));
            let u = _mm256_srli_epi32::<24>(_mm256_mullo_epi32(h, m2));
            let off = _mm256_srai_epi32::<8>(_mm256_mullo_epi32(
                _mm256_sub_epi32(u, _mm256_set1_epi32(128)),
                width,
            ));
            let v = _mm256_max_epi32(_mm256_add_epi32(pos, off), _mm256_setzero_si256());
            let step = _mm256_srli_epi32::<{ FRAC as i32 }>(_mm256_add_epi32(
                v,
                _mm256_set1_epi32(1 << (FRAC - 1)),
            ));
            let step = _mm256_min_epi32(step, _mm256_set1_epi32(Y_STEPS as i32 - 1));
            // SAFETY: `idx` is 8 i32s, 32 bytes.
            unsafe { _mm256_storeu_si256(idx.as_mut_ptr() as *mut __m256i, step) };
            let e = crate::simd::load_rgb4x8!(by_step, idx);
            let src = [
                _mm256_cvtepi32_ps(rgb[0]),
                _mm256_cvtepi32_ps(rgb[1]),
                _mm256_cvtepi32_ps(rgb[2]),
            ];
            let a = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(a8 as i64));
            crate::simd::blend_store_rgb8!(p, src, e, a, k);
        }
        n
    }
}

/// Input luminance -> painted colour, for one paint on one region.
pub struct PaintMap {
    /// The paint in linear sRGB (gamut-mapped once): the colour of the lit wall. Less or more light scales all
    /// three channels alike, which keeps the paint's chromaticity: the same paint in a shadow is darker and, in
    /// CIELAB terms, proportionally less chromatic, exactly as a real painted wall photographs.
    paint: [f32; 3],
    lit: f32,
    gain: f32,
    /// On the largest channel: rolling off luminance alone would still push a saturated paint's strongest channel
    /// into a flat 255 in its highlights; scaling the whole colour by the roll-off of its largest channel keeps hue
    /// and chroma and leaves no channel clipped.
    shoulder: Shoulder,
}

impl PaintMap {
    pub fn new(p: &RecolorParams, lit: f32) -> Self {
        let [l, a, b] = p.lab;
        let paint = gamut_map(l.clamp(0.0, 100.0), a, b, lab_to_lin).map(|v| v.clamp(0.0, 1.0));
        let gain = p.finish.highlight_gain();
        // The brightest possible input (luminance 1) fixes how far the shoulder must reach.
        let top = max3(paint) * finish_light(1.0 / lit, gain);
        PaintMap {
            paint,
            lit,
            gain,
            shoulder: Shoulder::new(top),
        }
    }

    /// The painted pixel in linear sRGB for an input of luminance `y`.
    pub fn linear(&self, y: f32) -> [f32; 3] {
        let c = self
            .paint
            .map(|v| v * finish_light(y / self.lit, self.gain));
        let m = max3(c);
        let k = if m > KNEE {
            self.shoulder.apply(m) / m
        } else {
            1.0
        };
        c.map(|v| v * k)
    }

    /// The painted pixel in sRGB (0..255 floats).
    pub fn srgb(&self, y: f32) -> [f32; 3] {
        self.linear(y).map(to_srgb)
    }
}

#[inline]
fn max3(c: [f32; 3]) -> f32 {
    c[0].max(c[1]).max(c[2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::blend_masked;
    use crate::ops::kernel_check::{assert_every_level_gives, holey_region, noisy_room};
    use crate::rule::{Rule, parse_rule};

    /// The row kernel (at every level this CPU has) against the per-pixel formulation it replaced
    /// (`GridIndex::dithered` into the step table inside `blend_masked`), on a JPEG-noisy synthetic room with an odd
    /// width and a soft region with alpha-0 holes and margins: the same bytes.
    #[test]
    fn row_kernel_gives_the_per_pixel_bytes() {
        let (w, h) = (613u32, 411u32);
        let photo = noisy_room(w, h);
        let region = holey_region((w, h), 13, (11, 27, 5), (200, 150));
        let rules = [
            serde_json::json!({"color": "#1F3A5F"}),
            serde_json::json!({"color": "#ffffff", "finish": "gloss"}),
            serde_json::json!({"color": "#beb3a3", "strength": 0.6}),
        ];
        for params in rules {
            let Rule::Recolor(p) =
                parse_rule("recolor", params.as_object().unwrap(), None).unwrap()
            else {
                panic!("not a recolor rule");
            };
            let b = bounds(&region);
            let map = PaintMap::new(&p, lit_level(&photo, &region, b).unwrap());
            let by_step: Vec<[f32; 3]> = (0..Y_STEPS).map(|i| map.srgb(step_y(i))).collect();
            let grid = GridIndex::get();
            let mut want = photo.clone();
            blend_masked(&mut want, &region, b, p.common.strength, |x, y, px| {
                by_step[grid.dithered(px, x, y)]
            });
            assert_every_level_gives(&want, &photo, &params.to_string(), || {
                recolor(&photo, &region, &p)
            });
        }
    }
}
