//! Stored instance masks as PNG. Three layouts (`MASK_LAYOUT`): the model's grid (`grid`, the default), the
//! full-frame mask (`full`, as the seed stored it: a plain PNG of the photo's size) and the crop written here: each
//! instance is its crop to its non-zero pixels (soft 8-bit grayscale, the values of the full-frame mask unchanged),
//! with its placement in the photo in a standard PNG `oFFs` chunk (unit: pixel) and in the job's mask entries
//! (`MaskKey`, the callback's `masks`). Pasting the crop at (x, y) into a zero image of the photo's size (upright,
//! full resolution) gives the full-frame mask. An instance with no non-zero pixel is a 1x1 zero PNG at (0, 0) as a
//! grid or a crop. `compose` reads all three (a full-frame mask is a crop at (0, 0)).
//!
//! Why crops: an instance is zero outside its box, yet it was stored and encoded as a full-frame plane. What a crop
//! saves depends on how much of the frame the box covers: with the bundled random-weights model the boxes are large
//! and every pixel inside is soft (no 0, no 255), so orchestrator-bench's 12 MP photos went only from 15.8 to 14.5 MB
//! of mask PNGs per image; the soft values themselves are what costs (see `encode_crop`). The grid stores the values
//! the crop's pixels are interpolated from: 0.1 MB for the same photos.

use image::GrayImage;

use crate::png_rows::{self, Pixels};

pub mod bounded;
pub mod grid;

/// Where a stored mask sits in the photo (upright, full resolution): its top-left pixel and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Placement {
    /// What an all-zero mask is stored as.
    pub const EMPTY: Placement = Placement {
        x: 0,
        y: 0,
        width: 1,
        height: 1,
    };
}

/// The smallest rectangle holding every non-zero pixel of `mask`; None when every pixel is zero.
pub fn nonzero_bounds(mask: &GrayImage) -> Option<Placement> {
    let w = mask.width() as usize;
    if w == 0 || mask.height() == 0 {
        return None;
    }
    // OR-folding a row vectorises; rows of an instance mask are mostly all zero.
    let nonzero = |row: &[u8]| row.iter().fold(0u8, |a, &b| a | b) != 0;
    let rows = || mask.as_raw().chunks_exact(w);
    let y0 = rows().position(nonzero)?;
    let y1 = rows().rposition(nonzero)? + 1;
    let (mut x0, mut x1) = (w, 0);
    for row in rows().skip(y0).take(y1 - y0) {
        // Only the part outside the columns found so far needs looking at.
        if let Some(first) = row[..x0].iter().position(|&v| v != 0) {
            x0 = first;
        }
        if let Some(last) = row[x1..].iter().rposition(|&v| v != 0) {
            x1 += last + 1;
        }
    }
    Some(Placement {
        x: x0 as u32,
        y: y0 as u32,
        width: (x1 - x0) as u32,
        height: (y1 - y0) as u32,
    })
}

/// The `oFFs` chunk's data: x and y as signed 32-bit big-endian, then the unit (0 = pixel).
pub fn offs_chunk(x: u32, y: u32) -> [u8; 9] {
    let (x, y) = (x.min(i32::MAX as u32), y.min(i32::MAX as u32));
    let mut data = [0u8; 9];
    data[..4].copy_from_slice(&x.to_be_bytes());
    data[4..8].copy_from_slice(&y.to_be_bytes());
    data
}

/// Crops `mask` to `at` and encodes it (see `encode_rows`).
pub fn encode_crop(mask: &GrayImage, at: Placement) -> Vec<u8> {
    let (w, inside) = (
        mask.width() as usize,
        at.x + at.width <= mask.width() && at.y + at.height <= mask.height(),
    );
    encode_rows(at, |y, out| {
        if inside {
            let start = y as usize * w + at.x as usize;
            out.copy_from_slice(&mask.as_raw()[start..start + out.len()]);
        } else {
            // Outside the frame (only Placement::EMPTY of an empty frame): zeros.
            out.fill(0);
        }
    })
}

/// Encodes the crop `at` of a mask as an 8-bit grayscale PNG with an `oFFs` chunk, a row at a time: `row(y, out)`
/// fills `out` with photo row y's pixels from column `at.x` on, so no full-frame plane need exist.
///
/// Written here rather than by the png crate (which also uses fdeflate for `Compression::Fast`): every row is
/// Paeth-filtered by a loop that vectorises (`png_rows`) and compressed by fdeflate as one stream. The png crate's adaptive filter chose Paeth for nearly every row of these masks (files within
/// a few bytes) but filtered a byte at a time, and its stream writer copied each row twice: that was ~40 % of a
/// mask's encode (a 12 MP soft instance: 44 -> 26 ms, measured by the ignored test `encode_speed`).
///
/// Smaller files cost CPU (orchestrator-bench, 2026-11-30, CPU-s per 12 MP image of both services / MB of masks per
/// image): fdeflate with the png crate's adaptive filter 2.58 / 14.5; Sub filter + zlib level 1 3.14 / 7.8; Sub +
/// zlib's default level 3.98 / 4.1 (at 1 MP 0.26, 0.39, 0.54 CPU-s). fdeflate's fixed code suits small filter
/// residuals; it matches only runs of zeros, which saturated masks (a real model's) are full of.
pub fn encode_rows(at: Placement, mut row: impl FnMut(u32, &mut [u8])) -> Vec<u8> {
    encode_png(
        (at.width, at.height),
        &[(b"oFFs", &offs_chunk(at.x, at.y))],
        |r, out| row(at.y + r, out),
    )
}

/// An 8-bit grayscale `width` x `height` PNG with `chunks` (type, data) before its image data; `row(r, out)` fills
/// image row r (from 0). Paeth-filtered and compressed as `encode_rows` says (`crate::png_rows`).
pub(crate) fn encode_png(
    size: (u32, u32),
    chunks: &[(&[u8; 4], &[u8])],
    row: impl FnMut(u32, &mut [u8]),
) -> Vec<u8> {
    png_rows::encode(size, Pixels::Gray8, chunks, row)
}

/// The (x, y) of a PNG's `oFFs` chunk when its unit is pixels; None when it has none (a full-frame mask stored
/// before crops) or the bytes are not a PNG.
pub fn read_offset(png: &[u8]) -> Option<(i32, i32)> {
    let data = chunk_before_image(png, b"oFFs")?;
    if data.len() != 9 || data[8] != 0 {
        return None;
    }
    let x = i32::from_be_bytes(data[..4].try_into().ok()?);
    let y = i32::from_be_bytes(data[4..8].try_into().ok()?);
    Some((x, y))
}

/// The data of the first `kind` chunk before the image data (where `oFFs` and our `tEXt` are written); None when
/// there is none or the bytes are not a PNG.
pub(crate) fn chunk_before_image<'p>(png: &'p [u8], kind: &[u8; 4]) -> Option<&'p [u8]> {
    let mut rest = png.strip_prefix(b"\x89PNG\r\n\x1a\n")?;
    while rest.len() >= 12 {
        let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
        let this = &rest[4..8];
        let data = rest.get(8..8 + len)?;
        if this == kind {
            return Some(data);
        }
        if this == b"IDAT" || this == b"IEND" {
            return None;
        }
        rest = rest.get(8 + len + 4..)?;
    }
    None
}

/// The full-frame mask of a stored mask PNG: the crop pasted at its `oFFs` placement ((0, 0) without one) into a
/// zero image of `width` x `height`; a model-grid mask (`crate::mask_png::grid`) interpolated to it. What a client does to
/// use a mask (see docs/api.md).
pub fn compose(png: &[u8], width: u32, height: u32) -> Result<GrayImage, String> {
    if let Some(at) = grid::read_placement(png) {
        return grid::compose(png, &at, width, height);
    }
    let crop = bounded::gray_within(png, width, height)?;
    let (x, y) = read_offset(png).unwrap_or((0, 0));
    let fits = x >= 0
        && y >= 0
        && x as u64 + u64::from(crop.width()) <= u64::from(width)
        && y as u64 + u64::from(crop.height()) <= u64::from(height);
    if !fits {
        return Err(format!(
            "a {}x{} mask at ({x}, {y}) does not fit a {width}x{height} image",
            crop.width(),
            crop.height()
        ));
    }
    let mut full = GrayImage::new(width, height);
    image::imageops::replace(&mut full, &crop, x.into(), y.into());
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::ImageEncoder;

    fn mask(w: u32, h: u32, on: &[(u32, u32, u8)]) -> GrayImage {
        let mut m = GrayImage::new(w, h);
        for &(x, y, v) in on {
            m.put_pixel(x, y, image::Luma([v]));
        }
        m
    }

    #[test]
    fn bounds_are_the_smallest_rectangle_of_non_zero_pixels() {
        assert_eq!(nonzero_bounds(&mask(10, 8, &[])), None);
        assert_eq!(
            nonzero_bounds(&mask(10, 8, &[(3, 2, 1)])),
            Some(Placement {
                x: 3,
                y: 2,
                width: 1,
                height: 1
            })
        );
        // Extremes on different rows, a zero row in between.
        let m = mask(10, 8, &[(5, 1, 9), (2, 4, 200), (9, 6, 3), (4, 7, 255)]);
        assert_eq!(
            nonzero_bounds(&m),
            Some(Placement {
                x: 2,
                y: 1,
                width: 8,
                height: 7
            })
        );
    }

    #[test]
    fn the_png_has_a_pixel_offs_chunk_before_its_image_data_and_composes_back_exactly() {
        let soft: Vec<(u32, u32, u8)> = (0..40)
            .map(|i| (10 + i % 13, 5 + i / 13, (i * 6 + 1) as u8))
            .collect();
        let m = mask(64, 48, &soft);
        let at = nonzero_bounds(&m).unwrap();
        assert_eq!((at.x, at.y, at.width, at.height), (10, 5, 13, 4));
        let png = encode_crop(&m, at);

        // The chunk as the PNG spec lays it out: after IHDR (8 + 25 bytes), length 9, "oFFs", x, y as i32 BE, unit 0
        // (pixel), then its CRC; a decoder accepts the file.
        let chunk = &png[33..33 + 4 + 4 + 9 + 4];
        assert_eq!(&chunk[..8], b"\0\0\0\x09oFFs");
        assert_eq!(&chunk[8..17], &[0, 0, 0, 10, 0, 0, 0, 5, 0]);
        let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
        assert!(idat > 33 + 21, "oFFs precedes IDAT");
        assert_eq!(read_offset(&png), Some((10, 5)));
        let decoded = image::load_from_memory(&png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (13, 4));
        assert_eq!(decoded.color(), image::ColorType::L8);

        assert_eq!(compose(&png, 64, 48).unwrap(), m);
        assert!(compose(&png, 20, 48).is_err(), "a crop past the frame");
    }

    #[test]
    fn soft_masks_of_any_width_decode_to_the_same_pixels() {
        // Every Paeth case (ties included) on soft, saturated and zero pixels; widths around the vector lengths.
        let mut seed = 7u32;
        for (w, h) in [
            (1u32, 1u32),
            (1, 9),
            (2, 3),
            (15, 4),
            (16, 5),
            (17, 7),
            (33, 3),
            (257, 11),
        ] {
            let m = GrayImage::from_fn(w, h, |x, y| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                match (seed >> 28) % 4 {
                    0 => image::Luma([0]),
                    1 => image::Luma([255]),
                    _ => {
                        image::Luma([((x * 7 + y * 13) as u8).wrapping_add((seed >> 20) as u8 & 7)])
                    }
                }
            });
            let at = Placement {
                x: 0,
                y: 0,
                width: w,
                height: h,
            };
            let png = encode_crop(&m, at);
            let back = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
                .unwrap()
                .to_luma8();
            assert_eq!(back, m, "{w}x{h}");
        }
    }

    #[test]
    fn an_empty_mask_is_one_zero_pixel_and_a_full_frame_png_composes_at_the_origin() {
        let png = encode_crop(&mask(30, 20, &[]), Placement::EMPTY);
        assert_eq!(compose(&png, 30, 20).unwrap(), mask(30, 20, &[]));

        // A mask stored before crops: full frame, no oFFs.
        let full = mask(30, 20, &[(7, 3, 128)]);
        let mut old = Vec::new();
        image::codecs::png::PngEncoder::new(&mut old)
            .write_image(full.as_raw(), 30, 20, image::ExtendedColorType::L8)
            .unwrap();
        assert_eq!(read_offset(&old), None);
        assert_eq!(compose(&old, 30, 20).unwrap(), full);
    }
}
