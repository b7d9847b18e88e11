//! The image a Segment call carries. The segmenter resizes every image to its model's square input (1008 x 1008
//! for SAM3, aspect ratio not kept); the orchestrator has the upright photo decoded already. A photo larger than
//! that square goes as raw RGB, each side capped at the model's (a 12 MP phone photo: 3 MB of pixels instead of a
//! several-MB JPEG the segmenter decodes again, ~45 ms of its CPU, only to shrink it). Each side is capped on its
//! own, not the long side scaled: the segmenter would stretch a 1008 x 756 image back to 1008 x 1008 and the model
//! would see a quarter less detail vertically; capped per side it sees what it saw from the original (the resize
//! is the segmenter's own filter, `crate::resize`). Masks and boxes come back in the coordinates of the image sent
//! and are scaled to the photo from the reply's image size (`instance_masks::concept_masks`).

use bytes::Bytes;
use palette_proto::segmenter::v1::{RgbImage as RawRgb, image::Source};
use palette_rules::RgbImage;

/// What to send for `photo` (decoded from `encoded`, upright) to a model whose input is `input_size` square:
/// the upload's bytes when the segmenter does not say its size or no side is larger than it (fewer bytes than raw
/// pixels, and a small decode), else the photo downscaled to at most `input_size` per side, as raw RGB.
pub fn segmenter_input(photo: &RgbImage, encoded: &Bytes, input_size: Option<u32>) -> Source {
    let (w, h) = photo.dimensions();
    let Some(size) = input_size.filter(|&s| w > s || h > s) else {
        return Source::Encoded(encoded.to_vec());
    };
    let (tw, th) = (w.min(size), h.min(size));
    let small = crate::resize::downscale_rgb(photo, (tw, th));
    Source::Rgb(RawRgb {
        width: tw,
        height: th,
        data: small.into_raw(),
    })
}

/// Bytes the image takes in the request (metrics, tests).
pub fn image_bytes(source: &Source) -> usize {
    match source {
        Source::Encoded(bytes) => bytes.len(),
        Source::Rgb(rgb) => rgb.data.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]))
    }

    #[test]
    fn large_photos_go_as_raw_rgb_capped_per_side_small_ones_as_uploaded() {
        let encoded = Bytes::from_static(b"jpeg bytes");
        let raw = |source: Source| match source {
            Source::Rgb(rgb) => (rgb.width, rgb.height, rgb.data.len()),
            Source::Encoded(_) => panic!("expected raw RGB"),
        };
        assert_eq!(
            raw(segmenter_input(&photo(400, 300), &encoded, Some(168))),
            (168, 168, 168 * 168 * 3)
        );
        // One side larger than the model's: only that side shrinks.
        assert_eq!(
            raw(segmenter_input(&photo(400, 100), &encoded, Some(168))),
            (168, 100, 168 * 100 * 3)
        );
        for (w, h, size) in [
            (168, 120, Some(168)),
            (100, 100, Some(168)),
            (4000, 3000, None),
        ] {
            match segmenter_input(&photo(w, h), &encoded, size) {
                Source::Encoded(bytes) => assert_eq!(bytes, b"jpeg bytes"),
                Source::Rgb(rgb) => panic!(
                    "{w}x{h} at {size:?} sent as {}x{} raw",
                    rgb.width, rgb.height
                ),
            }
        }
    }
}
