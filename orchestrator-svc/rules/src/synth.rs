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

/// A wall by a window, the scene light paints are judged on: window light from the left falling off across the
/// wall, the soft-edged shadow of a shelf cast on it, fine plaster grain (`grain` false: perfectly smooth, for
/// banding checks), a white skirting board along its foot, a wooden floor and a dark armchair in front.
pub struct WindowWall {
    pub photo: RgbImage,
    /// The wall as a segmenter reports it: whole, including what the chair hides, without the skirting.
    pub wall: GrayImage,
    pub skirting: GrayImage,
    pub chair: GrayImage,
    pub floor: GrayImage,
}

/// Smooth 0 -> 1 between a and b.
fn smoothstep(a: f32, b: f32, x: f32) -> f32 {
    let t = ((x - a) / (b - a)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

pub fn window_wall(w: u32, h: u32, grain: bool) -> WindowWall {
    let (wf, hf) = (w as f32, h as f32);
    let (skirt0, floor0) = (0.72 * hf, 0.78 * hf);
    let (cx0, cx1, cy0) = (0.12 * wf, 0.34 * wf, 0.48 * hf);
    let mut photo = RgbImage::new(w, h);
    let [mut wall, mut skirting, mut chair, mut floor] =
        std::array::from_fn(|_| GrayImage::new(w, h));
    for y in 0..h {
        for x in 0..w {
            let (u, v) = (x as f32 / wf, y as f32 / hf);
            // Window light from the left edge: full at the window, about half by the far side.
            let window = 0.42 + 0.58 / (1.0 + (u / 0.5).powi(2)) * (1.0 - 0.15 * (v - 0.35).abs());
            // A shelf's shadow: a slanted band whose edges soften over ~4 % of the width (a penumbra).
            let d = u - 0.55 - 0.25 * v;
            let band = smoothstep(-0.04, 0.0, d) * (1.0 - smoothstep(0.14, 0.18, d));
            let vert = smoothstep(0.08, 0.14, v) * (1.0 - smoothstep(0.55, 0.62, v));
            let light = window * (1.0 - 0.5 * band * vert);
            let g = if grain {
                1.0 + 0.03 * noise(x, y, 21) + 0.025 * noise(x / 3, y / 3, 22)
            } else {
                1.0
            };
            let wall_c = [222.0, 214.0, 200.0].map(|c: f32| c * light * g);
            let skirt_c = [238.0, 236.0, 230.0].map(|c: f32| c * light);
            let plank = ((x as f32 / (wf / 7.0)).floor() as u32).wrapping_mul(5) % 4;
            let floor_c = [140.0, 98.0, 62.0].map(|c: f32| c * light * (0.8 + 0.06 * plank as f32));
            let chair_c = [70.0, 48.0, 40.0].map(|c: f32| c * (0.8 + 0.2 * light));
            let f_skirt = cover(y as f32, skirt0, floor0);
            let f_floor = cover(y as f32, floor0, hf);
            let f_wall = 1.0 - f_skirt - f_floor;
            let f_chair = cover(x as f32, cx0, cx1) * cover(y as f32, cy0, hf);
            let bg: [f32; 3] = std::array::from_fn(|k| {
                wall_c[k] * f_wall + skirt_c[k] * f_skirt + floor_c[k] * f_floor
            });
            let px: [f32; 3] =
                std::array::from_fn(|k| bg[k] * (1.0 - f_chair) + chair_c[k] * f_chair);
            photo.put_pixel(x, y, Rgb(px.map(|c| c.round().clamp(0.0, 255.0) as u8)));
            let q = |f: f32| Luma([(f * 255.0).round() as u8]);
            wall.put_pixel(x, y, q(f_wall));
            skirting.put_pixel(x, y, q(f_skirt));
            floor.put_pixel(x, y, q(f_floor));
            chair.put_pixel(x, y, q(f_chair));
        }
    }
    WindowWall {
        photo,
        wall,
        skirting,
        chair,
        floor,
    }
}
