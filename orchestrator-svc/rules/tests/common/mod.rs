//! Shared helpers for the integration tests: synthetic inputs and image statistics.
#![allow(dead_code)]

use palette_rules::color::{srgb8_to_lab, to_linear};
use palette_rules::filter::{Plane, gaussian};
use palette_rules::synth::noise;
use palette_rules::{GrayImage, RgbImage};

/// A plaster wall: off-white, lit from the upper left (smooth fall-off), with fine grain and a soft shadow band.
pub fn shaded_wall(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
        let light = 1.0 - 0.4 * ((u - 0.1).powi(2) + (v - 0.1).powi(2)).sqrt();
        let shadow = 1.0 - 0.25 * (-((u - 0.7) / 0.08).powi(2)).exp();
        let grain = 0.05 * noise(x, y, 9) + 0.04 * noise(x / 3, y / 3, 10);
        let s = light * shadow * (1.0 + grain);
        image::Rgb([232.0, 226.0, 212.0].map(|c: f32| (c * s).round().clamp(0.0, 255.0) as u8))
    })
}

/// A soft-edged ellipse mask covering the middle of the image; alpha 0 in the corners.
pub fn ellipse(w: u32, h: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        let (u, v) = (
            (x as f32 + 0.5) / w as f32 - 0.5,
            (y as f32 + 0.5) / h as f32 - 0.5,
        );
        let d = (u * u / 0.16 + v * v / 0.16).sqrt();
        image::Luma([((1.0 - d) * 20.0 * 255.0).clamp(0.0, 255.0) as u8])
    })
}

pub fn lab_plane(img: &RgbImage, ch: usize) -> Plane {
    let (w, h) = img.dimensions();
    Plane {
        w: w as usize,
        h: h as usize,
        data: img.pixels().map(|p| srgb8_to_lab(p.0)[ch]).collect(),
    }
}

/// Lightness minus its Gaussian blur: the local shading and texture a recolour must keep.
pub fn high_pass_l(img: &RgbImage) -> Vec<f32> {
    let l = lab_plane(img, 0);
    let b = gaussian(&l, 3.0);
    l.data.iter().zip(&b.data).map(|(a, b)| a - b).collect()
}

pub fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&v| v as f64).sum::<f64>() / n,
        b.iter().map(|&v| v as f64).sum::<f64>() / n,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

pub fn median(mut v: Vec<f32>) -> f32 {
    let k = v.len() / 2;
    *v.select_nth_unstable_by(k, f32::total_cmp).1
}

pub fn mean_lum(img: &RgbImage, pick: impl Fn(u32, u32) -> bool) -> f32 {
    let (mut s, mut n) = (0.0, 0.0);
    for (x, y, p) in img.enumerate_pixels() {
        if pick(x, y) {
            s += 0.2126 * to_linear(p[0]) + 0.7152 * to_linear(p[1]) + 0.0722 * to_linear(p[2]);
            n += 1.0;
        }
    }
    s / n
}

/// PSNR (dB) over the pixels where `mask` > 0.
pub fn psnr_on(a: &RgbImage, b: &RgbImage, mask: &GrayImage) -> f64 {
    let (mut se, mut n) = (0.0f64, 0.0f64);
    for ((pa, pb), m) in a.pixels().zip(b.pixels()).zip(mask.pixels()) {
        if m[0] > 0 {
            for k in 0..3 {
                se += (pa[k] as f64 - pb[k] as f64).powi(2);
            }
            n += 3.0;
        }
    }
    10.0 * (255.0f64 * 255.0 / (se / n).max(1e-9)).log10()
}
