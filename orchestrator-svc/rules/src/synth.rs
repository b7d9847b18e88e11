//! Synthetic test scenes (a shaded room, textured patches) generated in code, so tests, benchmarks and the demo
//! need no committed photos and every number is reproducible.

use image::{GrayImage, Luma, Rgb, RgbImage};

/// Deterministic per-pixel noise in [-1, 1].
pub fn noise(x: u32, y: u32, seed: u32) -> f32 {
    let mut h =
        x.wrapping_mul(0x27d4_eb2d) ^ y.wrapping_mul(0x1656_67b1) ^ seed.wrapping_mul(0x9e37_79b9);
    h ^= h >> 15;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    (h & 0xffff) as f32 / 32767.5 - 1.0
}

pub struct Room {
    pub photo: RgbImage,
    pub wall: GrayImage,
    pub floor: GrayImage,
    pub sofa: GrayImage,
}

/// Coverage of [a, b) by the pixel [p, p+1): anti-aliased edges like a real photo's.
fn cover(p: f32, a: f32, b: f32) -> f32 {
    ((p + 1.0).min(b) - p.max(a)).clamp(0.0, 1.0)
}

/// A room: warm off-white wall lit from the upper left (smooth fall-off plus plaster grain), a wooden floor below
/// the horizon at 68 % height, and a teal sofa standing in front of both.
pub fn room(w: u32, h: u32) -> Room {
    let (wf, hf) = (w as f32, h as f32);
    let horizon = 0.68 * hf;
    let (sx0, sx1, sy0, sy1) = (0.30 * wf, 0.72 * wf, 0.50 * hf, 0.86 * hf);
    let mut photo = RgbImage::new(w, h);
    let (mut wall, mut floor, mut sofa) = (
        GrayImage::new(w, h),
        GrayImage::new(w, h),
        GrayImage::new(w, h),
    );
    for y in 0..h {
        for x in 0..w {
            let (u, v) = (x as f32 / wf, y as f32 / hf);
            let light = 1.0 - 0.45 * ((u - 0.15).powi(2) + (v - 0.1).powi(2)).sqrt();
            let grain = 0.025 * noise(x, y, 1) + 0.02 * noise(x / 4, y / 4, 2);
            let wall_c = [236.0, 228.0, 214.0].map(|c: f32| c * (light + grain));
            let plank = ((x as f32 / (wf / 9.0)).floor() as u32).wrapping_mul(7) % 5;
            let fl = 0.75 + 0.05 * plank as f32 + 0.04 * noise(x / 2, y, 3);
            let depth = 0.7 + 0.3 * ((v - 0.68) / 0.32);
            let floor_c = [150.0, 104.0, 66.0].map(|c: f32| c * fl * depth);
            let shade = 0.8 + 0.3 * (1.0 - (v - sy0 / hf) / 0.36) + 0.02 * noise(x, y, 4);
            let sofa_c = [40.0, 120.0, 128.0].map(|c: f32| c * shade);
            let f_floor = cover(y as f32, horizon, hf);
            let f_sofa = cover(x as f32, sx0, sx1) * cover(y as f32, sy0, sy1);
            let bg: [f32; 3] =
                std::array::from_fn(|k| wall_c[k] * (1.0 - f_floor) + floor_c[k] * f_floor);
            let px: [f32; 3] = std::array::from_fn(|k| bg[k] * (1.0 - f_sofa) + sofa_c[k] * f_sofa);
            photo.put_pixel(x, y, Rgb(px.map(|c| c.round().clamp(0.0, 255.0) as u8)));
            let q = |f: f32| Luma([(f * 255.0).round() as u8]);
            // Masks as a segmenter reports them: each object whole, including parts hidden behind the sofa.
            wall.put_pixel(x, y, q(1.0 - f_floor));
            floor.put_pixel(x, y, q(f_floor));
            sofa.put_pixel(x, y, q(f_sofa));
        }
    }
    Room {
        photo,
        wall,
        floor,
        sofa,
    }
}

/// Downsamples a full-resolution mask to a model-resolution probability grid, the way SAM3 reports it.
pub fn to_model(mask: &GrayImage, mw: u32, mh: u32) -> Vec<u8> {
    image::imageops::resize(mask, mw, mh, image::imageops::FilterType::Triangle).into_raw()
}
