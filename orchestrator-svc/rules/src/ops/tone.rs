//! Brightness, contrast, saturation and warmth inside the region, in Oklab (perceptually even steps, and hue stays
//! put when chroma is scaled), gamut-mapped in Oklch. Brightness is exposure: it scales the light (all of Oklab by
//! the cube root of the factor, which is a linear-light scale), so shadows keep their ratio to the lit parts as the
//! light model (`light.rs`) asks, and what would pass white rolls off along the shared shoulder instead of clipping.

use super::{bounds, for_each_row, weighted_mean};
use crate::color::{gamut_map, lin_to_oklab, oklab_to_lin, srgb_decode_f, to_linear, to_srgb};
use crate::light::{KNEE, Shoulder};
use crate::lut::{Lut3, N3, node_code};
use crate::mask::Rect;
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
    if let Some(map) = tone_map(photo, region, b, p) {
        blend_with_lut(photo, region, b, p.common.strength, &map);
    }
}

/// The tone change as a table over input RGB (None for an empty region).
fn tone_map(
    photo: &RgbImage,
    region: &GrayImage,
    b: Rect,
    p: &ToneParams,
) -> Option<Lut3<impl Fn([usize; 3]) -> [f32; 3] + Sync + use<>>> {
    // Contrast pivots on the region's own mean (from 1 pixel in 16: plenty for a mean) so a dark sofa does not get brighter when contrast rises.
    let mean_l = weighted_mean(photo, region, b, 4, |px| oklab(px)[0])?;
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
    let map = Lut3::new(move |n: [usize; 3]| {
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
    Some(map)
}

/// `blend_masked` with `map` as the edit, a row at a time through its row kernel (8 pixels a step with AVX2).
fn blend_with_lut<F: Fn([usize; 3]) -> [f32; 3] + Sync>(
    photo: &mut RgbImage,
    region: &GrayImage,
    b: Rect,
    strength: f32,
    map: &Lut3<F>,
) {
    if b.is_empty() || strength <= 0.0 {
        return;
    }
    let k = strength / 255.0;
    for_each_row(photo, region, b, |_, px, alpha| map.blend_row(px, alpha, k));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::blend_masked;
    use crate::ops::kernel_check::{assert_every_level_gives, holey_region, noisy_room};
    use crate::rule::{Rule, parse_rule};

    /// The row kernel (at every level this CPU has) against the per-pixel formulation it replaced: the lazy
    /// table's `eval` inside `blend_masked`. On a JPEG-noisy synthetic room, an odd width (loop tails) and a soft
    /// region with alpha-0 holes and margins, it gives the same bytes.
    #[test]
    fn row_kernel_gives_the_per_pixel_bytes() {
        let (w, h) = (611u32, 409u32);
        let photo = noisy_room(w, h);
        let region = holey_region((w, h), 11, (13, 30, 7), (300, 200));
        let rules = [
            serde_json::json!({"warmth": 0.3}),
            serde_json::json!({"brightness": 0.8, "contrast": 0.4, "saturation": 0.5}),
            serde_json::json!({"brightness": -0.6, "saturation": -1, "strength": 0.7}),
        ];
        for params in rules {
            let Rule::Tone(p) = parse_rule("tone", params.as_object().unwrap(), None).unwrap()
            else {
                panic!("not a tone rule");
            };
            let b = bounds(&region);
            let map = tone_map(&photo, &region, b, &p).unwrap();
            let mut want = photo.clone();
            blend_masked(&mut want, &region, b, p.common.strength, |_, _, px| {
                map.eval(px)
            });
            assert_every_level_gives(&want, &photo, &params.to_string(), || {
                tone(&photo, &region, &p)
            });
        }
    }
}
