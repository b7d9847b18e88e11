//! Per-pixel rule kernels and the row-parallel driver they share: it visits only the region's bounding box, skips
//! alpha-0 pixels without touching them, and blends out = in + alpha * strength * (edited - in) in sRGB.

#[cfg(test)]
pub(crate) mod kernel_check;
pub mod perspective;
pub mod recolor;
pub mod remove;
pub mod texture;
pub mod tone;

use crate::mask::{Rect, nonzero_bounds};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

/// Runs `edit(x, y, pixel) -> edited sRGB (0..255 floats)` on every pixel of `photo` with non-zero weight and
/// blends it in, in place: pixels of weight 0 (and everything outside `bounds`) are not written.
pub fn blend_masked<F>(
    photo: &mut RgbImage,
    region: &GrayImage,
    bounds: Rect,
    strength: f32,
    edit: F,
) where
    F: Fn(u32, u32, [u8; 3]) -> [f32; 3] + Sync,
{
    blend_masked_rows(photo, region, bounds, strength, |y| {
        let edit = &edit;
        move |x, px| edit(x, y, px)
    })
}

/// [`blend_masked`] for edits that carry state along a row: `row(y)` makes the row's editor, which is called with
/// increasing x for the row's pixels of non-zero weight (so it can step incrementally, and must cope with gaps).
pub fn blend_masked_rows<R, F>(
    out: &mut RgbImage,
    region: &GrayImage,
    bounds: Rect,
    strength: f32,
    row: R,
) where
    R: Fn(u32) -> F + Sync,
    F: FnMut(u32, [u8; 3]) -> [f32; 3],
{
    if bounds.is_empty() || strength <= 0.0 {
        return;
    }
    let w = out.width() as usize;
    let (x0, x1) = (bounds.x0 as usize, bounds.x1 as usize);
    let k = strength / 255.0;
    out.as_mut()
        .par_chunks_mut(w * 3)
        .zip(region.as_raw().par_chunks(w))
        .enumerate()
        .skip(bounds.y0 as usize)
        .take(bounds.height() as usize)
        .for_each(|(y, (pixels, alpha))| {
            let mut edit = row(y as u32);
            for x in x0..x1 {
                let a = alpha[x];
                if a == 0 {
                    continue;
                }
                let px = &mut pixels[x * 3..x * 3 + 3];
                let src = [px[0], px[1], px[2]];
                let e = edit(x as u32, src);
                let wgt = a as f32 * k;
                for c in 0..3 {
                    let v = src[c] as f32 + wgt * (e[c] - src[c] as f32);
                    // Float-to-int `as` saturates (and maps NaN to 0): the clamp is built in.
                    px[c] = (v + 0.5) as u8;
                }
            }
        });
}

/// Runs `f(y, pixels, alpha)` on each row's part inside `bounds` (RGB bytes and their weights, from column
/// `bounds.x0`), rows in parallel: for edits with a row kernel of their own (which must leave alpha-0 pixels as
/// they are).
pub fn for_each_row(
    photo: &mut RgbImage,
    region: &GrayImage,
    bounds: Rect,
    f: impl Fn(u32, &mut [u8], &[u8]) + Sync,
) {
    if bounds.is_empty() {
        return;
    }
    let w = photo.width() as usize;
    let (x0, x1) = (bounds.x0 as usize, bounds.x1 as usize);
    photo
        .as_mut()
        .par_chunks_mut(w * 3)
        .zip(region.as_raw().par_chunks(w))
        .enumerate()
        .skip(bounds.y0 as usize)
        .take(bounds.height() as usize)
        .for_each(|(y, (px, alpha))| f(y as u32, &mut px[x0 * 3..x1 * 3], &alpha[x0..x1]));
}

/// Alpha-weighted mean of `f(pixel)` over the region (None when the region is empty). `stride` > 1 samples every
/// stride-th row and column, for statistics whose `f` is costly; it falls back to every pixel if that finds none.
pub fn weighted_mean<F>(
    photo: &RgbImage,
    region: &GrayImage,
    bounds: Rect,
    stride: usize,
    f: F,
) -> Option<f32>
where
    F: Fn([u8; 3]) -> f32 + Sync,
{
    if bounds.is_empty() {
        return None;
    }
    let stride = stride.max(1);
    let w = photo.width() as usize;
    let (x0, x1) = (bounds.x0 as usize, bounds.x1 as usize);
    let (sum, wsum) = photo
        .as_raw()
        .par_chunks(w * 3)
        .zip(region.as_raw().par_chunks(w))
        .skip(bounds.y0 as usize)
        .take(bounds.height() as usize)
        .step_by(stride)
        .map(|(row, alpha)| {
            let (mut s, mut n) = (0.0f64, 0.0f64);
            for x in (x0..x1).step_by(stride) {
                let a = alpha[x];
                if a != 0 {
                    let v = f([row[x * 3], row[x * 3 + 1], row[x * 3 + 2]]);
                    s += (a as f32 * v) as f64;
                    n += a as f64;
                }
            }
            (s, n)
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    if wsum == 0.0 && stride > 1 {
        return weighted_mean(photo, region, bounds, 1, f);
    }
    (wsum > 0.0).then(|| (sum / wsum) as f32)
}

/// The region's non-zero bounding box.
pub fn bounds(region: &GrayImage) -> Rect {
    nonzero_bounds(region)
}
