//! Decoding (with limits and EXIF orientation) and encoding of the pipeline's images. CPU-bound: call from
//! `spawn_blocking`.

use std::io::Cursor;

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{
    DynamicImage, GrayImage, ImageDecoder, ImageEncoder, ImageReader, RgbImage, RgbaImage,
};
use palette_rules::icc::Conversion;

use super::error::ItemError;
use crate::png_rows::Pixels;

pub const JPEG_QUALITY: u8 = 90;
pub const PREVIEW_SIZE: u32 = 256;
/// Longest side of an input: JPEG, the outputs' default format, stores sides in 16 bits.
pub const MAX_SIDE: u32 = 65_535;

/// Longest side a texture swatch is kept at. A swatch may be any upload of the user's (up to MAX_INPUT_PIXELS), and
/// the texture works on a float copy of it (12 bytes per pixel) outside the pixel budget, which counts photos: a
/// 50 MP swatch would cost ~600 MB per rule. 4096 px still gives a tile spanning a whole 12 MP photo more than one
/// swatch pixel per photo pixel.
pub const MAX_SWATCH_SIDE: u32 = 4096;

/// Most pixels a swatch may have, whatever MAX_INPUT_PIXELS allows photos. Its decode runs under the admission of
/// the item that loads it, which counted that item's photo only: a 50 MP 16-bit RGBA upload took ~1 GB to decode
/// and turn upright. 4096² (16.8 MP) stays within ~270 MB at worst (16 bytes per pixel), ~100 MB for 8-bit RGB,
/// about the float copy the texture keeps of it; a long thin swatch is still scaled to MAX_SWATCH_SIDE.
pub const MAX_SWATCH_PIXELS: u64 = MAX_SWATCH_SIDE as u64 * MAX_SWATCH_SIDE as u64;

/// A swatch decoded as a photo is (`decode_upright`, at most MAX_SWATCH_PIXELS), then scaled down to
/// MAX_SWATCH_SIDE if it is larger.
pub fn decode_swatch(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ItemError> {
    let swatch = decode_upright(bytes, max_pixels.min(MAX_SWATCH_PIXELS))?;
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
    decode_photo(bytes, max_pixels).map(|(rgb, _)| rgb)
}

/// `decode_upright`, and the photo's alpha when some of it is transparent (None for every JPEG and every opaque
/// PNG/WebP): a cut-out keeps it (`palette_rules::ops::remove::keep_source_transparency`). 1 byte per pixel more,
/// only for such photos.
pub fn decode_photo(
    bytes: &[u8],
    max_pixels: u64,
) -> Result<(RgbImage, Option<GrayImage>), ItemError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ItemError::InputCorrupt(format!("cannot read the image header: {e}")))?;
    if reader.format().is_none() {
        return Err(ItemError::InputCorrupt(unknown_format(bytes)));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ItemError::InputCorrupt(format!("cannot read the image size: {e}")))?;
    within_limits((w, h), max_pixels)?;
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ItemError::InputCorrupt(e.to_string()))?;
    // The JPEG decoder fills whatever a cut-off file lacks with grey and reports success: refused here as the
    // segmenter refuses it, not painted over as a photo with a grey band.
    if reader.format() == Some(image::ImageFormat::Jpeg)
        && !palette_service_kit::image_input::jpeg_is_complete(bytes)
    {
        return Err(ItemError::InputCorrupt(
            "corrupt or truncated JPEG: its markers end before the end-of-image marker".into(),
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(decode_allowance(max_pixels));
    reader.limits(limits.clone());
    let corrupt = |e: image::ImageError| ItemError::InputCorrupt(format!("cannot decode: {e}"));
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    // As ImageReader::decode does: the decoded buffer itself must fit the allocation limit.
    limits.reserve(decoder.total_bytes()).map_err(corrupt)?;
    // A profile that cannot be read is no reason to refuse the photo: viewers show it as sRGB, and so do we.
    let icc = decoder.icc_profile().ok().flatten();
    // The image crate's EXIF reading, the segmenter's too (`segmenter-svc/src/preprocess.rs`): the photo and the
    // masks computed from its bytes must turn the same way. (A strict EXIF parser gave up on a whole block that had
    // a flaw anywhere, a sub-IFD's link as some phones write it, and read such a photo as upright while the
    // segmenter turned it: masks on the wrong parts of the photo.)
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut decoded = decode_pixels(decoder).map_err(corrupt)?;
    decoded.apply_orientation(orientation);
    // Transparent parts on white, as the segmenter reads them too.
    let (mut rgb, alpha) = if decoded.color().has_alpha() {
        palette_service_kit::image_input::rgba_on_white_and_alpha(&decoded.into_rgba8())
    } else {
        (decoded.into_rgb8(), None)
    };
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
    Ok((rgb, alpha))
}

/// Why bytes of no format read here were refused: an iPhone's HEIC (or an AVIF) is named as such, since the file is a
/// photo and only its format is the problem.
fn unknown_format(bytes: &[u8]) -> String {
    // ISO base media files: a box size, then "ftyp" and the major brand.
    let brand = bytes
        .get(4..12)
        .filter(|b| b.starts_with(b"ftyp"))
        .map(|b| String::from_utf8_lossy(&b[4..]).into_owned());
    match brand.as_deref() {
        Some("heic" | "heix" | "heim" | "heis" | "hevc" | "hevx" | "mif1" | "msf1") => {
            "HEIC/HEIF images are not supported; send JPEG, PNG or WebP (iPhones: Settings > Camera > Formats > Most Compatible)".into()
        }
        Some("avif" | "avis") => "AVIF images are not supported; send JPEG, PNG or WebP".into(),
        _ => "not a JPEG, PNG or WebP image (unrecognised header)".into(),
    }
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

/// Width x height from the image's header (no pixel decoded), what the pixel budget admits it for; 0 when it cannot
/// be read (decoding then says why). A size over the limits is refused here, before the admission: the budget would
/// first have been drained for it (a photo over the budget waits for all of it), by a few bytes of header.
pub fn admissible_pixels(bytes: &[u8], max_pixels: u64) -> Result<u64, ItemError> {
    let size = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok());
    let Some((w, h)) = size else { return Ok(0) };
    within_limits((w, h), max_pixels)?;
    Ok(u64::from(w) * u64::from(h))
}

fn within_limits((w, h): (u32, u32), max_pixels: u64) -> Result<(), ItemError> {
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(ItemError::InputTooLarge(format!(
            "{w}x{h} is {} pixels; the limit is {max_pixels}",
            u64::from(w) * u64::from(h)
        )));
    }
    if w.max(h) > MAX_SIDE {
        // JPEG outputs (the default) stop at 65535 a side: say so now rather than fail after the work.
        return Err(ItemError::InputTooLarge(format!(
            "{w}x{h}: sides are limited to {MAX_SIDE} px (the JPEG format's limit)"
        )));
    }
    Ok(())
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

/// A photo's edit as PNG (`JobSpec.output_format` "png"): with the photo's transparency when it has some (colours
/// taken back off the white it was read on, as for a cut-out), plain RGB otherwise (a quarter less to encode and
/// store than an opaque alpha channel). Written a row at a time (`crate::png_rows`: Paeth and fdeflate, the image
/// crate's fast level), each row built as it is encoded. A fast level: a whole photo is noisy where a cut-out is
/// mostly empty, and on the 640x480 fixture photos zlib's default level took 14 to 15 times as long (35-96 ms
/// against 2.4-6.6 ms, release, one core; extrapolated, seconds per rule at 12 MP) for files 20 % smaller.
pub fn encode_png_keeping(
    img: &RgbImage,
    transparency: Option<&GrayImage>,
) -> Result<Vec<u8>, ItemError> {
    match transparency {
        Some(alpha) => Ok(encode_png_with_alpha(img, alpha)),
        None => {
            let line = img.width() as usize * 3;
            let rgb = img.as_raw();
            Ok(crate::png_rows::encode(
                img.dimensions(),
                Pixels::Rgb8,
                &[],
                |y, row| {
                    row.copy_from_slice(&rgb[y as usize * line..][..line]);
                },
            ))
        }
    }
}

/// The photo's RGB with `alpha` as an RGBA PNG, each row built as it is encoded (`crate::png_rows`): no RGBA copy
/// of the photo per output (4 bytes per pixel, 192 MB at 48 MP, which the image crate's encoder needed).
fn encode_png_with_alpha(img: &RgbImage, alpha: &GrayImage) -> Vec<u8> {
    assert_eq!(
        img.dimensions(),
        alpha.dimensions(),
        "photo and alpha of one photo"
    );
    let w = img.width() as usize;
    let (rgb, alpha) = (img.as_raw(), alpha.as_raw());
    crate::png_rows::encode(img.dimensions(), Pixels::Rgba8, &[], |y, row| {
        let y = y as usize;
        for (d, s) in row
            .chunks_exact_mut(4)
            .zip(rgb[y * w * 3..][..w * 3].chunks_exact(3))
        {
            d[..3].copy_from_slice(s);
            d[3] = 255;
        }
        palette_rules::ops::remove::keep_source_transparency_row(row, &alpha[y * w..][..w]);
    })
}

/// A deliverable (a cut-out): zlib's default level, the size users download matters more than the encode time.
pub fn encode_png_rgba(img: &RgbaImage) -> Result<Vec<u8>, ItemError> {
    encode_png(
        img.as_raw(),
        img.dimensions(),
        image::ExtendedColorType::Rgba8,
        CompressionType::Default,
    )
}

fn encode_png(
    raw: &[u8],
    (width, height): (u32, u32),
    color: image::ExtendedColorType,
    compression: CompressionType,
) -> Result<Vec<u8>, ItemError> {
    let mut out = Vec::new();
    png_encoder(&mut out, compression)
        .write_image(raw, width, height, color)
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

#[cfg(test)]
mod tests;
