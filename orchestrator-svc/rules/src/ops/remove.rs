//! Remove an object: a transparent cut-out (exact, soft-edged, for product shots) or an exemplar-based fill.

use super::{blend_masked, bounds};
use crate::inpaint::inpaint;
use crate::rule::RemoveParams;
use image::{GrayImage, RgbImage, RgbaImage};
use rayon::prelude::*;

/// RGBA copy of the photo with alpha = 255 - region * strength: the object becomes transparent.
pub fn cutout(photo: &RgbImage, region: &GrayImage, p: &RemoveParams) -> RgbaImage {
    let (w, h) = photo.dimensions();
    // alpha as a 256-entry table: strength is fixed for the whole image.
    let s = p.common.strength;
    let alpha: [u8; 256] =
        std::array::from_fn(|a| (255.0 - a as f32 * s + 0.5).clamp(0.0, 255.0) as u8);
    let mut out = vec![0u8; w as usize * h as usize * 4];
    out.par_chunks_mut(w as usize * 4)
        .zip(photo.as_raw().par_chunks(w as usize * 3))
        .zip(region.as_raw().par_chunks(w as usize))
        .for_each(|((dst, src), a)| {
            for ((d, s), a) in dst.chunks_exact_mut(4).zip(src.chunks_exact(3)).zip(a) {
                d.copy_from_slice(&[s[0], s[1], s[2], alpha[*a as usize]]);
            }
        });
    RgbaImage::from_raw(w, h, out).expect("buffer sized for w x h")
}

/// A cut-out of a photo that was itself transparent (a product PNG on a transparent background): the photo's own
/// transparency kept. The pipeline reads such a photo on white
/// (`palette_service_kit::image_input::rgba_on_white_and_alpha`, as the segmenter does); here each pixel's alpha
/// becomes cut-out alpha x photo alpha, and its colour is taken back off the white it was blended onto, so the
/// output composites over any background as the source did (left on white, a semi-transparent rim would show as a
/// light halo on a dark page). Fully opaque pixels are not touched.
pub fn keep_source_transparency(cut: &mut RgbaImage, source_alpha: &GrayImage) {
    assert_eq!(
        cut.dimensions(),
        source_alpha.dimensions(),
        "cut-out and source alpha of one photo"
    );
    let w = cut.width() as usize;
    cut.par_chunks_mut(w * 4)
        .zip(source_alpha.as_raw().par_chunks(w))
        .for_each(|(row, alpha)| keep_source_transparency_row(row, alpha));
}

/// `keep_source_transparency` of one RGBA row and the source's alpha for it: for an encoder fed row by row.
pub fn keep_source_transparency_row(row: &mut [u8], source_alpha: &[u8]) {
    debug_assert_eq!(row.len(), source_alpha.len() * 4, "RGBA row and its alpha");
    for (px, &a) in row.chunks_exact_mut(4).zip(source_alpha) {
        if a == 255 {
            continue;
        }
        let a = u32::from(a);
        px[3] = ((u32::from(px[3]) * a + 127) / 255) as u8;
        if a == 0 {
            // Nothing of the source shows here: no colour to recover (and none is seen).
            px[..3].fill(0);
            continue;
        }
        // on_white = c * a / 255 + 255 - a  =>  c = (on_white - (255 - a)) * 255 / a
        for c in &mut px[..3] {
            let over = u32::from(*c).saturating_sub(255 - a);
            *c = ((over * 255 + a / 2) / a).min(255) as u8;
        }
    }
}

/// Fills the region from its surroundings, then blends the fill in by min(1, 2 * alpha) * strength. Doubling alpha
/// replaces the object's own anti-aliased rim too; with plain alpha a ghost outline of the object stays behind.
pub fn fill(photo: &RgbImage, region: &GrayImage, p: &RemoveParams) -> RgbImage {
    let mut out = photo.clone();
    fill_in_place(&mut out, region, p);
    out
}

/// `fill` in place: only pixels of non-zero weight change.
pub fn fill_in_place(photo: &mut RgbImage, region: &GrayImage, p: &RemoveParams) {
    let filled = inpaint(photo, region);
    let mut weight = region.clone();
    weight.iter_mut().for_each(|a| *a = a.saturating_mul(2));
    blend_masked(
        photo,
        &weight,
        bounds(region),
        p.common.strength,
        |x, y, _| filled.get_pixel(x, y).0.map(f32::from),
    );
}
