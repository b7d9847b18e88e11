//! Remove an object: a transparent cut-out (exact, soft-edged, for product shots) or an exemplar-based fill.

use super::{blend_masked, bounds};
use crate::inpaint::inpaint;
use crate::rule::RemoveParams;
use image::{GrayImage, RgbImage, RgbaImage};

/// RGBA copy of the photo with alpha = 255 - region * strength: the object becomes transparent.
pub fn cutout(photo: &RgbImage, region: &GrayImage, p: &RemoveParams) -> RgbaImage {
    let s = p.common.strength;
    RgbaImage::from_fn(photo.width(), photo.height(), |x, y| {
        let [r, g, b] = photo.get_pixel(x, y).0;
        let a = region.get_pixel(x, y)[0] as f32 * s;
        image::Rgba([r, g, b, (255.0 - a + 0.5).clamp(0.0, 255.0) as u8])
    })
}

/// Fills the region from its surroundings, then blends the fill in by min(1, 2 * alpha) * strength. Doubling alpha
/// replaces the object's own anti-aliased rim too; with plain alpha a ghost outline of the object stays behind.
pub fn fill(photo: &RgbImage, region: &GrayImage, p: &RemoveParams) -> RgbImage {
    let filled = inpaint(photo, region);
    let mut weight = region.clone();
    weight.iter_mut().for_each(|a| *a = a.saturating_mul(2));
    blend_masked(
        photo,
        &weight,
        bounds(region),
        p.common.strength,
        |x, y, _| filled.get_pixel(x, y).0.map(f32::from),
    )
}
