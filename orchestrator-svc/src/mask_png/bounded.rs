//! Stored mask PNGs decoded only within the size they may have. A PNG read back from the bucket is not trusted for
//! its dimensions: anyone who can write the bucket can put a few MB of zeros there that declare hundreds of
//! megapixels, and the image crate's default cap lets one decode allocate 512 MiB, outside the pixel budget.

use std::io::Cursor;

use image::{GrayImage, ImageFormat, ImageReader, Limits};

/// The PNG as 8-bit gray, refused (before any pixel is decoded) when it is wider than `max_width` or taller than
/// `max_height`.
pub fn gray_within(png: &[u8], max_width: u32, max_height: u32) -> Result<GrayImage, String> {
    let mut reader = ImageReader::with_format(Cursor::new(png), ImageFormat::Png);
    let mut limits = Limits::default();
    limits.max_image_width = Some(max_width);
    limits.max_image_height = Some(max_height);
    // Room for a decoder working in 16-bit RGBA, the widest a PNG decodes to, plus its buffers.
    limits.max_alloc = Some(u64::from(max_width) * u64::from(max_height) * 8 + (1 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(|e| {
        format!("not a readable PNG of at most {max_width}x{max_height} pixels: {e}")
    })?;
    Ok(image.into_luma8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        GrayImage::new(width, height)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn a_png_larger_than_it_may_be_is_refused_before_decoding() {
        // 8000x8000 zeros: 64 MB of pixels in ~0.3 MB (better compressors make it far smaller).
        let bomb = png(8000, 8000);
        assert!(bomb.len() < 1_000_000, "{}", bomb.len());
        let started = std::time::Instant::now();
        let err = gray_within(&bomb, 640, 480).unwrap_err();
        assert!(err.contains("at most 640x480"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_millis(200));
        let fits = gray_within(&png(640, 480), 640, 480).unwrap();
        assert_eq!(fits.dimensions(), (640, 480));
    }
}
