//! What the fake segmenter's masks become on the photo, for the test files that check stored masks against it.

use palette_rules::GrayImage;
use palette_rules::mask::{ModelMask, PixelBox, upsample_instance};

/// The fake segmenter's first instance at full frame: its 32x32 left-half mask upsampled inside the left half of a
/// `w` x `h` photo.
pub fn fake_left_half(w: u32, h: u32) -> GrayImage {
    let probs: Vec<u8> = (0..32 * 32)
        .map(|i| if i % 32 < 16 { 255 } else { 0 })
        .collect();
    let model = ModelMask {
        width: 32,
        height: 32,
        probs: &probs,
    };
    let bbox = PixelBox {
        x0: 0.0,
        y0: 0.0,
        x1: w as f32 / 2.0,
        y1: h as f32,
    };
    upsample_instance(&model, bbox, w, h)
}
