//! A rule's soft region: target instances united, snapped to photo edges, grown/shrunk, feathered, minus occluders.
//! All work happens inside the targets' bounding box plus the filters' reach; the rest of the image stays 0.

use crate::filter::{Plane, gaussian, morph, three_tap_column, three_tap_row, three_tap_weight};
use crate::guide_stats::{GuideCache, GuideKey};
use crate::guided::{CoefficientRows, Coefficients, scale};
use crate::mask::{Rect, nonzero_bounds};
use crate::row_kernels::{add_codes, cell_means, max_codes, max_into, quantize, stretch};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

#[derive(Clone, Debug, PartialEq)]
pub struct RegionParams {
    /// Gaussian feather width in pixels (sigma = feather / 2); 0 keeps the refined edge as is.
    pub feather_px: f32,
    /// Grow (> 0) or shrink (< 0) in pixels, applied after refinement.
    pub grow_px: f32,
    /// Snap the mask to the photo's edges with a colour-guided filter.
    pub refine_edges: bool,
    /// Solve the guided filter one step coarser than `guided::scale` (s + 1): for previews, looked at once on a
    /// screen, where it takes a third less time (34 -> 24 ms at 1024x768 on one core) for edges that differ from
    /// the job's by a fraction of a code on average (orchestrator-svc/tests/preview.rs).
    pub coarse: bool,
}

impl Default for RegionParams {
    fn default() -> Self {
        RegionParams {
            feather_px: 1.0,
            grow_px: 0.0,
            refine_edges: true,
            coarse: false,
        }
    }
}

/// Guided-filter radius: 5 px at ~1 MP (what darktable uses for SAM masks), scaled with the image's long side.
pub fn refine_radius(w: u32, h: u32) -> usize {
    ((5.0 * w.max(h) as f32 / 1024.0).round() as usize).clamp(2, 40)
}

const EPS: f32 = 0.01;

/// The photo and its regions' shared guided-filter statistics.
type Guide<'a> = (&'a RgbImage, &'a GuideCache);

/// A rule's soft region: union (max) of the target concept's instance alphas, refined with an image-guided filter
/// against the photo, grown/shrunk, feathered, then minus occluders: a * (1 - occluder).
pub fn build_region(
    photo: &RgbImage,
    target: &[GrayImage],
    occluders: &[GrayImage],
    params: &RegionParams,
) -> GrayImage {
    let occluders: Vec<&GrayImage> = occluders.iter().collect();
    build_region_shared(photo, target, &occluders, params, &GuideCache::new())
}

/// `build_region` for one of several regions of `photo`: the guided filter's photo-only statistics come from
/// `guides` (one cache per photo), made by the first region over the same crop and reused by the others. The same
/// arithmetic as `build_region`, so the same bytes. The occluders are borrowed: a rule hidden by several concepts
/// needs no full-frame copy of each (a 48 MP mask is 48 MB).
pub fn build_region_shared(
    photo: &RgbImage,
    target: &[GrayImage],
    occluders: &[&GrayImage],
    params: &RegionParams,
    guides: &GuideCache,
) -> GrayImage {
    let (w, h) = photo.dimensions();
    let mut out = crate::mask::zeroed_plane(w, h);
    let same_size = |m: &&GrayImage| m.dimensions() == (w, h);
    let target: Vec<&GrayImage> = target.iter().filter(same_size).collect();
    let occluders: Vec<&GrayImage> = occluders.iter().copied().filter(same_size).collect();
    let bounds = union_bounds(&target);
    if bounds.is_empty() {
        return out;
    }
    let r = refine_radius(w, h);
    let s = scale(r) + usize::from(params.coarse);
    let grow = params.grow_px.round() as i64;
    let reach =
        2 * r + grow.max(0) as usize + (1.5 * params.feather_px.max(0.0)).ceil() as usize + 2;
    let crop = bounds.grown(reach as u32, w, h);

    let feather = if params.feather_px > 0.0 {
        three_tap_weight(params.feather_px / 2.0)
    } else {
        Some(0.0)
    };
    // The usual rule (refined, not grown, a feather of a few pixels at most, no occluders): refinement, stretch,
    // feather and quantisation in bands of rows, rather than four full-size float planes (at 12 MP, with their page
    // faults, a third of a rule's time). The same arithmetic as the general path, so the same bytes.
    if let (true, 0, true, Some(wt)) = (params.refine_edges, grow, occluders.is_empty(), feather) {
        refined_feathered(&mut out, (photo, guides), &target, crop, (r, s), wt);
        return out;
    }
    let mut a = if params.refine_edges {
        refine((photo, guides), &target, crop, (r, s))
    } else {
        union_plane(&target, crop)
    };
    if grow != 0 {
        a = morph(&a, grow.unsigned_abs() as usize, grow > 0);
    }
    if params.feather_px > 0.0 {
        a = gaussian(&a, params.feather_px / 2.0);
    }
    if !occluders.is_empty() {
        let o = if params.refine_edges {
            refine((photo, guides), &occluders, crop, (r, s))
        } else {
            union_plane(&occluders, crop)
        };
        a.data
            .par_iter_mut()
            .zip(&o.data)
            .for_each(|(a, o)| *a *= 1.0 - o.clamp(0.0, 1.0));
    }
    write_plane(&mut out, &a, crop);
    out
}

/// The union of `masks` over `crop`, guided-filtered, then contrast-stretched around 0.5 (x2, clamped). The guided
/// filter snaps the edge to the photo but, where a window holds only a few pixels of the other surface, eps pulls
/// it toward the window mean and leaves 10-20 % tails a few pixels long; painted walls then show a pale rim around
/// the sofa. The stretch removes tails under 25 % / over 75 % and keeps mid-range softness (anti-aliasing, hair) at
/// half its width.
fn refine(g: Guide<'_>, masks: &[&GrayImage], crop: Rect, (r, s): (usize, usize)) -> Plane {
    let (photo, coef) = (g.0, solve(g, masks, crop, r, s));
    let mut q = Plane::new(crop.width() as usize, crop.height() as usize);
    q.data.par_chunks_mut(q.w).enumerate().for_each_init(
        || coef.rows(),
        |rows, (y, row)| refined_row(rows, photo, crop, y, row),
    );
    q
}

/// The guided filter's coefficients for the union of `masks`, from the union built directly at the filter's
/// working scale (the same area averages `filter::downsample` takes of the full-resolution union, which is never
/// made), the photo's half from `guides`.
fn solve(
    (photo, guides): Guide<'_>,
    masks: &[&GrayImage],
    crop: Rect,
    r: usize,
    s: usize,
) -> Coefficients {
    let stats = guides.get(photo, GuideKey::new(crop, r, s, EPS));
    Coefficients::solve_with(&stats, &union_small(masks, crop, s))
}

/// Row y of `refine`.
fn refined_row(
    rows: &mut CoefficientRows<'_>,
    photo: &RgbImage,
    crop: Rect,
    y: usize,
    row: &mut [f32],
) {
    rows.apply(photo, crop, y, row);
    stretch(row, STRETCH);
}

/// `refine`, a 3-tap feather of weight `wt` (0: none) and `write_plane`, in bands of rows: each band refines and
/// blurs horizontally its rows and one more on each side into a small float buffer, then blurs vertically straight
/// into `out`. No crop-sized float plane (48 MB at 12 MP, and its page faults) for 2 rows in `BAND` computed twice.
fn refined_feathered(
    out: &mut GrayImage,
    (photo, guides): Guide<'_>,
    masks: &[&GrayImage],
    crop: Rect,
    (r, s): (usize, usize),
    wt: f32,
) {
    const BAND: usize = 64;
    let coef = solve((photo, guides), masks, crop, r, s);
    let (cw, ch) = (crop.width() as usize, crop.height() as usize);
    let w = out.width() as usize;
    let rows = &mut out.as_mut()[crop.y0 as usize * w..(crop.y0 as usize + ch) * w];
    // Each task's buffers serve all its bands (every value is written before it is read): allocated per band,
    // their zeroing was ~1 % of a 12 MP photo (perf).
    rows.par_chunks_mut(w * BAND).enumerate().for_each_init(
        || {
            let line = || vec![0.0f32; cw];
            (vec![0.0f32; (BAND + 2) * cw], line(), line(), coef.rows())
        },
        |(tmp, q, v, rows), (band, dst)| {
            let y0 = band * BAND;
            let n = dst.len() / w;
            // Rows lo..hi of the crop, refined and blurred horizontally: the band's and its neighbours (clamped
            // at the crop's edges, as three_tap clamps).
            let (lo, hi) = (y0.saturating_sub(1), (y0 + n + 1).min(ch));
            let tmp = &mut tmp[..(hi - lo) * cw];
            for (k, t) in tmp.chunks_exact_mut(cw).enumerate() {
                refined_row(rows, photo, crop, lo + k, q);
                three_tap_row(q, t, wt);
            }
            let row = |y: usize| &tmp[(y - lo) * cw..(y - lo + 1) * cw];
            for (i, line) in dst.chunks_exact_mut(w).enumerate() {
                let y = y0 + i;
                let (up, dn) = (y.saturating_sub(1), (y + 1).min(ch - 1));
                three_tap_column(row(up), row(y), row(dn), v, wt);
                quantize(v, &mut line[crop.x0 as usize..crop.x0 as usize + cw]);
            }
        },
    );
}

const STRETCH: f32 = 2.0;

fn union_bounds(masks: &[&GrayImage]) -> Rect {
    masks
        .iter()
        .map(|m| nonzero_bounds(m))
        .filter(|r| !r.is_empty())
        .fold(
            Rect {
                x0: u32::MAX,
                y0: u32::MAX,
                x1: 0,
                y1: 0,
            },
            |a, b| Rect {
                x0: a.x0.min(b.x0),
                y0: a.y0.min(b.y0),
                x1: a.x1.max(b.x1),
                y1: a.y1.max(b.y1),
            },
        )
}

fn union_plane(masks: &[&GrayImage], c: Rect) -> Plane {
    let (cw, ch) = (c.width() as usize, c.height() as usize);
    let mut p = Plane::new(cw, ch);
    p.data
        .par_chunks_mut(cw)
        .enumerate()
        .for_each(|(j, row)| union_row(masks, c, j, row));
    p
}

/// The area averages (by s, partial blocks at the edges averaging what they have) of the union of `masks` over `c`,
/// in 0..1, without the full-resolution plane: each band of s rows is united in bytes (a max of codes is the code of
/// the max) and summed column by column in u16, then each cell's s columns, as `guided::guide_small` does for the
/// photo. The cell's exact integer sum times 1 / (255 n): `filter::downsample(&union_plane(masks, c), s)` to within
/// a float's rounding (it adds s^2 rounded quotients; this was 5 % of a photo's time at 1 and 12 MP, perf).
fn union_small(masks: &[&GrayImage], c: Rect, s: usize) -> Plane {
    let (cw, ch) = (c.width() as usize, c.height() as usize);
    if s <= 1 {
        return union_plane(masks, c);
    }
    let (w, h) = (cw.div_ceil(s), ch.div_ceil(s));
    let mut out = Plane::new(w, h);
    out.data.par_chunks_mut(w).enumerate().for_each_init(
        || (vec![0u8; cw], vec![0u16; cw], Vec::new()),
        |(line, columns, window), (y, dst)| {
            let (y0, y1) = (y * s, ((y + 1) * s).min(ch));
            columns.fill(0);
            for yy in y0..y1 {
                add_codes(columns, union_codes(masks, c, yy, line));
            }
            cell_means(columns, s, y1 - y0, window, [dst]);
        },
    );
    out
}

/// Row j of the crop `c` of the union of `masks`, as codes: the one mask's own row, or their max in `line`.
fn union_codes<'a>(masks: &[&'a GrayImage], c: Rect, j: usize, line: &'a mut [u8]) -> &'a [u8] {
    let n = line.len();
    let row = |m: &'a GrayImage| {
        &m.as_raw()[((c.y0 as usize + j) * m.width() as usize + c.x0 as usize)..][..n]
    };
    match masks {
        [] => {
            line.fill(0);
            line
        }
        [one] => row(one),
        [first, rest @ ..] => {
            line.copy_from_slice(row(first));
            rest.iter().for_each(|m| max_codes(line, row(m)));
            line
        }
    }
}

/// Row j of the crop `c` of the union of `masks`, in 0..1.
fn union_row(masks: &[&GrayImage], c: Rect, j: usize, row: &mut [f32]) {
    row.fill(0.0);
    for m in masks {
        let src =
            &m.as_raw()[((c.y0 as usize + j) * m.width() as usize + c.x0 as usize)..][..row.len()];
        max_into(row, src);
    }
}

fn write_plane(out: &mut GrayImage, p: &Plane, c: Rect) {
    let w = out.width() as usize;
    out.as_mut()
        .par_chunks_mut(w)
        .skip(c.y0 as usize)
        .take(p.h)
        .zip(p.data.par_chunks(p.w))
        .for_each(|(row, src)| quantize(src, &mut row[c.x0 as usize..c.x0 as usize + p.w]));
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};

    #[test]
    fn occluder_is_cut_out_and_empty_targets_give_empty_region() {
        let photo = RgbImage::from_pixel(64, 64, Rgb([120, 120, 120]));
        let wall = GrayImage::from_pixel(64, 64, Luma([255]));
        let mut sofa = GrayImage::new(64, 64);
        for y in 40..64 {
            for x in 10..50 {
                sofa.put_pixel(x, y, Luma([255]));
            }
        }
        let p = RegionParams {
            feather_px: 0.0,
            grow_px: 0.0,
            refine_edges: false,
            coarse: false,
        };
        let r = build_region(&photo, &[wall], &[sofa], &p);
        assert_eq!(r.get_pixel(30, 10)[0], 255);
        assert_eq!(r.get_pixel(30, 50)[0], 0);
        let empty = build_region(
            &photo,
            &[GrayImage::new(64, 64)],
            &[],
            &RegionParams::default(),
        );
        assert!(empty.as_raw().iter().all(|&v| v == 0));
    }

    #[test]
    fn the_fused_path_gives_the_general_paths_bytes() {
        // A photo with an edge, a soft blob target off-centre: the fused path (refine + feather + quantise) against
        // the general path's steps one plane at a time (the union at the filter's scale as both paths make it:
        // `union_small_is_the_downsampled_union` checks that against the full-resolution union).
        let (w, h) = (211u32, 157u32);
        let photo = RgbImage::from_fn(w, h, |x, y| {
            let v = if x * 3 + y > 300 { 200 } else { 40 };
            Rgb([v, (x % 50) as u8 + 60, 255 - v])
        });
        let blob = GrayImage::from_fn(w, h, |x, y| {
            let d = ((x as f32 - 90.0).powi(2) + (y as f32 - 70.0).powi(2)).sqrt();
            Luma([(300.0 - 5.0 * d).clamp(0.0, 255.0) as u8])
        });
        let r = refine_radius(w, h);
        for feather in [0.0, 1.0, 1.4] {
            let params = RegionParams {
                feather_px: feather,
                grow_px: 0.0,
                refine_edges: true,
                coarse: false,
            };
            let fused = build_region(&photo, std::slice::from_ref(&blob), &[], &params);
            let target = [&blob];
            let reach = 2 * r + (1.5 * feather).ceil() as usize + 2;
            let crop = union_bounds(&target).grown(reach as u32, w, h);
            let coef =
                Coefficients::solve(&photo, crop, &union_small(&target, crop, scale(r)), r, EPS);
            let mut q = Plane::new(crop.width() as usize, crop.height() as usize);
            let mut rows = coef.rows();
            for (y, row) in q.data.chunks_exact_mut(q.w).enumerate() {
                rows.apply(&photo, crop, y, row);
            }
            q.data
                .iter_mut()
                .for_each(|v| *v = (0.5 + (*v - 0.5) * STRETCH).clamp(0.0, 1.0));
            if feather > 0.0 {
                q = gaussian(&q, feather / 2.0);
            }
            let mut general = GrayImage::new(w, h);
            write_plane(&mut general, &q, crop);
            assert_eq!(fused, general, "feather {feather}");
        }
    }

    #[test]
    fn union_small_is_the_downsampled_union() {
        // Two overlapping soft masks (and one and none), a crop off the origin whose size is not a multiple of s:
        // the integer cell sums against area averages of the full-resolution float union, to within rounding.
        let (w, h) = (97u32, 61u32);
        let a = GrayImage::from_fn(w, h, |x, y| Luma([((x * 7 + y * 3) % 256) as u8]));
        let b = GrayImage::from_fn(w, h, |x, y| {
            Luma([if x > 40 { (y * 4 % 256) as u8 } else { 0 }])
        });
        let crop = Rect {
            x0: 3,
            y0: 5,
            x1: 94,
            y1: 60,
        };
        for masks in [vec![&a, &b], vec![&b], vec![]] {
            for s in [2, 3, 10] {
                let want = crate::filter::downsample(&union_plane(&masks, crop), s);
                let got = union_small(&masks, crop, s);
                assert_eq!((got.w, got.h), (want.w, want.h));
                let err = got
                    .data
                    .iter()
                    .zip(&want.data)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(err <= 1e-6, "{} masks s={s}: {err}", masks.len());
            }
        }
    }

    #[test]
    fn grow_and_feather_widen_the_region() {
        let photo = RgbImage::from_pixel(64, 64, Rgb([120, 120, 120]));
        let mut m = GrayImage::new(64, 64);
        for y in 20..40 {
            for x in 20..40 {
                m.put_pixel(x, y, Luma([255]));
            }
        }
        let grown = build_region(
            &photo,
            &[m.clone()],
            &[],
            &RegionParams {
                feather_px: 0.0,
                grow_px: 4.0,
                refine_edges: false,
                coarse: false,
            },
        );
        assert_eq!(grown.get_pixel(17, 30)[0], 255);
        let shrunk = build_region(
            &photo,
            &[m.clone()],
            &[],
            &RegionParams {
                feather_px: 0.0,
                grow_px: -4.0,
                refine_edges: false,
                coarse: false,
            },
        );
        assert_eq!(shrunk.get_pixel(22, 30)[0], 0);
        let soft = build_region(
            &photo,
            &[m],
            &[],
            &RegionParams {
                feather_px: 6.0,
                grow_px: 0.0,
                refine_edges: false,
                coarse: false,
            },
        );
        let edge = soft.get_pixel(20, 30)[0];
        assert!((60..200).contains(&edge), "{edge}");
    }
}
