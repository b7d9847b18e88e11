//! Baseline JPEG for what the orchestrator writes (a job's outputs and previews, PreviewEdit's images), with
//! libjpeg-turbo (the `turbojpeg` crate builds its bundled 3.1 source and links it statically).
//!
//! Why not the pure-Rust jpeg-encoder used before: on the same 12 MP outputs (4:2:0, quality 90, one core, best of
//! 5) libjpeg-turbo took 30-36 ms where jpeg-encoder (its AVX2 path on) took 91-99 ms, for files within 0.2 % of the
//! same size; a 12 MP photo writes three outputs, so that was ~14 % of its CPU. libjpeg-turbo is what OpenCV and
//! PIL (the seed worker's) encode with. Standard Huffman tables (no optimisation pass), 4:2:0 chroma, islow DCT:
//! libjpeg-turbo's defaults, as the seed's worker wrote them.

use image::RgbImage;
use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};

/// `img` as a baseline JPEG of `quality` (1-100), chroma at half resolution both ways.
pub fn encode_rgb(img: &RgbImage, quality: u8) -> Result<Vec<u8>, turbojpeg::Error> {
    let (width, height) = (img.width() as usize, img.height() as usize);
    // A compressor is a few KB of libjpeg state: made per image, as images are encoded on whichever blocking
    // thread runs the item (it is not Sync), at ~microseconds against milliseconds of encoding.
    let mut compressor = Compressor::new()?;
    compressor.set_quality(i32::from(quality.clamp(1, 100)))?;
    compressor.set_subsamp(Subsamp::Sub2x2)?;
    compressor.compress_to_vec(Image {
        pixels: img.as_raw().as_slice(),
        width,
        pitch: width * 3,
        height,
        format: PixelFormat::RGB,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_photo_survives_the_round_trip_with_half_resolution_chroma() {
        let img = RgbImage::from_fn(97, 61, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
        });
        let jpeg = encode_rgb(&img, 90).unwrap();
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
        let back = image::load_from_memory(&jpeg).unwrap().into_rgb8();
        assert_eq!(back.dimensions(), (97, 61));
        let mean_error = img
            .as_raw()
            .iter()
            .zip(back.as_raw())
            .map(|(&a, &b)| f64::from(a.abs_diff(b)))
            .sum::<f64>()
            / img.as_raw().len() as f64;
        assert!(mean_error < 2.0, "{mean_error}");
        // SOF0's first component (Y) is sampled 2x2 against the chroma's 1x1: 4:2:0.
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        assert_eq!(jpeg[sof + 11], 0x22, "Y sampling factors");
        assert_eq!(jpeg[sof + 14], 0x11, "Cb sampling factors");
    }
}
