//! Paint a surface: the paint becomes the surface's colour and the photo keeps carrying the light (see
//! `light.rs`). A pixel's light is its luminance over the region's lit level; the output is the paint's luminance
//! times that ratio, so the lit wall reads as the paint chip and a shadow that halved the light halves it on any
//! paint, white included. Hue and chroma come from the paint (a colour outside sRGB first loses chroma at constant
//! lightness and hue), and highlights roll off below white.

use super::{blend_masked, bounds};
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
    let by_step: Vec<[f32; 3]> = (0..Y_STEPS).map(|i| map.srgb(step_y(i))).collect();
    let grid = GridIndex::get();
    blend_masked(photo, region, b, p.common.strength, |x, y, px| {
        by_step[grid.dithered(px, x, y)]
    });
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
