//! The half of the guided filter's solve that depends only on the photo: the guide's box means and the inverse of
//! its regularised covariance, per (crop, r, s, eps). Regions of one photo with the same crop (a rule per concept,
//! each concept's union covering most of the frame, and a region's occluders, refined over its crop) share them:
//! 9 of the solve's 17 box filters and the 3x3 inverses are then done once per photo instead of once per region.

use std::sync::{Arc, Mutex};

use crate::filter::{Plane, box_mean, box_mean_product};
use crate::mask::Rect;
use image::RgbImage;
use rayon::prelude::*;

/// The guide's statistics over one crop at 1/s, for radius r (r / s at that scale) and regulariser eps.
pub struct GuideStats {
    pub(crate) key: GuideKey,
    /// The guide's sRGB planes (0..1), area-averaged by s: the mask's products with them are per region.
    pub(crate) i: Vec<Plane>,
    /// The guide's box means (r, g, b planes).
    pub(crate) mean: Vec<Plane>,
    /// Per grid pixel: the cofactors c00, c01, c02, c11, c12, c22 of the covariance plus eps on its diagonal, and
    /// 1 / det. Kept apart, not multiplied out, so a region's coefficients take the same floats in the same order
    /// as when each region solved alone (same bytes). Row by row, each row's seven values planar (`INVERSE`
    /// rows of the grid's width one after the other), so that the per-pixel loops run 8 pixels to a vector.
    pub(crate) inverse: Vec<f32>,
}

/// Row y of a grid plane.
fn grid_row(pl: &Plane, y: usize) -> &[f32] {
    &pl.data[y * pl.w..(y + 1) * pl.w]
}

/// Values per grid pixel in `GuideStats::inverse`.
const INVERSE: usize = 7;

/// What the statistics depend on besides the photo.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuideKey {
    pub crop: Rect,
    pub r: usize,
    pub s: usize,
    pub eps: f32,
}

impl GuideKey {
    pub fn new(crop: Rect, r: usize, s: usize, eps: f32) -> Self {
        GuideKey { crop, r, s, eps }
    }
}

impl GuideStats {
    /// The guide of `photo` over `key.crop`, area-averaged by `key.s`, and its windowed statistics.
    pub fn new(photo: &RgbImage, key: GuideKey) -> Self {
        let rs = (key.r / key.s).max(1);
        let i = crate::guided::guide_small(photo, key.crop, key.s);
        let mi: Vec<Plane> = i.iter().map(|pl| box_mean(pl, rs)).collect();
        // Second moments of the guide: rr, rg, rb, gg, gb, bb.
        let mii: Vec<Plane> = PAIRS
            .iter()
            .map(|&(a, b)| box_mean_product(&i[a], &i[b], rs))
            .collect();
        let w = i[0].w;
        // Every value is written below (`invert_row`): a spare buffer will do.
        let mut inverse = crate::spare::take(INVERSE * w * i[0].h);
        inverse
            .par_chunks_mut(INVERSE * w)
            .enumerate()
            .for_each(|(y, out)| {
                let row = |pl| grid_row(pl, y);
                invert_row(
                    out,
                    [row(&mi[0]), row(&mi[1]), row(&mi[2])],
                    std::array::from_fn(|q| row(&mii[q])),
                    key.eps,
                );
            });
        mii.into_iter().for_each(Plane::give_back);
        GuideStats {
            key,
            i,
            mean: mi,
            inverse,
        }
    }

    pub fn key(&self) -> GuideKey {
        self.key
    }
}

const PAIRS: [(usize, usize); 6] = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)];

/// One photo's `GuideStats`, made on first use per key and shared after (by the regions of one photo, possibly
/// built on different threads). Only for one photo: the key does not name it.
#[derive(Default)]
pub struct GuideCache {
    entries: Mutex<Vec<Arc<GuideStats>>>,
}

impl GuideCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The statistics for `key`, computed now unless a region of this photo made them already. Computed outside
    /// the lock: two regions asking at once may both compute them (the same values), never wait on each other.
    pub fn get(&self, photo: &RgbImage, key: GuideKey) -> Arc<GuideStats> {
        let find = |entries: &[Arc<GuideStats>]| entries.iter().find(|e| e.key == key).cloned();
        if let Some(found) = find(&self.lock()) {
            return found;
        }
        let made = Arc::new(GuideStats::new(photo, key));
        let mut entries = self.lock();
        if let Some(found) = find(&entries) {
            return found;
        }
        entries.push(made.clone());
        made
    }

    /// How many distinct statistics were made (tests, metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<GuideStats>>> {
        // A panic while holding the lock leaves the list as it was (pushes are whole): keep using it.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::guided::Coefficients {
    /// `Coefficients::solve_at` from the photo's shared half (`stats`) and `ps`, the mask over `stats.key().crop`
    /// area-averaged by its s: the mask's 8 box filters (its mean, its products with the guide, the coefficients'
    /// smoothing) and the per-pixel solve, in the order `solve_at` always took them.
    pub fn solve_with(stats: &GuideStats, ps: &Plane) -> Self {
        let GuideKey { crop, r, s, .. } = stats.key;
        let rs = (r / s).max(1);
        let (w, h) = (ps.w, ps.h);
        debug_assert_eq!((w, h), (stats.i[0].w, stats.i[0].h));
        let mean = |pl: &Plane| box_mean(pl, rs);
        let mp = mean(ps);
        let mip: Vec<Plane> = stats
            .i
            .iter()
            .map(|c| box_mean_product(c, ps, rs))
            .collect();
        // Every value is written below (`coefficient_row`): spare buffers will do.
        let mut coef: [Plane; 4] = std::array::from_fn(|_| Plane::spare(w, h));
        let [c0, c1, c2, c3] = &mut coef;
        c0.data
            .par_chunks_mut(w)
            .zip(c1.data.par_chunks_mut(w))
            .zip(c2.data.par_chunks_mut(w))
            .zip(c3.data.par_chunks_mut(w))
            .enumerate()
            .for_each(|(y, (((a0, a1), a2), b))| {
                let row = |pl| grid_row(pl, y);
                coefficient_row(
                    [a0, a1, a2, b],
                    &stats.inverse[y * INVERSE * w..(y + 1) * INVERSE * w],
                    [
                        row(&stats.mean[0]),
                        row(&stats.mean[1]),
                        row(&stats.mean[2]),
                    ],
                    [row(&mip[0]), row(&mip[1]), row(&mip[2])],
                    row(&mp),
                );
            });
        let cp: Vec<Plane> = coef.iter().map(mean).collect();
        [mp].into_iter()
            .chain(mip)
            .chain(coef)
            .for_each(Plane::give_back);
        let xs = crate::guided::ColumnTaps::new(crop.width() as usize, s, w);
        crate::guided::Coefficients { cp, s, xs }
    }
}

crate::simd::kernel! {
    /// `GuideStats::new`'s per-pixel step over one grid row: the covariance of the guide from its box means `m`
    /// and second moments `mm` (`PAIRS` order), plus eps on the diagonal, and its inverse by cofactors into `out`
    /// (`INVERSE` rows of the row's width). Indexed loops over slices cut to one length: LLVM vectorises them.
    fn invert_row(out: &mut [f32], m: [&[f32]; 3], mm: [&[f32]; 6], eps: f32) {
        let n = m[0].len();
        let (m0, m1, m2) = (&m[0][..n], &m[1][..n], &m[2][..n]);
        let mm: [&[f32]; 6] = std::array::from_fn(|q| &mm[q][..n]);
        let (o, rest) = out.split_at_mut(n);
        let (o1, rest) = rest.split_at_mut(n);
        let (o2, rest) = rest.split_at_mut(n);
        let (o3, rest) = rest.split_at_mut(n);
        let (o4, rest) = rest.split_at_mut(n);
        let (o5, o6) = rest.split_at_mut(n);
        let o6 = &mut o6[..n];
        for k in 0..n {
            let (r, g, b) = (m0[k], m1[k], m2[k]);
            // Symmetric 3x3 inverse by cofactors; eps on the diagonal keeps it well conditioned.
            let rr = mm[0][k] - r * r + eps;
            let rg = mm[1][k] - r * g;
            let rb = mm[2][k] - r * b;
            let gg = mm[3][k] - g * g + eps;
            let gb = mm[4][k] - g * b;
            let bb = mm[5][k] - b * b + eps;
            let c00 = gg * bb - gb * gb;
            let c01 = gb * rb - rg * bb;
            let c02 = rg * gb - gg * rb;
            o[k] = c00;
            o1[k] = c01;
            o2[k] = c02;
            o3[k] = rr * bb - rb * rb;
            o4[k] = rb * rg - rr * gb;
            o5[k] = rr * gg - rg * rg;
            o6[k] = 1.0 / (rr * c00 + rg * c01 + rb * c02);
        }
    }
}

crate::simd::kernel! {
    /// `Coefficients::solve_with`'s per-pixel step over one grid row: the guide's covariance with the mask (its
    /// box products `mip` less the means' product), times the inverse (`inv`, `invert_row`'s layout), gives a;
    /// b = mean(p) - a . mean(I).
    fn coefficient_row(
        out: [&mut [f32]; 4],
        inv: &[f32],
        m: [&[f32]; 3],
        mip: [&[f32]; 3],
        mp: &[f32],
    ) {
        let n = mp.len();
        let [a0, a1, a2, b] = out;
        let (a0, a1, a2, b) = (&mut a0[..n], &mut a1[..n], &mut a2[..n], &mut b[..n]);
        let c: [&[f32]; INVERSE] = std::array::from_fn(|q| &inv[q * n..(q + 1) * n]);
        let (m0, m1, m2) = (&m[0][..n], &m[1][..n], &m[2][..n]);
        let (p0, p1, p2) = (&mip[0][..n], &mip[1][..n], &mip[2][..n]);
        for k in 0..n {
            let cov = [p0[k] - m0[k] * mp[k], p1[k] - m1[k] * mp[k], p2[k] - m2[k] * mp[k]];
            let (c00, c01, c02, c11, c12, c22) = (c[0][k], c[1][k], c[2][k], c[3][k], c[4][k], c[5][k]);
            let x0 = (c00 * cov[0] + c01 * cov[1] + c02 * cov[2]) * c[6][k];
            let x1 = (c01 * cov[0] + c11 * cov[1] + c12 * cov[2]) * c[6][k];
            let x2 = (c02 * cov[0] + c12 * cov[1] + c22 * cov[2]) * c[6][k];
            a0[k] = x0;
            a1[k] = x1;
            a2[k] = x2;
            b[k] = mp[k] - x0 * m0[k] - x1 * m1[k] - x2 * m2[k];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::{RegionParams, build_region, build_region_shared};
    use image::{GrayImage, Luma, Rgb};

    #[test]
    fn regions_sharing_one_cache_give_build_regions_bytes() {
        // Three concepts covering the whole frame (one crop: one set of statistics), a grown one with an occluder
        // (the general path, its occluder refined over the same crop) and a preview's coarser solve (another s).
        let (w, h) = (203u32, 151u32);
        let photo = RgbImage::from_fn(w, h, |x, y| {
            let v = if x * 2 + y > 220 { 210 } else { 35 };
            Rgb([v, ((x * 7 + y * 3) % 90) as u8 + 80, 255 - v])
        });
        let soft = |cx: f32, cy: f32| {
            GrayImage::from_fn(w, h, |x, y| {
                let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
                Luma([(400.0 - 3.0 * d).clamp(1.0, 255.0) as u8])
            })
        };
        let (wall, floor, sofa) = (soft(60.0, 40.0), soft(150.0, 120.0), soft(100.0, 90.0));
        let plain = RegionParams::default();
        let grown = RegionParams {
            grow_px: 2.0,
            feather_px: 3.0,
            ..RegionParams::default()
        };
        let coarse = RegionParams {
            coarse: true,
            ..RegionParams::default()
        };
        let cases: [(&GrayImage, &[GrayImage], &RegionParams); 5] = [
            (&wall, &[], &plain),
            (&floor, &[], &plain),
            (&wall, std::slice::from_ref(&sofa), &grown),
            (&sofa, &[], &plain),
            (&floor, &[], &coarse),
        ];
        let guides = GuideCache::new();
        for (n, (target, occluders, params)) in cases.into_iter().enumerate() {
            let target = std::slice::from_ref(target);
            let borrowed: Vec<&GrayImage> = occluders.iter().collect();
            let shared = build_region_shared(&photo, target, &borrowed, params, &guides);
            let alone = build_region(&photo, target, occluders, params);
            assert_eq!(shared, alone, "region {n}");
            assert!(
                shared.as_raw().iter().any(|&v| v > 0 && v < 255),
                "region {n} is soft"
            );
        }
        // Every target covers the frame: one crop, at the job's s and the preview's.
        assert_eq!(guides.len(), 2);
    }

    #[test]
    #[ignore = "a measurement: cargo test --release -p palette-rules --lib guide_stats -- --ignored --nocapture"]
    fn three_full_frame_regions_with_and_without_shared_statistics() {
        // The bench's case: three concepts whose masks cover the frame, one thread, best of 5.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for (w, h) in [(1008u32, 756u32), (4032, 3024)] {
            let photo = RgbImage::from_fn(w, h, |x, y| {
                Rgb([
                    (x * 7 % 251) as u8,
                    (y * 5 % 241) as u8,
                    ((x + y) % 256) as u8,
                ])
            });
            let masks: Vec<GrayImage> = (0..3u32)
                .map(|k| {
                    GrayImage::from_fn(w, h, |x, y| {
                        Luma([((x / 3 + y / 5 + k * 40) % 200 + 20) as u8])
                    })
                })
                .collect();
            let params = RegionParams::default();
            let time = |shared: bool| {
                (0..5)
                    .map(|_| {
                        let guides = GuideCache::new();
                        let t = std::time::Instant::now();
                        for m in &masks {
                            let target = std::slice::from_ref(m);
                            std::hint::black_box(if shared {
                                build_region_shared(&photo, target, &[], &params, &guides)
                            } else {
                                build_region(&photo, target, &[], &params)
                            });
                        }
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .fold(f64::MAX, f64::min)
            };
            let (alone, shared) = pool.install(|| (time(false), time(true)));
            println!(
                "{w}x{h}: three regions {alone:.1} ms alone, {shared:.1} ms sharing statistics"
            );
        }
    }
}
