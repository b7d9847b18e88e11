//! The compact layout of stored instance masks (`MASK_LAYOUT=grid`): the instance's soft mask exactly as the model
//! answered it, at the model's mask resolution over the whole photo (288x288 for the SAM3 export, 48x48 for the
//! bundled tiny model), with the rectangle of the photo where it is non-zero. The full-resolution mask a job uses is
//! this grid interpolated bilinearly to the photo's size (half-pixel centres, edges clamped:
//! `palette_rules::mask::InstanceUpsampler`) and zeroed outside that rectangle, so the grid holds the same
//! information as the photo-resolution crop (`crate::mask_png`) in a fraction of the bytes and of the CPU: a 12 MP
//! photo's crops are tens of millions of interpolated pixels to PNG-encode, its grids a few hundred thousand.
//!
//! The PNG is the grid (8-bit grayscale, `grid_width` x `grid_height`) with a `tEXt` chunk, keyword `placement`,
//! whose text is JSON: `{"x":..,"y":..,"width":..,"height":..,"imageWidth":..,"imageHeight":..}` (the rectangle
//! and the photo's size, upright, full resolution). The job's mask entries say the same, plus `gridWidth` and
//! `gridHeight`. docs/api.md shows a client composing it.

use image::GrayImage;
use palette_rules::mask::{InstanceUpsampler, ModelMask, PixelBox};
use serde::{Deserialize, Serialize};

use crate::mask_png;

/// Where a grid mask is non-zero in the photo, and the photo's size (upright, full resolution).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GridPlacement {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub image_width: u32,
    pub image_height: u32,
}

impl GridPlacement {
    /// The rectangle fits the photo and is not empty.
    fn is_valid(&self) -> bool {
        self.width > 0
            && self.height > 0
            && u64::from(self.x) + u64::from(self.width) <= u64::from(self.image_width)
            && u64::from(self.y) + u64::from(self.height) <= u64::from(self.image_height)
    }
}

/// The `tEXt` keyword of the placement.
const KEYWORD: &[u8] = b"placement";

/// The stored PNG of a model-resolution mask (`probs`: `grid_width` x `grid_height`, row-major) placed at `at`.
pub fn encode(probs: &[u8], (grid_width, grid_height): (u32, u32), at: &GridPlacement) -> Vec<u8> {
    let mut text = KEYWORD.to_vec();
    text.push(0);
    text.extend(serde_json::to_vec(at).expect("plain numbers serialise"));
    let w = grid_width as usize;
    mask_png::encode_png((grid_width, grid_height), &[(b"tEXt", &text)], |r, out| {
        let start = r as usize * w;
        out.copy_from_slice(&probs[start..start + w]);
    })
}

/// The placement of a grid mask PNG; None for any other PNG (a crop, a full-frame mask) or bytes that are not one.
pub fn read_placement(png: &[u8]) -> Option<GridPlacement> {
    let text = mask_png::chunk_before_image(png, b"tEXt")?;
    let json = text.strip_prefix(KEYWORD)?.strip_prefix(b"\0")?;
    serde_json::from_slice(json).ok()
}

/// Calls `row(y, x, pixels)` for every row of `at`'s rectangle of the full-resolution mask interpolated from `grid`,
/// top to bottom: the same bytes as the job that stored the grid computed (`InstanceUpsampler::row_writer`), which
/// depend on the photo's size and the column range, not on the instance's box.
pub fn upsample_rows(grid: &GrayImage, at: &GridPlacement, mut row: impl FnMut(u32, u32, &[u8])) {
    let model = ModelMask {
        width: grid.width(),
        height: grid.height(),
        probs: grid.as_raw(),
    };
    let rect = PixelBox {
        x0: at.x as f32,
        y0: at.y as f32,
        x1: (at.x + at.width) as f32,
        y1: (at.y + at.height) as f32,
    };
    let up = InstanceUpsampler::new(&model, rect, at.image_width, at.image_height);
    let mut rows = up.row_writer(at.x, at.width as usize);
    let mut buf = vec![0u8; at.width as usize];
    for y in at.y..at.y + at.height {
        rows.row(y, &mut buf);
        row(y, at.x, &buf);
    }
}

/// The largest side a stored grid may have: model masks are a few hundred pixels (288 for SAM3).
const MAX_GRID_SIDE: u32 = 4096;

/// Decodes a grid mask PNG and checks it against its placement and the photo it is used on (`width` x `height`).
pub fn decode(
    png: &[u8],
    at: &GridPlacement,
    width: u32,
    height: u32,
) -> Result<GrayImage, String> {
    if (at.image_width, at.image_height) != (width, height) {
        return Err(format!(
            "stored for a {}x{} photo, used on a {width}x{height} one",
            at.image_width, at.image_height
        ));
    }
    if !at.is_valid() {
        return Err(format!("its placement {at:?} does not fit its photo"));
    }
    // A model's mask grid (288x288 for SAM3); anything far larger is not one.
    let grid = super::bounded::gray_within(png, MAX_GRID_SIDE, MAX_GRID_SIDE)?;
    if grid.width() == 0 || grid.height() == 0 {
        return Err("an empty grid".into());
    }
    Ok(grid)
}

/// The full-frame mask of a grid mask PNG in a `width` x `height` photo (`mask_png::compose` for this layout).
pub fn compose(
    png: &[u8],
    at: &GridPlacement,
    width: u32,
    height: u32,
) -> Result<GrayImage, String> {
    let grid = decode(png, at, width, height)?;
    let mut full = palette_rules::mask::zeroed_plane(width, height);
    let w = width as usize;
    upsample_rows(&grid, at, |y, x, pixels| {
        let start = y as usize * w + x as usize;
        full.as_mut()[start..start + pixels.len()].copy_from_slice(pixels);
    });
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soft_grid(w: u32, h: u32) -> Vec<u8> {
        (0..w * h)
            .map(|k| {
                let (x, y) = ((k % w) as f32, (k / w) as f32);
                let d = ((x - 7.0).powi(2) + (y - 5.0).powi(2)).sqrt();
                (230.0 - 45.0 * d).clamp(0.0, 255.0) as u8
            })
            .collect()
    }

    #[test]
    fn a_grid_composes_to_the_crop_the_job_would_have_stored() {
        let (gw, gh, w, h) = (16u32, 12u32, 403u32, 301u32);
        let probs = soft_grid(gw, gh);
        let model = ModelMask {
            width: gw,
            height: gh,
            probs: &probs,
        };
        let bbox = PixelBox {
            x0: 60.0,
            y0: 40.0,
            x1: 250.0,
            y1: 220.0,
        };
        // The crop layout's full-frame mask: rows of the nonzero bounds, as instance_masks writes them.
        let up = InstanceUpsampler::new(&model, bbox, w, h);
        let b = up.nonzero_bounds();
        let mut expected = GrayImage::new(w, h);
        let mut rows = up.row_writer(b.x0, b.width() as usize);
        for y in b.y0..b.y1 {
            let start = (y * w + b.x0) as usize;
            rows.row(y, &mut expected.as_mut()[start..start + b.width() as usize]);
        }
        assert!(expected.as_raw().iter().any(|&v| v > 0));

        let at = GridPlacement {
            x: b.x0,
            y: b.y0,
            width: b.width(),
            height: b.height(),
            image_width: w,
            image_height: h,
        };
        let png = encode(&probs, (gw, gh), &at);
        assert_eq!(read_placement(&png), Some(at));
        assert_eq!(
            mask_png::read_offset(&png),
            None,
            "no oFFs: the grid is not in photo pixels"
        );
        let decoded = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(decoded.as_raw(), &probs, "the model's values, unchanged");
        assert!(mask_png::compose(&png, w, h).unwrap() == expected);

        // Used on another photo size, or with a rectangle past the photo: refused.
        assert!(mask_png::compose(&png, w + 1, h).is_err());
        let bad = GridPlacement { x: w - 2, ..at };
        assert!(mask_png::compose(&encode(&probs, (gw, gh), &bad), w, h).is_err());
    }

    #[test]
    fn a_crop_png_has_no_grid_placement() {
        let png = mask_png::encode_crop(&GrayImage::new(4, 4), mask_png::Placement::EMPTY);
        assert_eq!(read_placement(&png), None);
        assert_eq!(read_placement(b"not a png"), None);
    }
}

#[cfg(test)]
mod sample {
    use super::*;

    #[test]
    #[ignore = "writes a grid PNG and its composed mask for checking a client's resize: \
                MASK_GRID_SAMPLE=/tmp/g cargo test -p orchestrator-svc --lib grid_sample -- --ignored"]
    fn grid_sample() {
        let dir = std::path::PathBuf::from(std::env::var("MASK_GRID_SAMPLE").unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        let (gw, gh, w, h) = (48u32, 48u32, 4032u32, 3024u32);
        let mut seed = 99u32;
        let probs: Vec<u8> = (0..gw * gh)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 24) as u8
            })
            .collect();
        let at = GridPlacement {
            x: 300,
            y: 200,
            width: 3000,
            height: 2500,
            image_width: w,
            image_height: h,
        };
        let png = encode(&probs, (gw, gh), &at);
        std::fs::write(dir.join("grid.png"), &png).unwrap();
        compose(&png, &at, w, h)
            .unwrap()
            .save(dir.join("full.png"))
            .unwrap();
    }
}
