//! Put a material on a surface: tile the swatch (scaled, rotated) and light it with the photo's light (`light.rs`):
//! each pixel's luminance over the region's lit level multiplies the swatch, so the lit part of the floor shows the
//! swatch as it is and shadows and fall-off carry over as the same ratios, even for a white or pale swatch; what
//! would pass white rolls off instead. Mixed by opacity. Flat by default; on the plane of a marked rectangle with
//! `perspective` (see `perspective.rs`).

mod shade;
mod texel_row;

use super::{bounds, perspective};
use crate::color::{encode_table, linear_table};
use crate::light::{KNEE, Shoulder, lit_level};
use crate::lut::Lut1;
use crate::mask::Rect;
use crate::rule::TextureParams;
use crate::swatch::{LinearSwatch, bilerp};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use shade::{Rows, Shade};
use texel_row::Columns;

/// Tile size at scale 1, as a fraction of the image's long side: ~8 tiles across a room shot.
const TILES_ACROSS: f32 = 8.0;

/// Rows per parallel task: a band walks its rows in order, so the unrotated path reuses a texel row's horizontal
/// interpolation for the image rows that share it.
const BAND: usize = 32;

/// The photo with the material applied (a copy: see `texture_in_place`).
pub fn texture(
    photo: &RgbImage,
    region: &GrayImage,
    p: &TextureParams,
    swatch: &LinearSwatch,
) -> RgbImage {
    let mut out = photo.clone();
    texture_in_place(&mut out, region, p, swatch);
    out
}

/// Puts the material on the region of `photo` in place: only pixels of non-zero weight change.
pub fn texture_in_place(
    photo: &mut RgbImage,
    region: &GrayImage,
    p: &TextureParams,
    swatch: &LinearSwatch,
) {
    let b = bounds(region);
    let (sw, sh) = (swatch.width, swatch.height);
    let Some(lit) = lit_level(photo, region, b) else {
        return;
    };
    if sw == 0 || sh == 0 || p.common.strength <= 0.0 {
        return;
    }
    let tile_px = photo.width().max(photo.height()) as f64 / TILES_ACROSS as f64 * p.scale as f64;
    let (sin, cos) = (p.rotation_deg as f64).to_radians().sin_cos();
    let inv_lit = 1.0 / lit;
    // A white texel under the brightest possible input is the brightest output: the shoulder ends there. Tabled
    // over its span (k = rolled-off / input), so a bright pixel costs an interpolation rather than an exp.
    let shoulder = Shoulder::new(inv_lit);
    let roll_off = (!shoulder.is_identity())
        .then(|| Lut1::build(KNEE, inv_lit, 1025, |y| [shoulder.apply(y) / y]));
    // Swatch colour (linear) -> lit by the photo's light, mixed by opacity, encoded, blended by weight: each path
    // below fills a row of swatch colours and hands it to `shade`.
    let shade = Shade {
        lt: linear_table(),
        enc: encode_table(),
        inv_lit,
        opacity: p.opacity,
        roll_off: roll_off.as_ref(),
        k: p.common.strength / 255.0,
    };
    if let Some(plane) = &p.perspective {
        let map = perspective::pixel_to_texel(plane, photo.dimensions(), tile_px, (sin, cos), sw);
        // Corners degenerate in pixels (a sliver quadrilateral on a tiny photo): tile flat rather than fail.
        if let Some(map) = map {
            let sampler = perspective::Sampler::new(map, swatch);
            per_pixel(photo, region, b, &shade, |y| {
                let sampler = &sampler;
                move |x| sampler.at(x, y)
            });
            return;
        }
    }
    let per_px = sw as f64 / tile_px;
    // Small tiles put several texels under a pixel; sampling them from the full swatch aliases (thin lines break
    // up, patterns shimmer into moiré). Flat tiling has one scale everywhere, so one mip level serves the whole
    // image: the one whose texels come closest to a pixel.
    let level = (per_px.log2().round().max(0.0) as usize).min(swatch.mips().len());
    let (lw, lh, lin) = match level {
        0 => (sw, sh, &swatch.texels),
        l => {
            let m = &swatch.mips()[l - 1];
            (m.width, m.height, &m.texels)
        }
    };
    let (pu, pv) = (
        per_px * lw as f64 / sw as f64,
        per_px * lh as f64 / sh as f64,
    );
    // Swatch coordinates are affine in the pixel position: u = (cos x + sin y) per_px, v = (-sin x + cos y) per_px
    // at pixel centres. Each row walks them by a constant step and wraps by one compare, instead of a floor and a
    // multiply per coordinate per pixel (f64 so 4000 steps drift by far less than a texel).
    let (u_axis, v_axis) = (Axis::new(cos * pu, lw), Axis::new(-sin * pv, lh));
    let texels = Texels { lin, lw };
    if sin == 0.0 {
        unrotated(
            photo,
            region,
            b,
            &shade,
            &texels,
            &u_axis,
            &v_axis,
            cos * pv,
        );
        return;
    }
    per_pixel(photo, region, b, &shade, |y| {
        let yc = y as f64 + 0.5;
        let (mut u, mut v) = (u_axis.walker(sin * pu * yc), v_axis.walker(cos * pv * yc));
        let texels = &texels;
        move |x| {
            let (i, i1, fx) = u.at(x);
            let (j, j1, fy) = v.at(x);
            let at = |x, y| texels.at(x, y);
            bilerp([at(i, j), at(i1, j), at(i, j1), at(i1, j1)], fx, fy)
        }
    });
}

/// One mip level's texels, row-major.
struct Texels<'a> {
    lin: &'a [[f32; 3]],
    lw: u32,
}

impl Texels<'_> {
    #[inline]
    fn at(&self, x: u32, y: u32) -> [f32; 3] {
        self.lin[(y * self.lw + x) as usize]
    }

    fn row(&self, y: u32) -> &[[f32; 3]] {
        let lw = self.lw as usize;
        &self.lin[y as usize * lw..(y as usize + 1) * lw]
    }
}

/// Runs `band(first row, its pixel rows, its weight rows)` over the rows of `bounds` in bands of [`BAND`] rows,
/// in parallel; each row slice is the full image width.
fn bands(
    photo: &mut RgbImage,
    region: &GrayImage,
    b: Rect,
    band: impl Fn(u32, &mut [u8], &[u8]) + Sync,
) {
    if b.is_empty() {
        return;
    }
    let w = photo.width() as usize;
    let (y0, y1) = (b.y0 as usize, b.y1 as usize);
    photo.as_mut()[y0 * w * 3..y1 * w * 3]
        .par_chunks_mut(BAND * w * 3)
        .zip(region.as_raw()[y0 * w..y1 * w].par_chunks(BAND * w))
        .enumerate()
        .for_each(|(k, (px, alpha))| band((y0 + k * BAND) as u32, px, alpha));
}

/// Row buffers of swatch colour, one plane per channel, for a span of `n` pixels.
fn planes(n: usize) -> [Vec<f32>; 3] {
    std::array::from_fn(|_| vec![0.0; n])
}

/// The general path: `row(y)` makes the row's sampler, called with increasing x for the row's pixels of non-zero
/// weight (so it can step incrementally, and must cope with gaps), giving the swatch colour there.
fn per_pixel<R, F>(photo: &mut RgbImage, region: &GrayImage, b: Rect, shade: &Shade, row: R)
where
    R: Fn(u32) -> F + Sync,
    F: FnMut(u32) -> [f32; 3],
{
    let w = photo.width() as usize;
    let (x0, x1) = (b.x0 as usize, b.x1 as usize);
    bands(photo, region, b, |y0, px, alpha| {
        let mut s = planes(x1 - x0);
        let rows = px.chunks_exact_mut(w * 3).zip(alpha.chunks_exact(w));
        for (y, (px, alpha)) in (y0..).zip(rows) {
            let (px, alpha) = (&mut px[x0 * 3..x1 * 3], &alpha[x0..x1]);
            let mut sample = row(y);
            for (k, &a) in alpha.iter().enumerate() {
                if a != 0 {
                    let c = sample((x0 + k) as u32);
                    for (plane, v) in s.iter_mut().zip(c) {
                        plane[k] = v;
                    }
                }
            }
            let s = [&s[0][..], &s[1], &s[2]];
            let rows = Rows {
                top: s,
                bot: s,
                fy: 0.0,
            };
            shade.row(px, alpha, rows);
        }
    });
}

/// Rotation 0 (the default): the texel column and fraction of each pixel column are the same on every row, and
/// the texel row and fraction are constant along a row. So each texel row is interpolated across the span once
/// per band where it is used (about every other image row at scale 1), and a row's swatch colours are two such
/// rows blended by the shading kernel: the same arithmetic, in the same order, as `bilerp`.
#[allow(clippy::too_many_arguments)]
fn unrotated(
    photo: &mut RgbImage,
    region: &GrayImage,
    b: Rect,
    shade: &Shade,
    texels: &Texels,
    u_axis: &Axis,
    v_axis: &Axis,
    v_per_row: f64,
) {
    let w = photo.width() as usize;
    let (x0, x1) = (b.x0 as usize, b.x1 as usize);
    // Walked across the whole span in one go, where the per-pixel walk restarts after each gap of weight 0: the
    // positions agree to f64 rounding (the old path's drift), and rarely a fraction differs in its last f32 bit.
    let mut u = u_axis.walker(0.0);
    let cols = Columns::new((b.x0..b.x1).map(|x| u.at(x)), texels.lw);
    bands(photo, region, b, |y0, px, alpha| {
        let n = x1 - x0;
        // Two texel rows interpolated across the span, tagged with their row.
        let mut cache: [(Option<u32>, [Vec<f32>; 3]); 2] = [(None, planes(n)), (None, planes(n))];
        let rows = px.chunks_exact_mut(w * 3).zip(alpha.chunks_exact(w));
        for (y, (px, alpha)) in (y0..).zip(rows) {
            let (px, alpha) = (&mut px[x0 * 3..x1 * 3], &alpha[x0..x1]);
            if alpha.iter().all(|&a| a == 0) {
                continue;
            }
            let (j, j1, fy) = v_axis.walker(v_per_row * (y as f64 + 0.5)).at(b.x0);
            for t in [j, j1] {
                if cache.iter().any(|(key, _)| *key == Some(t)) {
                    continue;
                }
                // Replace a row this image row does not use (one always exists: it uses at most two).
                let slot = cache
                    .iter_mut()
                    .find(|(key, _)| key.is_none_or(|k| k != j && k != j1))
                    .unwrap();
                slot.0 = Some(t);
                cols.interpolate(texels.row(t), &mut slot.1);
            }
            let row_of = |t| &cache.iter().find(|(key, _)| *key == Some(t)).unwrap().1;
            let (top, bot) = (row_of(j), row_of(j1));
            let rows = Rows {
                top: [&top[0], &top[1], &top[2]],
                bot: [&bot[0], &bot[1], &bot[2]],
                fy,
            };
            shade.row(px, alpha, rows);
        }
    });
}

/// One swatch axis: texel coordinate = offset + step * (x + 0.5), wrapped into [0, size).
struct Axis {
    step: f64,
    /// The step reduced into [0, size): walking by it wraps the same way and needs at most one subtraction.
    step_wrapped: f64,
    size: u32,
}

impl Axis {
    fn new(step: f64, size: u32) -> Self {
        Axis {
            step,
            step_wrapped: wrap(step, size as f64),
            size,
        }
    }

    fn walker(&self, offset: f64) -> Walker<'_> {
        Walker {
            axis: self,
            offset,
            next_x: u32::MAX,
            pos: 0.0,
        }
    }
}

/// A row's position along one axis, stepped by one pixel at a time and recomputed after a gap.
struct Walker<'a> {
    axis: &'a Axis,
    offset: f64,
    next_x: u32,
    pos: f64,
}

impl Walker<'_> {
    /// (texel, next texel with wrap, fraction) at pixel x.
    #[inline]
    fn at(&mut self, x: u32) -> (u32, u32, f32) {
        let n = self.axis.size as f64;
        if x == self.next_x {
            self.pos += self.axis.step_wrapped;
            if self.pos >= n {
                self.pos -= n;
            }
        } else {
            self.pos = wrap(self.offset + self.axis.step * (x as f64 + 0.5), n);
        }
        self.next_x = x + 1;
        let size = self.axis.size;
        let i = (self.pos as u32).min(size - 1);
        let i1 = if i + 1 == size { 0 } else { i + 1 };
        (i, i1, (self.pos - i as f64) as f32)
    }
}

/// x mod n into [0, n).
fn wrap(x: f64, n: f64) -> f64 {
    let r = x - (x / n).floor() * n;
    if r >= n { r - n } else { r.max(0.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-pixel kernel as it was before the row kernels (blend_masked_rows with a closure per pixel), kept
    /// as the reference the row kernels are held to.
    fn reference(
        photo: &mut RgbImage,
        region: &GrayImage,
        p: &TextureParams,
        swatch: &LinearSwatch,
    ) {
        use crate::color::{encode_with, luminance};
        let b = bounds(region);
        let (lt, enc) = (linear_table(), encode_table());
        let (sw, sh) = (swatch.width, swatch.height);
        let Some(lit) = lit_level(photo, region, b) else {
            return;
        };
        let tile_px =
            photo.width().max(photo.height()) as f64 / TILES_ACROSS as f64 * p.scale as f64;
        let (sin, cos) = (p.rotation_deg as f64).to_radians().sin_cos();
        let inv_lit = 1.0 / lit;
        let shoulder = Shoulder::new(inv_lit);
        let roll_off = (!shoulder.is_identity())
            .then(|| Lut1::build(KNEE, inv_lit, 1025, |y| [shoulder.apply(y) / y]));
        let roll_off = roll_off.as_ref();
        let opacity = p.opacity;
        let shade_mix = move |s: [f32; 3], px: [u8; 3]| -> [f32; 3] {
            let inp = px.map(|c| lt[c as usize]);
            let light = luminance(inp[0], inp[1], inp[2]) * inv_lit;
            let mut t = s.map(|v| v * light);
            if let Some(roll_off) = roll_off {
                let m = t[0].max(t[1]).max(t[2]);
                if m > KNEE {
                    let k = roll_off.eval(m)[0];
                    t = t.map(|v| v * k);
                }
            }
            std::array::from_fn(|k| encode_with(enc, inp[k] + opacity * (t[k] - inp[k])))
        };
        if let Some(plane) = &p.perspective {
            let map =
                perspective::pixel_to_texel(plane, photo.dimensions(), tile_px, (sin, cos), sw);
            if let Some(map) = map {
                let sampler = perspective::Sampler::new(map, swatch);
                super::super::blend_masked_rows(photo, region, b, p.common.strength, |y| {
                    let sampler = &sampler;
                    move |x, px| shade_mix(sampler.at(x, y), px)
                });
                return;
            }
        }
        let per_px = sw as f64 / tile_px;
        let level = (per_px.log2().round().max(0.0) as usize).min(swatch.mips().len());
        let (lw, lh, lin) = match level {
            0 => (sw, sh, &swatch.texels),
            l => {
                let m = &swatch.mips()[l - 1];
                (m.width, m.height, &m.texels)
            }
        };
        let (pu, pv) = (
            per_px * lw as f64 / sw as f64,
            per_px * lh as f64 / sh as f64,
        );
        let (u_axis, v_axis) = (Axis::new(cos * pu, lw), Axis::new(-sin * pv, lh));
        super::super::blend_masked_rows(photo, region, b, p.common.strength, |y| {
            let yc = y as f64 + 0.5;
            let (mut u, mut v) = (u_axis.walker(sin * pu * yc), v_axis.walker(cos * pv * yc));
            move |x, px| {
                let (i, i1, fx) = u.at(x);
                let (j, j1, fy) = v.at(x);
                let at = |x: u32, y: u32| lin[(y * lw + x) as usize];
                let s = bilerp([at(i, j), at(i1, j), at(i, j1), at(i1, j1)], fx, fy);
                shade_mix(s, px)
            }
        });
    }

    fn params(v: serde_json::Value) -> TextureParams {
        match crate::rule::parse_rule("texture", v.as_object().unwrap(), None).unwrap() {
            crate::rule::Rule::Texture(p) => p,
            _ => unreachable!(),
        }
    }

    /// (max, mean) |difference| over all bytes, and how many differ.
    fn diff(a: &RgbImage, b: &RgbImage) -> (u8, f64, usize) {
        let d: Vec<u8> = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .collect();
        let sum: u64 = d.iter().map(|&v| v as u64).sum();
        (
            d.iter().copied().max().unwrap_or(0),
            sum as f64 / d.len() as f64,
            d.iter().filter(|&&v| v != 0).count(),
        )
    }

    #[test]
    fn row_kernels_match_the_per_pixel_reference() {
        use crate::simd::{self, Level};
        // Odd sizes leave vector tails; the room's floor and sofa have hard edges, zero runs and partial rows,
        // and the soft noise gives every weight. A 3 MP frame puts the default linen at mip level 0 with ~2 image
        // rows per texel row, as at 12 MP.
        let (w, h) = (2017u32, 1513u32);
        let room = crate::synth::room(w, h);
        let soft = GrayImage::from_fn(w, h, |x, y| {
            let v = crate::synth::noise(x / 8, y / 8, 7).clamp(0.0, 1.0);
            image::Luma([(v * 255.0) as u8])
        });
        let plane = serde_json::json!([[0.3, 0.4], [0.7, 0.4], [0.95, 0.95], [0.05, 0.95]]);
        let cases = [
            (serde_json::json!({"builtin": "linen"}), false),
            (
                serde_json::json!({"builtin": "wood", "scale": 0.4, "opacity": 0.6, "strength": 0.7}),
                false,
            ),
            (
                serde_json::json!({"builtin": "marble", "scale": 2.3}),
                false,
            ),
            (
                serde_json::json!({"builtin": "herringbone", "rotation": 30}),
                true,
            ),
            (
                serde_json::json!({"builtin": "linen", "perspective": plane}),
                true,
            ),
        ];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for (json, exact) in cases {
            let p = params(json.clone());
            let crate::rule::SwatchSource::Builtin(bi) = p.source else {
                unreachable!()
            };
            let swatch = crate::swatch::builtin(bi);
            for region in [&room.floor, &room.sofa, &soft] {
                let mut want = room.photo.clone();
                reference(&mut want, region, &p, swatch);
                for level in [Level::Baseline, simd::detected()] {
                    let mut got = room.photo.clone();
                    pool.install(|| {
                        simd::with_level(level, || texture_in_place(&mut got, region, &p, swatch))
                    });
                    let (max, mean, n) = diff(&got, &want);
                    eprintln!("{json} {level:?}: max {max} mean {mean:.2e} differing {n}");
                    assert!(max <= 1, "{json} {level:?}: max {max}");
                    if exact {
                        assert!(n == 0, "{json} {level:?}: {n} bytes differ");
                    }
                }
            }
        }
    }

    #[test]
    fn walking_a_row_matches_direct_coordinates_across_gaps_and_wraps() {
        // Steps below, near and above a whole tile per pixel, both signs; x sequences with gaps.
        for (step, size) in [
            (0.37, 256),
            (-1.9, 256),
            (255.6, 256),
            (-700.25, 97),
            (3.0, 5),
        ] {
            let axis = Axis::new(step, size);
            for offset in [0.0, -1234.5, 987.25] {
                let mut w = axis.walker(offset);
                let xs = (0..300u32)
                    .chain(310..320)
                    .chain([400, 401, 999, 1000, 1001]);
                for x in xs {
                    let (i, i1, f) = w.at(x);
                    let want = wrap(offset + step * (x as f64 + 0.5), size as f64);
                    let got = i as f64 + f as f64;
                    // Equal up to float error, modulo the wrap point.
                    let d = (got - want).abs();
                    assert!(
                        d.min(size as f64 - d) < 1e-4,
                        "step {step} x {x}: {got} vs {want}"
                    );
                    assert!(i < size && i1 == (i + 1) % size && (0.0..1.0).contains(&f));
                }
            }
        }
    }
}
