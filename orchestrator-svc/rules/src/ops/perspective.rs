//! Texture in perspective: the swatch tiled on the plane of a rectangle the caller marked on the surface, so tiles
//! shrink toward its far edge as real ones do. A far tile covers many texels per pixel; sampling it from the full
//! swatch would alias into moiré, so each pixel reads the mip level its footprint calls for (trilinear).

use crate::rule::Perspective;
use crate::swatch::{LinearSwatch, bilerp};

pub type Mat3 = [[f64; 3]; 3];

/// The homography taking each `from[i]` to `to[i]` (four points, no three collinear), scaled so [2][2] = 1; None
/// for degenerate points.
pub fn homography(from: [[f64; 2]; 4], to: [[f64; 2]; 4]) -> Option<Mat3> {
    let mut a = [[0f64; 9]; 8];
    for i in 0..4 {
        let ([x, y], [u, v]) = (from[i], to[i]);
        a[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, u];
        a[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y, v];
    }
    // Gauss-Jordan elimination with partial pivoting on the 8 unknowns.
    for col in 0..8 {
        let pivot = (col..8).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let p = a[col][col];
        for v in &mut a[col][col..] {
            *v /= p;
        }
        let pivot_row = a[col];
        for (r, row) in a.iter_mut().enumerate() {
            let f = row[col];
            if r != col && f != 0.0 {
                for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= f * p;
                }
            }
        }
    }
    let h: [f64; 8] = std::array::from_fn(|i| a[i][8]);
    Some([[h[0], h[1], h[2]], [h[3], h[4], h[5]], [h[6], h[7], 1.0]])
}

fn det(m: &Mat3) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Pixel centre -> swatch texel coordinates (level 0) for a photo of `width` x `height`: the marked rectangle is
/// the plane [0, aspect] x [0, 1]; one tile is `tile_px` pixels long along the rectangle's near edge, turned by
/// `rotation` (sin, cos) in the plane, and keeps the swatch's shape (texels square in the plane, as flat tiling keeps
/// them square in the photo). None when the corners are degenerate in pixels.
pub fn pixel_to_texel(
    p: &Perspective,
    (width, height): (u32, u32),
    tile_px: f64,
    (sin, cos): (f64, f64),
    swatch_width: u32,
) -> Option<Mat3> {
    let quad = p.corners.map(|[x, y]| {
        [
            f64::from(x) * f64::from(width),
            f64::from(y) * f64::from(height),
        ]
    });
    let a = f64::from(p.aspect);
    let to_plane = homography(quad, [[0.0, 0.0], [a, 0.0], [a, 1.0], [0.0, 1.0]])?;
    // The near edge (near-right to near-left) is `a` plane units long: that fixes pixels per plane unit there.
    let near_px = (quad[2][0] - quad[3][0]).hypot(quad[2][1] - quad[3][1]);
    let tile_plane = tile_px * a / near_px.max(1e-9);
    // Texels per plane unit, the same along both axes: a 512x128 plank swatch stays four times as long as it is wide
    // (with `sh / tile_plane` along v every tile came out square, planks stretched fourfold).
    let k = f64::from(swatch_width) / tile_plane;
    // Same convention as flat tiling: u = (cos s + sin t) per tile, v = (-sin s + cos t) per tile.
    let k: Mat3 = [
        [cos * k, sin * k, 0.0],
        [-sin * k, cos * k, 0.0],
        [0.0, 0.0, 1.0],
    ];
    let t = mul(&k, &to_plane);
    // A homography is defined up to scale, sign included: make w positive on the marked rectangle, so that w <= 0
    // means "beyond the horizon" (the other side of the vanishing line), where the sampler gives the mean.
    let centre = [0, 1].map(|c| quad.iter().map(|p| p[c]).sum::<f64>() / 4.0);
    let w = t[2][0] * centre[0] + t[2][1] * centre[1] + t[2][2];
    Some(if w < 0.0 {
        t.map(|row| row.map(|v| -v))
    } else {
        t
    })
}

fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum()))
}

/// Samples `swatch` through the pixel -> texel map `t`: trilinear across its mip chain by each pixel's footprint.
pub struct Sampler<'a> {
    t: Mat3,
    /// |det t|: the texel area one pixel covers is this / w^3.
    det: f64,
    levels: Vec<Level<'a>>,
}

struct Level<'a> {
    width: u32,
    height: u32,
    texels: &'a [[f32; 3]],
    /// Level-0 texel coordinates -> this level's.
    sx: f64,
    sy: f64,
}

impl<'a> Sampler<'a> {
    pub fn new(t: Mat3, swatch: &'a LinearSwatch) -> Self {
        let (sw, sh) = (f64::from(swatch.width), f64::from(swatch.height));
        let level = |width: u32, height: u32, texels: &'a [[f32; 3]]| Level {
            width,
            height,
            texels,
            sx: f64::from(width) / sw,
            sy: f64::from(height) / sh,
        };
        let levels = std::iter::once(level(swatch.width, swatch.height, &swatch.texels))
            .chain(
                swatch
                    .mips()
                    .iter()
                    .map(|m| level(m.width, m.height, &m.texels)),
            )
            .collect();
        Sampler {
            det: det(&t).abs(),
            t,
            levels,
        }
    }

    /// The swatch's colour (linear light) at pixel centre (x + 0.5, y + 0.5).
    #[inline]
    pub fn at(&self, x: u32, y: u32) -> [f32; 3] {
        let (px, py) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
        let t = &self.t;
        let w = t[2][0] * px + t[2][1] * py + t[2][2];
        let last = self.levels.len() - 1;
        if w <= 1e-12 {
            // At or beyond the horizon: the plane is infinitely far, where every tile averages to the swatch's mean.
            return self.levels[last].texels[0];
        }
        let u = (t[0][0] * px + t[0][1] * py + t[0][2]) / w;
        let v = (t[1][0] * px + t[1][1] * py + t[1][2]) / w;
        // log2 of the texel length a pixel spans: half the log2 of the area it covers.
        let lod = (0.5 * (self.det / (w * w * w)).log2()).clamp(0.0, last as f64);
        let l0 = lod.floor() as usize;
        let a = self.bilinear(l0, u, v);
        if l0 == last {
            return a;
        }
        let f = (lod - l0 as f64) as f32;
        if f == 0.0 {
            return a;
        }
        let b = self.bilinear(l0 + 1, u, v);
        std::array::from_fn(|c| a[c] + f * (b[c] - a[c]))
    }

    /// Bilinear at level `l`, texel i covering [i, i+1) with its value at i, wrapping: the flat path's convention.
    fn bilinear(&self, l: usize, u: f64, v: f64) -> [f32; 3] {
        let lv = &self.levels[l];
        let (u, v) = (u * lv.sx, v * lv.sy);
        let (fu, fv) = (u.floor(), v.floor());
        let (w, h) = (i64::from(lv.width), i64::from(lv.height));
        let i = (fu as i64).rem_euclid(w) as usize;
        let j = (fv as i64).rem_euclid(h) as usize;
        let i1 = if i + 1 == lv.width as usize { 0 } else { i + 1 };
        let j1 = if j + 1 == lv.height as usize {
            0
        } else {
            j + 1
        };
        let (fx, fy) = ((u - fu) as f32, (v - fv) as f32);
        let row = lv.width as usize;
        let at = |x: usize, y: usize| lv.texels[y * row + x];
        bilerp([at(i, j), at(i1, j), at(i, j1), at(i1, j1)], fx, fy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `m` applied to the point `p` (projectively); None beyond the horizon (w <= 0).
    fn project(m: &Mat3, [x, y]: [f64; 2]) -> Option<[f64; 2]> {
        let w = m[2][0] * x + m[2][1] * y + m[2][2];
        (w > 1e-12).then(|| {
            [
                (m[0][0] * x + m[0][1] * y + m[0][2]) / w,
                (m[1][0] * x + m[1][1] * y + m[1][2]) / w,
            ]
        })
    }

    #[test]
    fn the_homography_takes_each_corner_where_it_was_asked() {
        let from = [
            [120.0, 300.0],
            [880.0, 310.0],
            [1000.0, 740.0],
            [20.0, 700.0],
        ];
        let to = [[0.0, 0.0], [1.5, 0.0], [1.5, 1.0], [0.0, 1.0]];
        let h = homography(from, to).unwrap();
        for (f, t) in from.iter().zip(&to) {
            let p = project(&h, *f).unwrap();
            assert!(
                (p[0] - t[0]).abs() < 1e-9 && (p[1] - t[1]).abs() < 1e-9,
                "{f:?} -> {p:?}"
            );
        }
        // Three collinear corners have no homography.
        assert!(homography([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], to).is_none());
    }
}
