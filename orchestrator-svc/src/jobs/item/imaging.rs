//! Decoding (with limits and EXIF orientation) and encoding of the pipeline's images. CPU-bound: call from
//! `spawn_blocking`.

use std::io::Cursor;

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageDecoder, ImageEncoder, ImageReader, RgbImage, RgbaImage};
use palette_rules::icc::Conversion;

use super::error::ItemError;

pub const JPEG_QUALITY: u8 = 90;
pub const PREVIEW_SIZE: u32 = 256;
/// Longest side of an input: JPEG, the outputs' format, stores sides in 16 bits.
pub const MAX_SIDE: u32 = 65_535;

/// Longest side a texture swatch is kept at. A swatch may be any upload of the user's (up to MAX_INPUT_PIXELS), and
/// the texture works on a float copy of it (12 bytes per pixel) outside the pixel budget, which counts photos: a
/// 50 MP swatch would cost ~600 MB per rule. 4096 px still gives a tile spanning a whole 12 MP photo more than one
/// swatch pixel per photo pixel.
pub const MAX_SWATCH_SIDE: u32 = 4096;

/// A swatch decoded as a photo is (`decode_upright`), then scaled down to MAX_SWATCH_SIDE if it is larger.
pub fn decode_swatch(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ItemError> {
    let swatch = decode_upright(bytes, max_pixels)?;
    let (w, h) = swatch.dimensions();
    let long = w.max(h);
    if long <= MAX_SWATCH_SIDE {
        return Ok(swatch);
    }
    let scale = |side: u32| {
        ((u64::from(side) * u64::from(MAX_SWATCH_SIDE)) / u64::from(long)).max(1) as u32
    };
    Ok(crate::resize::downscale_rgb(&swatch, (scale(w), scale(h))))
}

/// Decodes `bytes` to sRGB, upright: the pixel limit is checked from the header before any pixel is decoded, then
/// an embedded ICC profile (Display P3 from phones, Adobe RGB from cameras) is converted to sRGB (see
/// `palette_rules::icc`) and the EXIF orientation (1..=8) is applied, as the segmenter does, so masks and photo
/// line up.
pub fn decode_upright(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ItemError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ItemError::InputCorrupt(format!("cannot read the image header: {e}")))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ItemError::InputCorrupt(format!("cannot read the image size: {e}")))?;
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(ItemError::InputTooLarge(format!(
            "{w}x{h} is {} pixels; the limit is {max_pixels}",
            u64::from(w) * u64::from(h)
        )));
    }
    if w.max(h) > MAX_SIDE {
        // Outputs are JPEGs, whose sides stop at 65535: say so now rather than fail after the work.
        return Err(ItemError::InputTooLarge(format!(
            "{w}x{h}: sides are limited to {MAX_SIDE} px (the JPEG format's limit)"
        )));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ItemError::InputCorrupt(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(decode_allowance(max_pixels));
    reader.limits(limits.clone());
    let corrupt = |e: image::ImageError| ItemError::InputCorrupt(format!("cannot decode: {e}"));
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    // As ImageReader::decode does: the decoded buffer itself must fit the allocation limit.
    limits.reserve(decoder.total_bytes()).map_err(corrupt)?;
    // A profile that cannot be read is no reason to refuse the photo: viewers show it as sRGB, and so do we.
    let icc = decoder.icc_profile().ok().flatten();
    let decoded = decode_pixels(decoder).map_err(corrupt)?;
    let mut rgb = orient(decoded, exif_orientation(bytes)).into_rgb8();
    if let Some(icc) = icc {
        let result = match palette_rules::icc::to_srgb(&mut rgb, &icc) {
            Conversion::Converted => "converted",
            Conversion::AlreadySrgb => "srgb",
            Conversion::Ignored(reason) => {
                tracing::warn!(%reason, "embedded colour profile ignored; the image is read as sRGB");
                "ignored"
            }
        };
        metrics::counter!("orchestrator_color_profiles_total", "result" => result).increment(1);
    }
    Ok(rgb)
}

/// Bytes a decoder may allocate for a photo of at most `max_pixels`: 8 per pixel, the widest layout of the formats
/// read (a 16-bit RGBA PNG), so that every photo within the pixel limit decodes (at 4 per pixel a 16-bit PNG of
/// more than half the limit was refused as corrupt).
fn decode_allowance(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(8).max(64 << 20)
}

/// The decoder's pixels. 8-bit RGB (every JPEG photo) is decoded into a buffer zeroed by writing: `from_decoder`
/// asks for zeroed memory, which jemalloc gives as freshly faulted pages every time (see
/// `palette_rules::mask::zeroed_plane`): ~9k page faults, ~20 ms of CPU, per 12 MP photo.
fn decode_pixels(decoder: impl ImageDecoder) -> image::ImageResult<DynamicImage> {
    if decoder.color_type() != image::ColorType::Rgb8 {
        return DynamicImage::from_decoder(decoder);
    }
    let (w, h) = decoder.dimensions();
    let n = usize::try_from(decoder.total_bytes()).unwrap_or(usize::MAX);
    let mut buf = Vec::new();
    buf.try_reserve_exact(n).map_err(|_| {
        image::ImageError::Limits(image::error::LimitError::from_kind(
            image::error::LimitErrorKind::InsufficientMemory,
        ))
    })?;
    buf.resize(n, 0u8);
    decoder.read_image(&mut buf)?;
    let rgb =
        RgbImage::from_raw(w, h, buf).expect("an 8-bit RGB decoder fills width x height x 3 bytes");
    Ok(DynamicImage::ImageRgb8(rgb))
}

/// Width x height from the image's header (no pixel decoded); 0 when it cannot be read (decoding then says why).
pub fn pixel_count(bytes: &[u8]) -> u64 {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .map_or(0, |(w, h)| u64::from(w) * u64::from(h))
}

/// EXIF orientation tag (1 = upright) of JPEG/PNG/WebP bytes; 1 when absent or unreadable.
pub fn exif_orientation(bytes: &[u8]) -> u32 {
    let Ok(exif) = exif::Reader::new().read_from_container(&mut Cursor::new(bytes)) else {
        return 1;
    };
    exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
        .and_then(|f| f.value.get_uint(0))
        .filter(|o| (1..=8).contains(o))
        .unwrap_or(1)
}

fn orient(img: DynamicImage, orientation: u32) -> DynamicImage {
    match orientation {
        2 => img.fliph(),
        3 => img.rotate180(),
        4 => img.flipv(),
        5 => img.rotate90().fliph(),
        6 => img.rotate90(),
        7 => img.rotate270().fliph(),
        8 => img.rotate270(),
        _ => img,
    }
}

/// Baseline JPEG, 4:2:0, standard Huffman tables (`crate::jpeg`). Chroma at half resolution, as the seed's
/// OpenCV/PIL worker and phone cameras write it: half the blocks of 4:4:4 to transform and code, for outputs within
/// a fraction of a code of 4:4:4's on average (docs/operations.md, orchestrator sizing).
pub fn encode_jpeg(img: &RgbImage) -> Result<Vec<u8>, ItemError> {
    if img.width() > u32::from(u16::MAX) || img.height() > u32::from(u16::MAX) {
        // decode_upright refuses such inputs first; this is the last line of defence.
        return Err(ItemError::Encode {
            what: "JPEG encode",
            source: format!(
                "{}x{} is beyond JPEG's 65535 px sides",
                img.width(),
                img.height()
            )
            .into(),
        });
    }
    crate::jpeg::encode_rgb(img, JPEG_QUALITY).map_err(|e| ItemError::Encode {
        what: "JPEG encode",
        source: e.into(),
    })
}

fn png_encoder(out: &mut Vec<u8>, compression: CompressionType) -> PngEncoder<&mut Vec<u8>> {
    PngEncoder::new_with_quality(out, compression, FilterType::Adaptive)
}

/// A deliverable (a cut-out): zlib's default level, the size users download matters more than the encode time.
pub fn encode_png_rgba(img: &RgbaImage) -> Result<Vec<u8>, ItemError> {
    let mut out = Vec::new();
    png_encoder(&mut out, CompressionType::Default)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgba8,
        )
        .map_err(|e| ItemError::Encode {
            what: "PNG encode",
            source: e.into(),
        })?;
    Ok(out)
}

/// Fits the image inside 256x256 (aspect kept) and encodes it as JPEG. Downscaled as PreviewEdit downscales
/// (`crate::resize::downscale_rgb`: fast_image_resize, antialiased bilinear, SIMD chosen at run time), read in
/// place: image's `imageops::thumbnail` took ~2.6 % of a 1 MP photo's CPU and ~1.7 % of a 12 MP one's.
pub fn preview_jpeg(img: &RgbImage) -> Result<Vec<u8>, ItemError> {
    let (w, h) = img.dimensions();
    let scale = (PREVIEW_SIZE as f64 / w.max(1) as f64)
        .min(PREVIEW_SIZE as f64 / h.max(1) as f64)
        .min(1.0);
    let tw = ((w as f64 * scale).round() as u32).max(1);
    let th = ((h as f64 * scale).round() as u32).max(1);
    encode_jpeg(&crate::resize::downscale_rgb(img, (tw, th)))
}

/// A cut-out seen on white, for its JPEG preview.
pub fn flatten_on_white(img: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b, a] = img.get_pixel(x, y).0;
        let blend = |c: u8| ((c as u32 * a as u32 + 255 * (255 - a as u32) + 127) / 255) as u8;
        image::Rgb([blend(r), blend(g), blend(b)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swatch_is_kept_at_most_max_swatch_side_long() {
        let png = |w: u32, h: u32| {
            let img = RgbImage::from_pixel(w, h, image::Rgb([120, 80, 40]));
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
            out.into_inner()
        };
        let big = decode_swatch(&png(MAX_SWATCH_SIDE * 2, 100), 50_000_000).unwrap();
        assert_eq!(big.dimensions(), (MAX_SWATCH_SIDE, 50));
        assert_eq!(big.get_pixel(10, 10).0, [120, 80, 40]);
        let small = decode_swatch(&png(300, 200), 50_000_000).unwrap();
        assert_eq!(small.dimensions(), (300, 200));
    }

    #[test]
    fn a_16_bit_png_within_the_pixel_limit_decodes() {
        // 2900 x 2900 x 8 bytes is over 64 MB and over 4 bytes for each of 10 M pixels: refused before.
        let (w, h) = (2900, 2900);
        let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
            w,
            h,
            image::Rgba([40_000, 20_000, 10_000, 65_535]),
        );
        let mut png = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgba16(img)
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        let rgb = decode_upright(png.get_ref(), 10_000_000).unwrap();
        assert_eq!(rgb.dimensions(), (w, h));
        assert_eq!(rgb.get_pixel(7, 7).0, [156, 78, 39]);
    }

    #[test]
    fn pixel_limit_is_checked_before_decoding() {
        let img = RgbImage::from_pixel(40, 30, image::Rgb([10, 20, 30]));
        let jpeg = encode_jpeg(&img).unwrap();
        assert!(matches!(
            decode_upright(&jpeg, 1000),
            Err(ItemError::InputTooLarge(_))
        ));
        let back = decode_upright(&jpeg, 1200).unwrap();
        assert_eq!(back.dimensions(), (40, 30));
    }

    #[test]
    fn garbage_is_corrupt() {
        assert!(matches!(
            decode_upright(b"not an image", 1000),
            Err(ItemError::InputCorrupt(_))
        ));
    }

    #[test]
    fn sides_beyond_jpegs_limit_are_refused_as_too_large() {
        // A 70000x1 strip is few pixels but cannot be written back as a JPEG.
        let mut png = Vec::new();
        png_encoder(&mut png, CompressionType::Fast)
            .write_image(
                &vec![0u8; 70_000 * 3],
                70_000,
                1,
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        match decode_upright(&png, 1 << 30) {
            Err(ItemError::InputTooLarge(msg)) => assert!(msg.contains("65535"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    fn jpeg_with_profile(img: &RgbImage, icc: Vec<u8>) -> Vec<u8> {
        use image::codecs::jpeg::JpegEncoder;
        let mut out = Vec::new();
        let mut encoder = JpegEncoder::new_with_quality(&mut out, 100);
        encoder.set_icc_profile(icc).unwrap();
        encoder
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        out
    }

    #[test]
    fn an_embedded_display_p3_profile_is_converted_to_srgb() {
        // A phone's P3 orange: the same numbers in sRGB are a duller colour, so the decoded pixels must move.
        let img = RgbImage::from_pixel(32, 16, image::Rgb([220, 120, 40]));
        let plain = decode_upright(&encode_jpeg(&img).unwrap(), 1 << 20).unwrap();
        let icc = moxcms::ColorProfile::new_display_p3().encode().unwrap();
        let tagged = decode_upright(&jpeg_with_profile(&img, icc), 1 << 20).unwrap();
        let [r0, g0, b0] = plain.get_pixel(8, 8).0;
        let [r, g, b] = tagged.get_pixel(8, 8).0;
        // Display P3 (220, 120, 40) is sRGB (235, 113, 0) by the book (blue clipped): redder, less blue.
        assert!(
            r > r0 + 10 && b + 15 < b0,
            "{:?} -> {:?}",
            [r0, g0, b0],
            [r, g, b]
        );
        let srgb = moxcms::ColorProfile::new_srgb().encode().unwrap();
        let tagged_srgb = decode_upright(&jpeg_with_profile(&img, srgb), 1 << 20).unwrap();
        let plain_100 = decode_upright(&jpeg_with_profile(&img, Vec::new()), 1 << 20).unwrap();
        assert_eq!(tagged_srgb, plain_100, "an sRGB profile changes nothing");
    }

    #[test]
    fn orientation_six_turns_landscape_into_portrait() {
        let img = DynamicImage::ImageRgb8(RgbImage::new(4, 2));
        assert_eq!(orient(img, 6).into_rgb8().dimensions(), (2, 4));
    }

    #[test]
    fn preview_fits_256() {
        let img = RgbImage::new(1000, 500);
        let jpeg = preview_jpeg(&img).unwrap();
        let back = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((back.width(), back.height()), (256, 128));
    }

    #[test]
    fn preview_looks_like_the_photo_scaled_down() {
        // Against image's area-averaging thumbnail (what made previews before): a photo with smooth gradients and a
        // hard edge must come out within a code or two on average, and the edge where it was.
        let img = RgbImage::from_fn(1008, 756, |x, y| {
            let edge = if x * 3 > y * 4 + 300 { 180 } else { 30 };
            image::Rgb([(x / 4) as u8, (y / 3) as u8, edge])
        });
        let preview = image::load_from_memory(&preview_jpeg(&img).unwrap())
            .unwrap()
            .to_rgb8();
        let reference = image::imageops::thumbnail(&img, 256, 192);
        assert_eq!(preview.dimensions(), reference.dimensions());
        let diff: u64 = preview
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(a, b)| u64::from(a.abs_diff(*b)))
            .sum();
        let mean = diff as f64 / preview.as_raw().len() as f64;
        assert!(mean < 2.0, "mean |diff| {mean:.2} codes");
    }

    #[test]
    #[ignore = "a measurement: cargo test --release -p orchestrator-svc --lib preview_downscale -- --ignored --nocapture"]
    fn preview_downscale_against_thumbnail() {
        for (w, h) in [(1008u32, 756u32), (4032, 3024)] {
            let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
            let best = |f: &dyn Fn() -> RgbImage| {
                (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        std::hint::black_box(f());
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .fold(f64::MAX, f64::min)
            };
            let (tw, th) = (256, 192);
            let thumb = best(&|| image::imageops::thumbnail(&img, tw, th));
            let fir = best(&|| crate::resize::downscale_rgb(&img, (tw, th)));
            println!(
                "{w}x{h} -> {tw}x{th}: thumbnail {thumb:.2} ms, fast_image_resize {fir:.2} ms"
            );
        }
    }
}
