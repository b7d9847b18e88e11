//! What both services do the same way with an uploaded photo, so that the segmenter's masks and the orchestrator's
//! outputs are of the same picture: whether a JPEG file holds a whole image (the JPEG decoder fills a truncated scan
//! with grey and reports success; a cut-off upload must be refused instead), and how a transparent photo becomes RGB
//! (on white).

use image::{DynamicImage, RgbImage, RgbaImage};

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
    let (w, h) = rgba.dimensions();
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for p in rgba.pixels() {
        let [r, g, b, a] = p.0;
        let a = u32::from(a);
        let blend = |c: u8| ((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
        rgb.extend_from_slice(&[blend(r), blend(g), blend(b)]);
    }
    RgbImage::from_raw(w, h, rgb).expect("w x h x 3 bytes")
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
