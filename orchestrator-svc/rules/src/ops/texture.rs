//! Put a material on a surface: tile the swatch (scaled, rotated) and light it with the photo's light (`light.rs`):
//! each pixel's luminance over the region's lit level multiplies the swatch, so the lit part of the floor shows the
//! swatch as it is and shadows and fall-off carry over as the same ratios, even for a white or pale swatch; what
//! would pass white rolls off instead. Mixed by opacity. Flat by default; on the plane of a marked rectangle with
//! `perspective` (see `perspective.rs`).

use super::{blend_masked_rows, bounds, perspective};
use crate::color::{encode_table, encode_with, linear_table, luminance};
use crate::light::{KNEE, Shoulder, lit_level};
use crate::lut::Lut1;
use crate::rule::TextureParams;
use crate::swatch::{LinearSwatch, bilerp};
use image::{GrayImage, RgbImage};

/// Tile size at scale 1, as a fraction of the image's long side: ~8 tiles across a room shot.
const TILES_ACROSS: f32 = 8.0;

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
    let (lt, enc) = (linear_table(), encode_table());
    let (sw, sh) = (swatch.width, swatch.height);
    let Some(lit) = lit_level(photo, region, b) else {
        return;
    };
    if sw == 0 || sh == 0 {
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
    let roll_off = roll_off.as_ref();
    let opacity = p.opacity;
    // Swatch colour (linear) -> lit by the photo's light, mixed by opacity, encoded.
    let shade_mix = move |s: [f32; 3], px: [u8; 3]| -> [f32; 3] {
        let inp = px.map(|c| lt[c as usize]);
        let light = luminance(inp[0], inp[1], inp[2]) * inv_lit;
        let mut t = s.map(|v| v * light);
        // Past the knee, the whole colour scales with its largest channel's roll-off: hue and chroma survive and
        // no channel flattens at 255 (see recolor.rs).
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
            perspective::pixel_to_texel(plane, photo.dimensions(), tile_px, (sin, cos), (sw, sh));
        // Corners degenerate in pixels (a sliver quadrilateral on a tiny photo): tile flat rather than fail.
        if let Some(map) = map {
            let sampler = perspective::Sampler::new(map, swatch);
            blend_masked_rows(photo, region, b, p.common.strength, |y| {
                let sampler = &sampler;
                move |x, px| shade_mix(sampler.at(x, y), px)
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
    blend_masked_rows(photo, region, b, p.common.strength, |y| {
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
