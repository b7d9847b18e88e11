//! Built-in procedural swatches: deterministic (pure functions of the name), seamless 256 px tiles, so a
//! texture rule needs no upload and renders identically on every replica.

use crate::rule::Builtin;
use image::{Rgb, RgbImage};
use std::f32::consts::TAU;

pub const TILE: u32 = 256;

/// Integer hash to [0, 1): cheap, well mixed, and stable across platforms.
fn hash(x: i32, y: i32, seed: u32) -> f32 {
    let mut h = (x as u32).wrapping_mul(0x8da6_b343)
        ^ (y as u32).wrapping_mul(0xd816_3841)
        ^ seed.wrapping_mul(0xcb1a_b31f);
    h ^= h >> 13;
    h = h.wrapping_mul(0x5bd1_e995);
    h ^= h >> 15;
    (h & 0x00ff_ffff) as f32 / 16_777_216.0
}

/// Smooth value noise with lattice period `period` (so tiles wrap without seams).
fn value_noise(x: f32, y: f32, period: i32, seed: u32) -> f32 {
    let (xi, yi) = (x.floor(), y.floor());
    let (fx, fy) = (x - xi, y - yi);
    let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
    let w = |i: i32| i.rem_euclid(period);
    let (x0, y0) = (xi as i32, yi as i32);
    let v = |dx: i32, dy: i32| hash(w(x0 + dx), w(y0 + dy), seed);
    let top = v(0, 0) + sx * (v(1, 0) - v(0, 0));
    let bot = v(0, 1) + sx * (v(1, 1) - v(0, 1));
    top + sy * (bot - top)
}

/// Fractal noise over a tile: `cells` lattice cells across the tile at the first octave.
fn fbm(x: f32, y: f32, cells: i32, octaves: u32, seed: u32) -> f32 {
    let (mut sum, mut amp, mut norm, mut n) = (0.0, 1.0, 0.0, cells);
    for o in 0..octaves {
        let s = n as f32 / TILE as f32;
        sum += amp * value_noise(x * s, y * s, n, seed + o);
        norm += amp;
        amp *= 0.5;
        n *= 2;
    }
    sum / norm
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> Rgb<u8> {
    let t = t.clamp(0.0, 1.0);
    Rgb(std::array::from_fn(|i| {
        (a[i] + t * (b[i] - a[i])).round().clamp(0.0, 255.0) as u8
    }))
}

fn linen(x: f32, y: f32) -> Rgb<u8> {
    // Plain weave: warp and weft alternate every 2 px; each thread has its own slub (thickness) variation.
    let (xi, yi) = (x as i32, y as i32);
    let over = ((xi / 2) + (yi / 2)) % 2 == 0;
    let thread = if over {
        value_noise(y / 2.0, 0.5, 128, 7)
    } else {
        value_noise(x / 2.0, 0.5, 128, 8)
    };
    let t = 0.55 * thread + 0.3 * fbm(x, y, 8, 4, 11) + if over { 0.15 } else { 0.0 };
    mix([170.0, 158.0, 136.0], [226.0, 216.0, 196.0], t)
}

fn wood(x: f32, y: f32) -> Rgb<u8> {
    // Grain runs along x: rings are iso-lines of y warped by low-frequency noise.
    let warp = 6.0 * fbm(x, y, 4, 4, 21);
    let ring = (y / TILE as f32 * 12.0 + warp).fract();
    let t = (ring * TAU).sin() * 0.5 + 0.5;
    let fine = fbm(x, y * 8.0, 64, 2, 23);
    mix(
        [112.0, 70.0, 38.0],
        [196.0, 146.0, 96.0],
        0.75 * t.powf(0.6) + 0.25 * fine,
    )
}

fn marble(x: f32, y: f32) -> Rgb<u8> {
    let turb = fbm(x, y, 4, 5, 31);
    let v = ((x + y) / TILE as f32 * 2.0 * TAU + 9.0 * turb).sin().abs();
    let vein = 1.0 - v.powf(0.25);
    let cloud = fbm(x, y, 8, 3, 37);
    let base = mix([214.0, 212.0, 208.0], [244.0, 243.0, 240.0], cloud);
    let b = [base[0] as f32, base[1] as f32, base[2] as f32];
    mix(b, [120.0, 118.0, 122.0], vein * 1.4)
}

fn herringbone(x: f32, y: f32) -> Rgb<u8> {
    // Columns of 32 px whose planks slant +45 / -45 degrees alternately; 16 px planks, dark joints.
    let (col_w, plank) = (32.0, 16.0);
    let col = (x / col_w).floor();
    let lx = x - col * col_w;
    let d = if col as i32 % 2 == 0 {
        y + lx
    } else {
        y - lx + col_w
    };
    let k = (d / plank).floor();
    let joint = (d / plank).fract() < 0.07 || lx < 1.0;
    let tone = hash(
        col as i32,
        (k as i32).rem_euclid((TILE as f32 / plank) as i32),
        41,
    );
    let grain = fbm(x * 0.5 + y * 0.5, y - x, 32, 2, 43);
    let t = 0.55 * tone + 0.45 * grain;
    if joint {
        Rgb([70, 48, 30])
    } else {
        mix([142.0, 96.0, 58.0], [204.0, 158.0, 108.0], t)
    }
}

fn velvet(x: f32, y: f32) -> Rgb<u8> {
    // Crushed-pile sheen (broad noise) over a fine pile grain.
    let sheen = fbm(x, y, 4, 3, 51);
    let pile = hash(x as i32, y as i32, 53);
    mix(
        [78.0, 20.0, 40.0],
        [150.0, 58.0, 84.0],
        0.8 * sheen.powf(1.5) + 0.2 * pile,
    )
}

/// A swatch decoded to linear light once, ready for sampling (shading multiplies light, not gamma-encoded codes).
pub struct LinearSwatch {
    pub width: u32,
    pub height: u32,
    pub texels: Vec<[f32; 3]>,
    /// Halved copies down to 1x1, built on first use (perspective texturing samples far tiles from them).
    mips: std::sync::OnceLock<Vec<Mip>>,
}

/// Bilinear blend of four neighbouring texels (`[top-left, top-right, bottom-left, bottom-right]`) at fractions
/// (fx, fy): how every texture path samples a swatch.
#[inline]
pub fn bilerp([p, q, r, s]: [[f32; 3]; 4], fx: f32, fy: f32) -> [f32; 3] {
    std::array::from_fn(|c| {
        let top = p[c] + fx * (q[c] - p[c]);
        let bot = r[c] + fx * (s[c] - r[c]);
        top + fy * (bot - top)
    })
}

/// One level of a swatch's mip chain: half the size of the level above (rounded up), averaged by area.
pub struct Mip {
    pub width: u32,
    pub height: u32,
    pub texels: Vec<[f32; 3]>,
}

impl LinearSwatch {
    pub fn from_rgb(img: &RgbImage) -> Self {
        LinearSwatch {
            width: img.width(),
            height: img.height(),
            texels: img
                .pixels()
                .map(|q| q.0.map(crate::color::to_linear))
                .collect(),
            mips: std::sync::OnceLock::new(),
        }
    }

    /// Levels 1.. of the mip chain (level 0 is the swatch itself), each half the size of the one above (rounded
    /// up), down to 1x1. Each texel is the area-weighted mean of the texels it covers, in linear light: a far floor
    /// keeps the swatch's mean brightness and colour exactly, odd sizes included.
    pub fn mips(&self) -> &[Mip] {
        self.mips.get_or_init(|| {
            let mut levels: Vec<Mip> = Vec::new();
            let (mut w, mut h) = (self.width, self.height);
            while w > 1 || h > 1 {
                let src = levels.last().map_or(&self.texels, |m| &m.texels);
                let (nw, nh) = (w.div_ceil(2), h.div_ceil(2));
                let texels = halve(src, (w, h), (nw, nh));
                levels.push(Mip {
                    width: nw,
                    height: nh,
                    texels,
                });
                (w, h) = (nw, nh);
            }
            levels
        })
    }
}

/// For each of `n` outputs covering a source axis of `len` texels: the source texels it overlaps and the share of
/// the output each one makes up (output i covers [i s, (i+1) s), s = len / n). Even sizes: two halves.
fn area_weights(len: u32, n: u32) -> Vec<Vec<(usize, f32)>> {
    let s = f64::from(len) / f64::from(n);
    (0..n)
        .map(|i| {
            let (a, b) = (f64::from(i) * s, f64::from(i + 1) * s);
            (a.floor() as usize..b.ceil() as usize)
                .map(|j| (j, ((b.min(j as f64 + 1.0) - a.max(j as f64)) / s) as f32))
                .collect()
        })
        .collect()
}

/// A w x h level resampled by area to nw x nh: rows first, then whole rows blended into each output row.
fn halve(src: &[[f32; 3]], (w, h): (u32, u32), (nw, nh): (u32, u32)) -> Vec<[f32; 3]> {
    let (wx, wy) = (area_weights(w, nw), area_weights(h, nh));
    let narrow: Vec<[f32; 3]> = src
        .chunks_exact(w as usize)
        .flat_map(|row| {
            wx.iter().map(move |taps| {
                taps.iter().fold([0.0; 3], |acc, &(j, k)| {
                    std::array::from_fn(|c| acc[c] + k * row[j][c])
                })
            })
        })
        .collect();
    let mut out = vec![[0.0f32; 3]; (nw * nh) as usize];
    for (dst, taps) in out.chunks_exact_mut(nw as usize).zip(&wy) {
        for &(j, k) in taps {
            let row = &narrow[j * nw as usize..(j + 1) * nw as usize];
            for (d, s) in dst.iter_mut().zip(row) {
                for c in 0..3 {
                    d[c] += k * s[c];
                }
            }
        }
    }
    out
}

/// The built-in swatch in linear light, generated on first use and kept: 0.8 MB each, and generating one cost more
/// than texturing a 1 MP wall.
pub fn builtin(b: Builtin) -> &'static LinearSwatch {
    static CACHE: [std::sync::OnceLock<LinearSwatch>; Builtin::ALL.len()] =
        [const { std::sync::OnceLock::new() }; Builtin::ALL.len()];
    CACHE[b as usize].get_or_init(|| LinearSwatch::from_rgb(&generate(b)))
}

/// The built-in swatch as a seamless TILE x TILE image.
pub fn generate(b: Builtin) -> RgbImage {
    let f: fn(f32, f32) -> Rgb<u8> = match b {
        Builtin::Linen => linen,
        Builtin::Wood => wood,
        Builtin::Marble => marble,
        Builtin::Herringbone => herringbone,
        Builtin::Velvet => velvet,
    };
    RgbImage::from_fn(TILE, TILE, |x, y| f(x as f32, y as f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mip_levels_halve_down_to_one_texel_and_keep_the_mean() {
        // An odd, non-square swatch (uploads are any size): 5x3 -> 3x2 -> 2x1 -> 1x1.
        let img = RgbImage::from_fn(5, 3, |x, y| Rgb([(x * 50) as u8, (y * 100) as u8, 128]));
        let sw = LinearSwatch::from_rgb(&img);
        let sizes: Vec<(u32, u32)> = sw.mips().iter().map(|m| (m.width, m.height)).collect();
        assert_eq!(sizes, [(3, 2), (2, 1), (1, 1)]);
        let mean = |t: &[[f32; 3]]| -> [f32; 3] {
            std::array::from_fn(|c| t.iter().map(|p| p[c]).sum::<f32>() / t.len() as f32)
        };
        let (m0, last) = (mean(&sw.texels), sw.mips().last().unwrap().texels[0]);
        for c in 0..3 {
            assert!((m0[c] - last[c]).abs() < 1e-5, "{m0:?} vs {last:?}");
        }
        // A power-of-two swatch keeps its mean exactly (up to float rounding).
        let sw = builtin(Builtin::Linen);
        let (m0, last) = (mean(&sw.texels), sw.mips().last().unwrap().texels[0]);
        for c in 0..3 {
            assert!((m0[c] - last[c]).abs() < 1e-4, "{m0:?} vs {last:?}");
        }
    }

    #[test]
    fn builtins_are_deterministic_and_textured() {
        for (name, b) in Builtin::ALL {
            let (a, c) = (generate(b), generate(b));
            assert_eq!(a, c, "{name}");
            let lum: Vec<f32> = a.pixels().map(|p| p[1] as f32).collect();
            let m = lum.iter().sum::<f32>() / lum.len() as f32;
            let sd = (lum.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / lum.len() as f32).sqrt();
            assert!(sd > 3.0, "{name} is flat: sd {sd}");
        }
    }
}
