//! Brightness, contrast, saturation and warmth inside the region, in Oklab (perceptually even steps, and hue stays
//! put when chroma is scaled), gamut-mapped in Oklch. Brightness is exposure: it scales the light (all of Oklab by
//! the cube root of the factor, which is a linear-light scale), so shadows keep their ratio to the lit parts as the
//! light model (`light.rs`) asks, and what would pass white rolls off along the shared shoulder instead of clipping.

use super::{blend_masked, bounds, weighted_mean};
use crate::color::{gamut_map, lin_to_oklab, oklab_to_lin, srgb_decode_f, to_linear, to_srgb};
use crate::light::{KNEE, Shoulder};
use crate::lut::{Lut3, N3, node_code};
use crate::rule::ToneParams;
use image::{GrayImage, RgbImage};

/// Exposure change at brightness 1, in stops (powers of two of light): 1.5 stops = 2.8x the light.
const STOPS: f32 = 1.5;
/// Oklab b (yellow) and a (red) shift at warmth 1: warm light is mostly yellower, slightly redder.
const WARM_B: f32 = 0.035;
const WARM_A: f32 = 0.01;

#[inline]
fn oklab(p: [u8; 3]) -> [f32; 3] {
    lin_to_oklab(to_linear(p[0]), to_linear(p[1]), to_linear(p[2]))
}

/// The photo with the tone change applied (a copy: see `tone_in_place`).
pub fn tone(photo: &RgbImage, region: &GrayImage, p: &ToneParams) -> RgbImage {
    let mut out = photo.clone();
    tone_in_place(&mut out, region, p);
    out
}

/// Changes the tone of the region of `photo` in place: only pixels of non-zero weight change.
pub fn tone_in_place(photo: &mut RgbImage, region: &GrayImage, p: &ToneParams) {
    let b = bounds(region);
    // Contrast pivots on the region's own mean (from 1 pixel in 16: plenty for a mean) so a dark sofa does not get brighter when contrast rises.
    let Some(mean_l) = weighted_mean(photo, region, b, 4, |px| oklab(px)[0]) else {
        return;
    };
    let gain = 1.0 + p.contrast;
    let sat = 1.0 + p.saturation;
    let exposure = (p.brightness * STOPS).exp2().cbrt();
    let (wa, wb) = (p.warmth * WARM_A, p.warmth * WARM_B);
    // White input (Oklab L 1, and L cubed is linear light for neutral colours) after contrast and exposure is the
    // brightest output: the shoulder ends there.
    let top = ((mean_l + (1.0 - mean_l) * gain) * exposure)
        .max(0.0)
        .powi(3);
    let shoulder = Shoulder::new(top);
    // The map is a smooth function of the input RGB: evaluate it exactly on a 33^3 grid, interpolate per pixel.
    // Nodes sit between 8-bit codes, so decode each axis value once here rather than 3 powf per node.
    let axis: [f32; N3] = std::array::from_fn(|i| srgb_decode_f(node_code(i) / 255.0));
    let map = Lut3::new(|n: [usize; 3]| {
        let lin = n.map(|i| axis[i]);
        let [l, a, bb] = lin_to_oklab(lin[0], lin[1], lin[2]);
        let l = (mean_l + (l - mean_l) * gain).max(0.0) * exposure;
        let (a, bb) = (a * exposure * sat + wa, bb * exposure * sat + wb);
        // Past the knee, scale the whole colour by its largest channel's roll-off (hue and chroma kept, no channel
        // flat at 255; see recolor.rs). Scaling linear light by k is scaling Oklab by cbrt(k).
        let c = oklab_to_lin(l, a, bb);
        let m = c[0].max(c[1]).max(c[2]);
        let k = if m > KNEE {
            (shoulder.apply(m) / m).cbrt()
        } else {
            1.0
        };
        let c = gamut_map((l * k).min(1.0), a * k, bb * k, oklab_to_lin);
        [to_srgb(c[0]), to_srgb(c[1]), to_srgb(c[2])]
    });
    blend_masked(photo, region, b, p.common.strength, |_, _, px| map.eval(px));
}
