//! From request bytes to the vision encoder's input: decode, EXIF orientation, antialiased resize, and (for exports
//! that take float pixels) normalisation.
//!
//! Matches the reference pipeline (PIL `exif_transpose`, `resize((S, S), BILINEAR)`, `(x / 255 - 0.5) / 0.5`, CHW):
//! the aspect ratio is NOT kept, and the resize is a convolution whose support widens on downscale (antialiasing),
//! which a plain 4-tap bilinear would not match on large photos. Exports since 2026-11-30 normalise inside the graph:
//! for them the resizer's bytes are the input, as they are.

use std::io::Cursor;

use fast_image_resize::{
    FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image as FirImage,
};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use ndarray::{Array3, ArrayView3, Axis, Zip};

use crate::error::{Error, Violation};
use crate::model::manifest::ImageInput;

/// One S x S image as the vision graph takes it (`ImageInput`).
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    /// [S, S, 3] RGB bytes, as the resizer wrote them.
    U8Hwc(Vec<u8>),
    /// [3, S, S] normalised pixels.
    F32Chw(Vec<f32>),
}

impl Pixels {
    /// The images of a batch, one after the other. All are of one kind (one preprocessor made them).
    pub fn concat<'a>(images: impl ExactSizeIterator<Item = &'a Pixels>) -> Option<Pixels> {
        let mut images = images.peekable();
        let mut batch = match images.peek()? {
            Pixels::U8Hwc(first) => Pixels::U8Hwc(Vec::with_capacity(first.len() * images.len())),
            Pixels::F32Chw(first) => Pixels::F32Chw(Vec::with_capacity(first.len() * images.len())),
        };
        for image in images {
            match (&mut batch, image) {
                (Pixels::U8Hwc(all), Pixels::U8Hwc(one)) => all.extend_from_slice(one),
                (Pixels::F32Chw(all), Pixels::F32Chw(one)) => all.extend_from_slice(one),
                _ => return None,
            }
        }
        Some(batch)
    }

    /// Values per image: 3 x S x S either way.
    pub fn len(&self) -> usize {
        match self {
            Pixels::U8Hwc(v) => v.len(),
            Pixels::F32Chw(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The longest side an image may have (the JPEG format's own limit). Within the pixel limit a side can otherwise be
/// millions of pixels (a 50,000,000 x 1 PNG is a few KB), and the resize's coefficients and the RLE masks' column
/// tables grow with the side, not with the pixels: gigabytes for one such request.
pub const MAX_SIDE: u32 = 65_535;

/// The model's view of one photo.
#[derive(Debug)]
pub struct Prepared {
    pub pixels: Pixels,
    /// Size after EXIF orientation: boxes and RLE masks are in these pixels.
    pub width: u32,
    pub height: u32,
}

pub struct Preprocessor {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub max_pixels: u64,
    /// What the vision graph takes: the resized bytes, or normalised floats.
    pub input: ImageInput,
}

impl Preprocessor {
    pub fn from_encoded(&self, bytes: &[u8]) -> Result<Prepared, Error> {
        let rgb = self.decode(bytes)?;
        self.prepare(rgb)
    }

    pub fn from_rgb(&self, width: u32, height: u32, data: Vec<u8>) -> Result<Prepared, Error> {
        let rgb = self.rgb(width, height, data)?;
        self.prepare(rgb)
    }

    /// Raw RGB pixels checked against the limits and their stated size (no copy): `decode`'s counterpart.
    pub fn rgb(&self, width: u32, height: u32, data: Vec<u8>) -> Result<RgbImage, Error> {
        let violations = self.rgb_violations(width, height, data.len());
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations));
        }
        RgbImage::from_raw(width, height, data)
            .ok_or_else(|| Error::invalid("image.rgb.data", "bad size"))
    }

    /// What is wrong with raw RGB of this size and byte count (nothing: empty). O(1), so Segment's field checks
    /// report it with the others, before the call waits for anything.
    pub fn rgb_violations(&self, width: u32, height: u32, len: usize) -> Vec<Violation> {
        let mut violations = Vec::new();
        if width == 0 || height == 0 {
            violations.push(Violation::new(
                "image.rgb.width",
                "width and height must be positive",
            ));
        }
        let pixels = u64::from(width) * u64::from(height);
        if width.max(height) > MAX_SIDE {
            violations.push(Violation::new(
                "image.rgb",
                format!("{width}x{height}: sides are limited to {MAX_SIDE} px"),
            ));
        } else if pixels > self.max_pixels {
            violations.push(Violation::new(
                "image.rgb",
                format!(
                    "{width}x{height} is {pixels} pixels, over the limit of {}",
                    self.max_pixels
                ),
            ));
        }
        if violations.is_empty() && len as u64 != pixels * 3 {
            violations.push(Violation::new(
                "image.rgb.data",
                format!(
                    "{len} bytes given, {width}x{height} RGB needs {}",
                    pixels * 3
                ),
            ));
        }
        violations
    }

    /// Decodes JPEG, PNG or WebP with the pixel limit checked from the header, before any pixel buffer exists.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage, Error> {
        let bad = |m: String| Error::invalid("image.encoded", m);
        if bytes.is_empty() {
            return Err(bad("no image bytes".into()));
        }
        let format = image::guess_format(bytes)
            .map_err(|_| bad("not a JPEG, PNG or WebP image (unrecognised header)".into()))?;
        if !matches!(
            format,
            ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP
        ) {
            return Err(bad(format!(
                "{format:?} is not supported; send JPEG, PNG or WebP"
            )));
        }
        if format == ImageFormat::Jpeg && !palette_service_kit::image_input::jpeg_is_complete(bytes)
        {
            return Err(bad(
                "corrupt or truncated Jpeg image: its markers end before the end-of-image marker"
                    .into(),
            ));
        }
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        // Headroom for the decoder's own buffers: 16-bit RGBA (a PNG's widest layout, 8 bytes a pixel) at the pixel
        // limit plus a little; at 4 bytes a pixel a 16-bit PNG over about half the limit was refused as corrupt.
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8).saturating_add(64 << 20));
        reader.limits(limits);
        let mut decoder = reader
            .into_decoder()
            .map_err(|e| bad(format!("cannot read the {format:?} header: {e}")))?;
        let (w, h) = decoder.dimensions();
        let pixels = u64::from(w) * u64::from(h);
        if w.max(h) > MAX_SIDE {
            return Err(bad(format!("{w}x{h}: sides are limited to {MAX_SIDE} px")));
        }
        if pixels > self.max_pixels {
            return Err(bad(format!(
                "{w}x{h} is {pixels} pixels, over the limit of {}",
                self.max_pixels
            )));
        }
        let orientation = decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms);
        let mut image = DynamicImage::from_decoder(decoder)
            .map_err(|e| bad(format!("corrupt or truncated {format:?} image: {e}")))?;
        image.apply_orientation(orientation);
        Ok(palette_service_kit::image_input::rgb_on_white(image))
    }

    pub fn prepare(&self, rgb: RgbImage) -> Result<Prepared, Error> {
        let (width, height) = rgb.dimensions();
        let resized = self.resize(rgb)?;
        let pixels = match self.input {
            ImageInput::U8Hwc => Pixels::U8Hwc(resized),
            ImageInput::F32Chw => Pixels::F32Chw(self.normalise(&resized)),
        };
        Ok(Prepared {
            pixels,
            width,
            height,
        })
    }

    /// The S x S RGB bytes of `rgb`. An image already S x S is passed through as it is: the convolution at scale 1
    /// is the identity (its one weight per pixel is 1; `same_size_is_passed_through` checks the resizer's output
    /// equals it), as PIL's `resize` to the same size is a copy, and skipping it saves ~1 ms per 1008² request
    /// (`decode_ms` on a GPU host: the resize was ~1.5 of its 5.5 ms).
    fn resize(&self, rgb: RgbImage) -> Result<Vec<u8>, Error> {
        let (width, height) = rgb.dimensions();
        let s = self.size;
        if (width, height) == (s, s) {
            return Ok(rgb.into_raw());
        }
        let src = FirImage::from_vec_u8(width, height, rgb.into_raw(), PixelType::U8x3)
            .map_err(|e| Error::Inference(format!("resize source: {e}")))?;
        let mut dst = FirImage::new(s, s, PixelType::U8x3);
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        Resizer::new()
            .resize(&src, &mut dst, &options)
            .map_err(|e| Error::Inference(format!("resize: {e}")))?;
        Ok(dst.into_vec())
    }

    /// The image as normalised [3, S, S] floats, whatever the graph takes (the PyTorch references hold these).
    pub fn normalised(&self, pixels: &Pixels) -> Vec<f32> {
        match pixels {
            Pixels::U8Hwc(hwc) => self.normalise(hwc),
            Pixels::F32Chw(chw) => chw.clone(),
        }
    }

    /// Normalised [3, S, S] floats (a PyTorch reference's `pixel_values`) in the form the graph takes; for the u8
    /// input each value goes back to the 8-bit pixel it was made from.
    pub fn from_normalised(&self, chw: &[f32]) -> Pixels {
        match self.input {
            ImageInput::F32Chw => Pixels::F32Chw(chw.to_vec()),
            ImageInput::U8Hwc => {
                let s = self.size as usize;
                let chw = ArrayView3::from_shape((3, s, s), chw).expect("[3, S, S] pixels");
                let mut hwc = Array3::<u8>::zeros((s, s, 3));
                for (c, plane) in chw.outer_iter().enumerate() {
                    let (mean, std) = (self.mean[c], self.std[c]);
                    Zip::from(hwc.index_axis_mut(Axis(2), c))
                        .and(&plane)
                        .for_each(|out, &v| {
                            *out = ((v * std + mean) * 255.0).round().clamp(0.0, 255.0) as u8
                        });
                }
                Pixels::U8Hwc(hwc.into_raw_vec_and_offset().0)
            }
        }
    }

    /// HWC u8 -> CHW f32, (x / 255 - mean) / std, through a 256-entry table per channel. The layout change is an
    /// axis permutation of shape-checked ndarray views: the [S, S, 3] image read channel by channel into [3, S, S].
    fn normalise(&self, hwc: &[u8]) -> Vec<f32> {
        let s = self.size as usize;
        let tables: [[f32; 256]; 3] = std::array::from_fn(|c| {
            std::array::from_fn(|v| (v as f32 / 255.0 - self.mean[c]) / self.std[c])
        });
        let hwc = ArrayView3::from_shape((s, s, 3), hwc).expect("the resizer writes S x S RGB");
        let mut chw = Array3::<f32>::zeros((3, s, s));
        for (c, (mut plane, table)) in chw.outer_iter_mut().zip(&tables).enumerate() {
            Zip::from(&mut plane)
                .and(hwc.index_axis(Axis(2), c))
                .for_each(|out, &v| *out = table[v as usize]);
        }
        let (pixels, offset) = chw.into_raw_vec_and_offset();
        debug_assert_eq!(offset, Some(0));
        pixels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre() -> Preprocessor {
        Preprocessor {
            size: 16,
            mean: [0.5; 3],
            std: [0.5; 3],
            max_pixels: 10_000,
            input: ImageInput::F32Chw,
        }
    }

    fn pre_u8() -> Preprocessor {
        Preprocessor {
            input: ImageInput::U8Hwc,
            ..pre()
        }
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_pixel(w, h, image::Rgb([255, 0, 128]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// A photo already S x S skips the resizer, which would have returned the same bytes: for the shortcut to change
    /// nothing, the resizer at scale 1 must be the identity, on a textured image (a uniform one would hide a blur).
    #[test]
    fn same_size_is_passed_through() {
        let s = pre_u8().size;
        let rgb = RgbImage::from_fn(s, s, |x, y| {
            image::Rgb([
                (x * 37 + y * 11) as u8,
                (x * y * 7) as u8,
                (255 - x * 13) as u8,
            ])
        });
        let prepared = pre_u8().prepare(rgb.clone()).unwrap();
        assert_eq!(prepared.pixels, Pixels::U8Hwc(rgb.as_raw().clone()));

        let src = FirImage::from_vec_u8(s, s, rgb.as_raw().clone(), PixelType::U8x3).unwrap();
        let mut dst = FirImage::new(s, s, PixelType::U8x3);
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        Resizer::new().resize(&src, &mut dst, &options).unwrap();
        assert_eq!(
            dst.buffer(),
            rgb.as_raw().as_slice(),
            "the resizer at scale 1 is not the identity"
        );
        // Float input: the same bytes, normalised.
        let f32 = pre().prepare(rgb.clone()).unwrap();
        assert_eq!(f32.pixels, Pixels::F32Chw(pre().normalise(rgb.as_raw())));
    }

    #[test]
    fn uniform_image_normalises_exactly() {
        let p = pre().from_encoded(&png(40, 30)).unwrap();
        assert_eq!((p.width, p.height), (40, 30));
        let Pixels::F32Chw(pixels) = &p.pixels else {
            panic!("f32 input: {:?}", p.pixels)
        };
        assert_eq!(pixels.len(), 3 * 16 * 16);
        assert!(pixels[..256].iter().all(|v| (*v - 1.0).abs() < 1e-6));
        assert!(pixels[256..512].iter().all(|v| (*v + 1.0).abs() < 1e-6));
    }

    #[test]
    fn u8_input_is_the_resized_bytes_and_converts_both_ways() {
        let p = pre_u8().from_encoded(&png(40, 30)).unwrap();
        let Pixels::U8Hwc(bytes) = &p.pixels else {
            panic!("u8 input: {:?}", p.pixels)
        };
        assert_eq!(bytes.len(), 16 * 16 * 3);
        assert!(bytes.chunks_exact(3).all(|px| px == [255, 0, 128]));
        let floats = pre().from_encoded(&png(40, 30)).unwrap().pixels;
        let Pixels::F32Chw(chw) = &floats else {
            unreachable!()
        };
        assert_eq!(pre_u8().normalised(&p.pixels), *chw);
        assert_eq!(pre_u8().from_normalised(chw), p.pixels);
        assert_eq!(
            Pixels::concat([&p.pixels, &p.pixels].into_iter()).map(|b| b.len()),
            Some(2 * 16 * 16 * 3)
        );
        assert_eq!(Pixels::concat([&p.pixels, &floats].into_iter()), None);
    }

    #[test]
    fn a_side_over_the_limit_is_refused_whatever_the_pixels() {
        let wide = Preprocessor {
            max_pixels: 1_000_000,
            ..pre()
        };
        let err = wide.from_encoded(&png(MAX_SIDE + 1, 1)).unwrap_err();
        assert!(err.to_string().contains("sides are limited"), "{err}");
        let err = wide
            .from_rgb(1, MAX_SIDE + 1, vec![0; 3 * (MAX_SIDE as usize + 1)])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("sides are limited"), "{err}");
        assert!(wide.from_encoded(&png(MAX_SIDE, 1)).is_ok());
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let err = pre().from_encoded(&png(200, 100)).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }

    #[test]
    fn truncated_and_foreign_bytes_are_invalid_arguments() {
        let mut bytes = png(40, 30);
        bytes.truncate(bytes.len() / 2);
        assert!(matches!(
            pre().from_encoded(&bytes),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            pre().from_encoded(b"GIF89a........"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            pre().from_encoded(b"hello"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            pre().from_encoded(&[]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn raw_rgb_length_must_match() {
        assert!(pre().from_rgb(4, 4, vec![0; 48]).is_ok());
        assert!(matches!(
            pre().from_rgb(4, 4, vec![0; 47]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            pre().from_rgb(0, 4, vec![]),
            Err(Error::InvalidArgument(_))
        ));
    }
}
