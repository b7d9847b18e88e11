//! Test support for the rules' row kernels: the inputs they are held to their per-pixel formulations on, and the
//! check that every dispatch level gives the reference's bytes.

use crate::simd::{self, Level};
use crate::synth;
use image::{GrayImage, RgbImage};

/// The synthetic room through a q85 JPEG round trip, so pixels carry codec noise; use odd sizes for loop tails.
pub fn noisy_room(w: u32, h: u32) -> RgbImage {
    let room = synth::room(w, h);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .encode_image(&room.photo)
        .unwrap();
    image::load_from_memory(&jpeg).unwrap().to_rgb8()
}

/// A soft region (noise of `seed`) with alpha-0 margins (`left`, `right`, `top` pixels), a round alpha-0 hole of
/// radius 50 at `hole`, and alpha 0 wherever the noise is below 0.2.
pub fn holey_region(
    (w, h): (u32, u32),
    seed: u32,
    (left, right, top): (u32, u32, u32),
    hole: (i32, i32),
) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        let v = synth::noise(x / 5, y / 5, seed).clamp(0.0, 1.0);
        let margin = x < left || x > w - right || y < top;
        let in_hole = (x as i32 - hole.0).pow(2) + (y as i32 - hole.1).pow(2) < 2500;
        image::Luma([if margin || in_hole || v < 0.2 {
            0
        } else {
            (v * 255.0) as u8
        }])
    })
}

/// Runs `edit` on one thread at the baseline level and at this CPU's, and asserts each result is `want` byte for
/// byte (and not `photo` unchanged).
pub fn assert_every_level_gives(
    want: &RgbImage,
    photo: &RgbImage,
    label: &str,
    edit: impl Fn() -> RgbImage + Sync,
) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for level in [Level::Baseline, simd::detected()] {
        let got = pool.install(|| simd::with_level(level, &edit));
        let diff: Vec<u8> = got
            .iter()
            .zip(want.iter())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = diff.iter().max().unwrap();
        let mean = diff.iter().map(|&d| d as f64).sum::<f64>() / diff.len() as f64;
        assert!(
            *max == 0,
            "{label} at {level:?}: max diff {max}, mean {mean}"
        );
        assert!(&got != photo);
    }
}
