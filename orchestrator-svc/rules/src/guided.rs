//! Colour-guided filter (He, Sun & Tang 2013) in its fast, subsampled form: the linear coefficients are smooth, so
//! they are solved at 1/s resolution and applied at full resolution. It snaps a blurry upsampled mask onto the
//! photo's own edges, including edges between regions of equal brightness but different hue.

use crate::filter::{Plane, box_mean, downsample, upsample};
use rayon::prelude::*;

/// Filters `p` (the mask, 0..1) guided by the RGB planes `guide` (0..1). `r` is the full-resolution radius.
pub fn guided_filter(guide: &[Plane; 3], p: &Plane, r: usize, eps: f32) -> Plane {
    let s = (r / 4).max(1);
    let rs = (r / s).max(1);
    let i: Vec<Plane> = guide.iter().map(|g| downsample(g, s)).collect();
    let ps = downsample(p, s);
    let (w, h) = (ps.w, ps.h);
    let n = w * h;
    let mean = |pl: &Plane| box_mean(pl, rs);
    let prod = |a: &Plane, b: &Plane| Plane {
        w,
        h,
        data: a.data.par_iter().zip(&b.data).map(|(x, y)| x * y).collect(),
    };
    let mi: Vec<Plane> = i.iter().map(mean).collect();
    let mp = mean(&ps);
    let mip: Vec<Plane> = i.iter().map(|c| mean(&prod(c, &ps))).collect();
    // Second moments of the guide: rr, rg, rb, gg, gb, bb.
    let pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)];
    let mii: Vec<Plane> = pairs
        .iter()
        .map(|&(a, b)| mean(&prod(&i[a], &i[b])))
        .collect();

    let mut coef = vec![[0.0f32; 4]; n];
    coef.par_iter_mut().enumerate().for_each(|(k, c)| {
        let m = [mi[0].data[k], mi[1].data[k], mi[2].data[k]];
        let cov_ip: [f32; 3] = std::array::from_fn(|ch| mip[ch].data[k] - m[ch] * mp.data[k]);
        let v = |q: usize| {
            let (a, b) = pairs[q];
            mii[q].data[k] - m[a] * m[b]
        };
        let (rr, rg, rb, gg, gb, bb) = (v(0) + eps, v(1), v(2), v(3) + eps, v(4), v(5) + eps);
        // Symmetric 3x3 inverse by cofactors; eps on the diagonal keeps it well conditioned.
        let c00 = gg * bb - gb * gb;
        let c01 = gb * rb - rg * bb;
        let c02 = rg * gb - gg * rb;
        let c11 = rr * bb - rb * rb;
        let c12 = rb * rg - rr * gb;
        let c22 = rr * gg - rg * rg;
        let det = rr * c00 + rg * c01 + rb * c02;
        let inv = 1.0 / det;
        let a0 = (c00 * cov_ip[0] + c01 * cov_ip[1] + c02 * cov_ip[2]) * inv;
        let a1 = (c01 * cov_ip[0] + c11 * cov_ip[1] + c12 * cov_ip[2]) * inv;
        let a2 = (c02 * cov_ip[0] + c12 * cov_ip[1] + c22 * cov_ip[2]) * inv;
        *c = [a0, a1, a2, mp.data[k] - a0 * m[0] - a1 * m[1] - a2 * m[2]];
    });
    let (fw, fh) = (p.w, p.h);
    let coef_planes: Vec<Plane> = (0..4)
        .map(|ch| {
            let pl = Plane {
                w,
                h,
                data: coef.iter().map(|c| c[ch]).collect(),
            };
            upsample(&mean(&pl), s, fw, fh)
        })
        .collect();
    let mut out = Plane::new(fw, fh);
    out.data.par_iter_mut().enumerate().for_each(|(k, q)| {
        let v = coef_planes[0].data[k] * guide[0].data[k]
            + coef_planes[1].data[k] * guide[1].data[k]
            + coef_planes[2].data[k] * guide[2].data[k]
            + coef_planes[3].data[k];
        *q = v.clamp(0.0, 1.0);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snaps_a_blurred_mask_to_the_photo_edge() {
        // Photo: red left half, blue right half (same brightness-ish). Mask: a blurry ramp across the edge.
        let (w, h) = (64, 32);
        let mk = |f: &dyn Fn(usize) -> f32| Plane {
            w,
            h,
            data: (0..w * h).map(|k| f(k % w)).collect(),
        };
        let guide = [
            mk(&|x| if x < 32 { 0.8 } else { 0.1 }),
            mk(&|_| 0.2),
            mk(&|x| if x < 32 { 0.1 } else { 0.8 }),
        ];
        let p = mk(&|x| (1.0 - (x as f32 - 24.0) / 16.0).clamp(0.0, 1.0));
        let q = guided_filter(&guide, &p, 6, 1e-3);
        // The blurry ramp (1/16 per pixel) becomes a step at the colour edge, and values move away from 0.5 on
        // either side of it.
        let step = q.at(31, 16) - q.at(32, 16);
        assert!(step > 0.3, "step {step}");
        assert!(q.at(28, 16) > p.at(28, 16) + 0.04 && q.at(36, 16) < p.at(36, 16) - 0.04);
    }
}
