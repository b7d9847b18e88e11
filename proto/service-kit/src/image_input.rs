//! What both services do the same way with an uploaded photo, so that the segmenter's masks and the orchestrator's
//! outputs are of the same picture: whether a JPEG file holds a whole image (the JPEG decoder fills a truncated scan
//! with grey and reports success; a cut-off upload must be refused instead), and how a transparent photo becomes RGB
//! (on white).

use image::{DynamicImage, GrayImage, RgbImage, RgbaImage};

/// The photo as 8-bit RGB, transparent parts on white, as viewers show a cut-out product on a page. Dropping alpha
/// instead (`into_rgb8`) shows whatever colour the transparent pixels hold, black for most encoders, and the
/// segmenter would see an object on black where the user sees it on white.
pub fn rgb_on_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    rgba_on_white(&image.into_rgba8())
}

/// `rgb_on_white` of an 8-bit RGBA image (for a caller that keeps the alpha too).
pub fn rgba_on_white(rgba: &RgbaImage) -> RgbImage {
    split_on_white::<false>(rgba).0
}

/// `rgba_on_white`, and the alpha plane, or None when every pixel is opaque (most PNG screenshots and exports carry a
/// channel of 255s): one pass over the RGBA pixels instead of three (a check for transparency, the blend, the plane).
pub fn rgba_on_white_and_alpha(rgba: &RgbaImage) -> (RgbImage, Option<GrayImage>) {
    split_on_white::<true>(rgba)
}

#[allow(clippy::slow_vector_initialization)] // the point: `vec![0; n]` is the calloc this avoids
fn split_on_white<const ALPHA: bool>(rgba: &RgbaImage) -> (RgbImage, Option<GrayImage>) {
    let (w, h) = rgba.dimensions();
    let n = w as usize * h as usize;
    // Zeroed by writing, not by `vec![0; n]`: see `palette_rules::mask::zeroed_plane` (calloc from jemalloc faults
    // every page in afresh).
    let mut rgb = Vec::with_capacity(n * 3);
    rgb.resize(n * 3, 0u8);
    let mut alpha = Vec::with_capacity(if ALPHA { n } else { 0 });
    if ALPHA {
        alpha.resize(n, 0u8);
    }
    let mut opaque = true;
    for (i, (out, px)) in rgb
        .chunks_exact_mut(3)
        .zip(rgba.as_raw().chunks_exact(4))
        .enumerate()
    {
        let a = px[3];
        if ALPHA {
            alpha[i] = a;
            opaque &= a == 255;
        }
        let transparency = u16::from(255 - a);
        out[0] = on_white(px[0], transparency);
        out[1] = on_white(px[1], transparency);
        out[2] = on_white(px[2], transparency);
    }
    let rgb = RgbImage::from_raw(w, h, rgb).expect("w x h x 3 bytes");
    let alpha = (ALPHA && !opaque).then(|| GrayImage::from_raw(w, h, alpha).expect("w x h bytes"));
    (rgb, alpha)
}

/// A channel value `c` of a pixel `transparency` (255 - alpha) transparent, over white, rounded to nearest:
/// (c * alpha + 255 * (255 - alpha)) / 255 = c + (255 - c) * (255 - alpha) / 255. The second form stays within 16
/// bits, and y / 255 rounded down is (y + (y >> 8) + 1) >> 8 for every y = x + 127 it meets (the test checks them
/// all): 16-bit arithmetic, no division.
#[inline(always)]
fn on_white(c: u8, transparency: u16) -> u8 {
    let x = u16::from(255 - c) * transparency + 127;
    c + ((x + (x >> 8) + 1) >> 8) as u8
}

/// Walks the file's markers from its start: segments by their length, each scan's entropy-coded data up to the next
/// marker (inside it an FF is followed by 00, a restart marker or fill), until the end-of-image marker. Complete
/// when that marker comes after at least one scan. What follows it is not read: phones append a video (Motion
/// Photos), an MPF second image or a vendor trailer there, whose bytes may hold anything, markers included.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    const SOI: u8 = 0xD8;
    const EOI: u8 = 0xD9;
    const SOS: u8 = 0xDA;
    if bytes.len() < 2 || bytes[0] != 0xFF || bytes[1] != SOI {
        return false;
    }
    let mut at = 2;
    let mut scans = 0usize;
    loop {
        // A marker: FF (any number of fill FFs), then its code. Stray bytes before it are skipped, as libjpeg does.
        while at < bytes.len() && bytes[at] != 0xFF {
            at += 1;
        }
        while at < bytes.len() && bytes[at] == 0xFF {
            at += 1;
        }
        let Some(&code) = bytes.get(at) else {
            return false;
        };
        at += 1;
        match code {
            EOI => return scans > 0,
            // Standalone markers: no length follows.
            0x01 | 0xD0..=0xD7 | SOI => continue,
            _ => {}
        }
        let Some(len) = bytes.get(at..at + 2) else {
            return false;
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len < 2 {
            return false;
        }
        at += len;
        if at > bytes.len() {
            return false;
        }
        if code == SOS {
            scans += 1;
            at = scan_end(bytes, at);
        }
    }
}

/// Where the entropy-coded data that starts at `from` ends: the FF of the next marker that is not a restart
/// marker (or the end of the file).
fn scan_end(bytes: &[u8], from: usize) -> usize {
    let mut at = from;
    while let Some(offset) = bytes[at..].iter().position(|&b| b == 0xFF) {
        let ff = at + offset;
        // FF 00 is a stuffed data byte, FF D0..D7 a restart marker, FF FF fill before a marker: all inside the scan.
        match bytes.get(ff + 1) {
            None => return bytes.len(),
            Some(0x00 | 0xD0..=0xD7 | 0xFF) => at = ff + 1,
            Some(_) => return ff,
        }
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparency_becomes_white_and_opaque_pixels_stay() {
        let rgba = image::RgbaImage::from_fn(3, 1, |x, _| match x {
            0 => image::Rgba([0, 0, 0, 0]),
            1 => image::Rgba([200, 100, 50, 255]),
            _ => image::Rgba([0, 0, 0, 128]),
        });
        let rgb = rgb_on_white(DynamicImage::ImageRgba8(rgba));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [200, 100, 50]);
        assert_eq!(rgb.get_pixel(2, 0).0, [127, 127, 127]);
        let opaque = image::RgbImage::from_pixel(2, 2, image::Rgb([1, 2, 3]));
        assert_eq!(
            rgb_on_white(DynamicImage::ImageRgb8(opaque.clone())),
            opaque
        );
    }

    #[test]
    fn every_channel_value_over_every_alpha_is_the_rounded_blend() {
        for a in 0..=255u32 {
            for c in 0..=255u32 {
                let exact = (c * a + 255 * (255 - a) + 127) / 255;
                assert_eq!(
                    u32::from(on_white(c as u8, (255 - a) as u16)),
                    exact,
                    "c {c}, alpha {a}"
                );
            }
        }
    }

    #[test]
    fn the_alpha_plane_comes_only_with_transparency() {
        let opaque = image::RgbaImage::from_pixel(3, 2, image::Rgba([9, 8, 7, 255]));
        let (rgb, alpha) = rgba_on_white_and_alpha(&opaque);
        assert_eq!(
            rgb,
            image::RgbImage::from_pixel(3, 2, image::Rgb([9, 8, 7]))
        );
        assert_eq!(alpha, None);
        let mut cut_out = opaque.clone();
        cut_out.put_pixel(2, 1, image::Rgba([0, 0, 0, 64]));
        let (rgb, alpha) = rgba_on_white_and_alpha(&cut_out);
        assert_eq!(rgb, rgba_on_white(&cut_out));
        assert_eq!(rgb.get_pixel(2, 1).0, [191, 191, 191]);
        let alpha = alpha.expect("one pixel is transparent");
        assert_eq!(alpha.as_raw(), &[255, 255, 255, 255, 255, 64]);
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 13) as u8, (x ^ y) as u8])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn a_whole_jpeg_is_complete_and_any_cut_of_it_is_not() {
        let whole = jpeg(40, 30);
        assert!(jpeg_is_complete(&whole));
        for cut in [
            0,
            1,
            2,
            3,
            20,
            whole.len() / 2,
            whole.len() - 2,
            whole.len() - 1,
        ] {
            assert!(!jpeg_is_complete(&whole[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn bytes_after_the_end_of_image_do_not_matter() {
        let whole = jpeg(40, 30);
        // A Motion Photo's appended video is arbitrary bytes: a start-of-scan with no end-of-image after it among
        // them refused such photos when the check looked for the last scan marker in the file.
        let mut motion_photo = whole.clone();
        motion_photo.extend_from_slice(&[
            0x00, 0x00, 0x00, 0x18, b'f', b't', b'y', b'p', 0xFF, 0xDA, 0x12, 0x34,
        ]);
        assert!(jpeg_is_complete(&motion_photo));
        // A second JPEG appended (MPF), itself cut short: the first image is whole.
        let mut mpf = whole.clone();
        mpf.extend_from_slice(&whole[..whole.len() / 2]);
        assert!(jpeg_is_complete(&mpf));
    }

    #[test]
    fn a_file_without_a_scan_or_start_marker_is_not_an_image() {
        assert!(!jpeg_is_complete(&[0xFF, 0xD8, 0xFF, 0xD9]));
        assert!(!jpeg_is_complete(b"\x89PNG\r\n\x1a\n"));
        assert!(!jpeg_is_complete(&[]));
        // A segment whose length runs past the end.
        assert!(!jpeg_is_complete(&[
            0xFF, 0xD8, 0xFF, 0xE0, 0x40, 0x00, 0x01
        ]));
    }
}
