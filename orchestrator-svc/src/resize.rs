//! Antialiased downscaling of photos and masks with fast_image_resize (SIMD chosen at run time): PreviewEdit's
//! photos and masks, the jobs' 256 px previews, and the photo the segmenter is sent when it is larger than the
//! model's input. The filter is the segmenter's own (convolution, bilinear, support widened on downscale), so an
//! image downscaled here to the model's input is what the segmenter would have made of the original.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{GrayImage, RgbImage};

/// Antialiased (area-weighted bilinear) downscale, the same for photos and masks so their edges stay aligned.
fn resize(src: &[u8], from: (u32, u32), to: (u32, u32), pixel: PixelType) -> Vec<u8> {
    if from == to {
        return src.to_vec();
    }
    // Read in place: a copy of the source (36 MB for a 12 MP photo, all fresh pages) was a tenth of a cold preview.
    let src = ImageRef::new(from.0, from.1, src, pixel).expect("buffer matches its size");
    let mut dst = Image::new(to.0, to.1, pixel);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("same pixel type on both sides");
    dst.into_vec()
}

pub fn downscale_rgb(img: &RgbImage, to: (u32, u32)) -> RgbImage {
    let data = resize(img.as_raw(), img.dimensions(), to, PixelType::U8x3);
    RgbImage::from_raw(to.0, to.1, data).expect("resized buffer")
}

pub fn downscale_gray(img: &GrayImage, to: (u32, u32)) -> GrayImage {
    let data = resize(img.as_raw(), img.dimensions(), to, PixelType::U8);
    GrayImage::from_raw(to.0, to.1, data).expect("resized buffer")
}
