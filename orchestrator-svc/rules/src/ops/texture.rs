//! Put a material on a surface: tile the swatch (scaled, rotated), multiply it by the region's normalised luminance
//! (Y / mean Y) so the room's shadows and light fall-off carry over, mix by opacity.

use super::{blend_masked, bounds, weighted_mean};
use crate::color::{encode_table, encode_with, linear_table, luminance, to_linear};
use crate::rule::TextureParams;
use image::{GrayImage, RgbImage};

/// Tile size at scale 1, as a fraction of the image's long side: ~8 tiles across a room shot.
const TILES_ACROSS: f32 = 8.0;

pub fn texture(
    photo: &RgbImage,
    region: &GrayImage,
    p: &TextureParams,
    swatch: &RgbImage,
) -> RgbImage {
    let b = bounds(region);
    let (lt, enc) = (linear_table(), encode_table());
    let (sw, sh) = swatch.dimensions();
    let Some(mean_y) = weighted_mean(photo, region, b, 1, |q| {
        luminance(lt[q[0] as usize], lt[q[1] as usize], lt[q[2] as usize])
    }) else {
        return photo.clone();
    };
    if sw == 0 || sh == 0 {
        return photo.clone();
    }
    // Linear-light swatch so shading multiplies light, not gamma-encoded codes.
    let lin: Vec<[f32; 3]> = swatch.pixels().map(|q| q.0.map(to_linear)).collect();
    let tile_px = photo.width().max(photo.height()) as f32 / TILES_ACROSS * p.scale;
    let per_px = sw as f32 / tile_px;
    let (sin, cos) = p.rotation_deg.to_radians().sin_cos();
    let inv_mean = if mean_y > 1e-4 { 1.0 / mean_y } else { 1.0 };
    let (fw, fh) = (sw as f32, sh as f32);
    let (inv_w, inv_h) = (1.0 / fw, 1.0 / fh);
    // Wrap by floor-multiply, not `%`/rem_euclid: f32 remainder is a libm call and dominated the loop.
    let wrap = |u: f32, n: f32, inv: f32, size: u32| {
        let u = u - (u * inv).floor() * n;
        let i = (u as u32).min(size - 1);
        (i, if i + 1 == size { 0 } else { i + 1 }, u - i as f32)
    };
    let sample = |u: f32, v: f32| -> [f32; 3] {
        let (i, i1, fx) = wrap(u, fw, inv_w, sw);
        let (j, j1, fy) = wrap(v, fh, inv_h, sh);
        let at = |x: u32, y: u32| lin[(y * sw + x) as usize];
        let (a, bb, c, d) = (at(i, j), at(i1, j), at(i, j1), at(i1, j1));
        std::array::from_fn(|k| {
            let top = a[k] + fx * (bb[k] - a[k]);
            let bot = c[k] + fx * (d[k] - c[k]);
            top + fy * (bot - top)
        })
    };
    let opacity = p.opacity;
    blend_masked(photo, region, b, p.common.strength, |x, y, px| {
        let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
        let s = sample(
            (cos * xf + sin * yf) * per_px,
            (-sin * xf + cos * yf) * per_px,
        );
        let inp = px.map(|c| lt[c as usize]);
        let shade = (luminance(inp[0], inp[1], inp[2]) * inv_mean).min(4.0);
        let mut t = s.map(|v| v * shade);
        // Over-bright highlights: scale all channels together so the swatch's hue survives.
        let m = t[0].max(t[1]).max(t[2]);
        if m > 1.0 {
            t = t.map(|v| v / m);
        }
        std::array::from_fn(|k| encode_with(enc, inp[k] + opacity * (t[k] - inp[k])))
    })
}
