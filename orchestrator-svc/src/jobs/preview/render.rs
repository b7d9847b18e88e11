//! The CPU part of a preview, as plain functions (no I/O): a rule's region at preview size and the encoding (the
//! rules applied in order are `compose`'s; downscaling is `crate::resize`'s, re-exported here). The region and the
//! edit are the job path's (`palette_rules`), at a smaller size: pixel-sized region parameters (feather, grow) are
//! scaled with the photo, so the preview looks like the job's output downscaled.

use palette_rules::region::RegionParams;
use palette_rules::{Edited, GrayImage, RgbImage};

use crate::jobs::item::ItemError;
use crate::jobs::item::cpu::{NotApplied, region_not_applied};
use crate::jobs::item::imaging;

/// Largest and default `max_side`.
pub const MAX_SIDE: u32 = 4096;
pub const DEFAULT_SIDE: u32 = 1024;
pub const MIN_SIDE: u32 = 64;

/// The preview's size: the photo's, shrunk (never grown) so its longer side is at most `max_side`.
pub fn preview_size((w, h): (u32, u32), max_side: u32) -> (u32, u32) {
    let long = w.max(h);
    if long <= max_side {
        return (w, h);
    }
    let scale = f64::from(max_side) / f64::from(long);
    let side = |v: u32| ((f64::from(v) * scale).round() as u32).clamp(1, max_side);
    (side(w), side(h))
}

pub use crate::resize::{downscale_gray, downscale_rgb};

/// The preview's scale against the full photo, from the longer sides (what `preview_size` scaled by): a short side
/// is rounded to whole pixels and at least 1, so its ratio can be far off (3 x 4000 previewed at 64 is 1 x 64: 1/3
/// by width, 1/62.5 by the long side), and feather and grow would come out that many times too wide.
pub fn scale_factor(preview: (u32, u32), full: (u32, u32)) -> f32 {
    preview.0.max(preview.1) as f32 / full.0.max(full.1).max(1) as f32
}

/// Pixel-sized parameters follow the photo's scale (`factor` = preview / full size); the edge refinement is solved
/// a step coarser (`RegionParams::coarse`): a preview's region is most of a cold preview's time.
pub fn scaled(params: RegionParams, factor: f32) -> RegionParams {
    RegionParams {
        feather_px: params.feather_px * factor,
        grow_px: params.grow_px * factor,
        coarse: true,
        ..params
    }
}

/// A rule's region at preview size and why it edits nothing, if it does not: as `item::cpu::rule_region` decides.
pub fn region(
    photo: &RgbImage,
    target: Option<&GrayImage>,
    occluders: &[GrayImage],
    params: &RegionParams,
) -> (GrayImage, Option<NotApplied>) {
    let targets = target.map_or(&[][..], std::slice::from_ref);
    let mut region = palette_rules::region::build_region(photo, targets, occluders, params);
    let not_applied = region_not_applied(target, occluders, &mut region);
    (region, not_applied)
}

/// The encoded preview and its content type: JPEG, or PNG when asked (keeping the photo's transparency, as a job's PNG
/// outputs do) or when the last rule cut the subject out.
pub fn encode(
    edited: &Edited,
    png: bool,
    transparency: Option<&GrayImage>,
) -> Result<(Vec<u8>, &'static str), ItemError> {
    Ok(match edited {
        Edited::Rgba(img) => (imaging::encode_png_rgba(img)?, "image/png"),
        // As a job's PNG outputs: the photo's transparency kept when it has some.
        Edited::Rgb(img) if png => (imaging::encode_png_keeping(img, transparency)?, "image/png"),
        Edited::Rgb(img) => (encode_jpeg(img)?, "image/jpeg"),
    })
}

/// A preview is looked at once, on a screen: quality 85 with 4:2:0 chroma (what photo apps send) instead of the
/// deliverables' 90. Measured at 1024x768 on one core: the encode is the larger half of a warm preview.
const PREVIEW_JPEG_QUALITY: u8 = 85;

fn encode_jpeg(img: &RgbImage) -> Result<Vec<u8>, ItemError> {
    let encode_error = |source: crate::error::BoxError| ItemError::Encode {
        what: "preview JPEG encode",
        source,
    };
    // Previews are at most MAX_SIDE (4096) px a side: within JPEG's 16-bit sides.
    crate::jpeg::encode_rgb(img, PREVIEW_JPEG_QUALITY).map_err(|e| encode_error(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_shrink_to_the_longer_side_and_never_grow() {
        assert_eq!(preview_size((4032, 3024), 1024), (1024, 768));
        assert_eq!(preview_size((3024, 4032), 1024), (768, 1024));
        assert_eq!(preview_size((800, 600), 1024), (800, 600));
        assert_eq!(preview_size((5000, 1), 100), (100, 1));
    }

    #[test]
    fn pixel_parameters_scale_by_the_longer_side() {
        assert_eq!(scale_factor((1024, 768), (4032, 3024)), 1024.0 / 4032.0);
        // A narrow photo: its width rounds to 1 px, its scale is the long side's.
        let full = (3, 4000);
        let preview = preview_size(full, 64);
        assert_eq!(preview, (1, 64));
        assert_eq!(scale_factor(preview, full), 64.0 / 4000.0);
    }

    #[test]
    fn masks_and_photos_downscale_alike() {
        let gray = GrayImage::from_fn(40, 20, |x, _| image::Luma([if x < 20 { 255 } else { 0 }]));
        let rgb = RgbImage::from_fn(40, 20, |x, _| {
            let v = if x < 20 { 255 } else { 0 };
            image::Rgb([v, v, v])
        });
        let (g, c) = (downscale_gray(&gray, (10, 5)), downscale_rgb(&rgb, (10, 5)));
        for (a, b) in g.pixels().zip(c.pixels()) {
            assert_eq!(a[0], b[0]);
        }
        assert_eq!(g.get_pixel(0, 0)[0], 255);
        assert_eq!(g.get_pixel(9, 0)[0], 0);
    }
}
