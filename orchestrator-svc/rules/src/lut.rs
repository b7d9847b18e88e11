//! Lookup tables for per-pixel maps that depend on few inputs. A rule's colour map is evaluated exactly at the
//! table's nodes (gamut mapping included) and interpolated per pixel, which turns ~100 flops and a bisection into a
//! few loads and multiply-adds.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A 1-D table of N-vectors over [lo, hi], linearly interpolated, clamped at the ends.
pub struct Lut1<const N: usize> {
    lo: f32,
    scale: f32,
    data: Vec<[f32; N]>,
}

impl<const N: usize> Lut1<N> {
    pub fn build(lo: f32, hi: f32, nodes: usize, f: impl Fn(f32) -> [f32; N]) -> Self {
        let step = (hi - lo) / (nodes - 1) as f32;
        let data = (0..nodes).map(|i| f(lo + i as f32 * step)).collect();
        Lut1 {
            lo,
            scale: 1.0 / step,
            data,
        }
    }

    /// (lo, 1 / node spacing, nodes): for vector kernels that do `eval`'s arithmetic themselves.
    pub(crate) fn raw(&self) -> (f32, f32, &[[f32; N]]) {
        (self.lo, self.scale, &self.data)
    }

    #[inline]
    pub fn eval(&self, x: f32) -> [f32; N] {
        let last = self.data.len() - 1;
        let t = ((x - self.lo) * self.scale).clamp(0.0, last as f32);
        let i = (t as usize).min(last - 1);
        let f = t - i as f32;
        let (a, b) = (&self.data[i], &self.data[i + 1]);
        std::array::from_fn(|k| a[k] + f * (b[k] - a[k]))
    }
}

/// A 3-D table over 8-bit RGB (33 nodes a side: ~8 codes apart), interpolated tetrahedrally. Nodes are evaluated
/// on first use: a photo region touches a small part of the colour cube, and evaluating all 36k nodes (each a
/// colour conversion and often a gamut-mapping bisection) cost more than interpolating a megapixel.
pub struct Lut3<F> {
    f: F,
    nodes: Vec<OnceLock<[f32; 3]>>,
    /// This table's number among all made (from 1), which marks its entries in the per-thread cell caches.
    id: u32,
}

pub const N3: usize = 33;
const STEP: f32 = 255.0 / (N3 - 1) as f32;

/// The 8-bit code (as a float) of each node along an axis, for callers that precompute per-axis terms.
pub fn node_code(i: usize) -> f32 {
    i as f32 * STEP
}

// Node offsets along each axis in the flattened table.
const DR: usize = N3 * N3;
const DG: usize = N3;
const DB: usize = 1;

/// The tetrahedron holding a point is fixed by the order of its three fractions: step first along the axis with the
/// largest, then the middle one. Indexed by (fr >= fg) | (fg >= fb) << 1 | (fr >= fb) << 2; entries 3 and 4 are
/// impossible orders (filled with a valid pair so the lookup stays branch-free).
const FIRST: [usize; 8] = [DB, DB, DG, DR, DG, DR, DG, DR];
const SECOND: [usize; 8] = [
    DG + DB,
    DR + DB,
    DG + DB,
    DR + DG,
    DG + DB,
    DR + DB,
    DR + DG,
    DR + DG,
];

impl<F: Fn([usize; 3]) -> [f32; 3] + Sync> Lut3<F> {
    /// A table of `f(node indices)`; [`node_code`] gives each index's 8-bit code.
    pub fn new(f: F) -> Self {
        Lut3 {
            f,
            nodes: (0..N3 * N3 * N3).map(|_| OnceLock::new()).collect(),
            // Relaxed: only uniqueness matters. (Wrapping after 2^32 tables could reuse an id still cached: a
            // process would have to make a table per millisecond for 50 days.)
            id: TABLES.fetch_add(1, Ordering::Relaxed).wrapping_add(1),
        }
    }

    #[inline]
    fn node(&self, i: usize) -> [f32; 3] {
        *self.nodes[i].get_or_init(|| (self.f)([i / (N3 * N3), (i / N3) % N3, i % N3]))
    }

    /// Tetrahedral interpolation: 4 nodes per pixel instead of trilinear's 8, exact on the grey axis, and without
    /// data-dependent branches (photo noise makes the fraction order random, and mispredicted branches used to cost
    /// more than the arithmetic).
    #[inline]
    pub fn eval(&self, p: [u8; 3]) -> [f32; 3] {
        // Node index and fraction per channel from precomputed per-code tables (no float->int per pixel).
        let (r, fr) = SPLIT[p[0] as usize];
        let (g, fg) = SPLIT[p[1] as usize];
        let (b, fb) = SPLIT[p[2] as usize];
        let base = (r as usize * N3 + g as usize) * N3 + b as usize;
        let case = (fr >= fg) as usize | ((fg >= fb) as usize) << 1 | ((fr >= fb) as usize) << 2;
        let hi = fr.max(fg).max(fb);
        let lo = fr.min(fg).min(fb);
        let mid = fr + fg + fb - hi - lo;
        let (c0, c1, c2, c3) = (
            self.node(base),
            self.node(base + FIRST[case]),
            self.node(base + SECOND[case]),
            self.node(base + DR + DG + DB),
        );
        std::array::from_fn(|k| {
            c0[k] + hi * (c1[k] - c0[k]) + mid * (c2[k] - c1[k]) + lo * (c3[k] - c2[k])
        })
    }
}

impl<F: Fn([usize; 3]) -> [f32; 3] + Sync> Lut3<F> {
    /// One row of `crate::ops::blend_masked` with the table as its edit: each pixel of `px` (RGB) whose `alpha`
    /// is not 0 becomes px + alpha * `k` * (table(px) - px), rounded; alpha-0 pixels keep their bytes. The same
    /// bytes as blending [`Lut3::eval`] per pixel. The AVX2 path does 8 pixels per step with the same operations in
    /// the same order (no FMA contraction); both read the nodes from this thread's [`CellCache`], filling a cell
    /// the first time a pixel of this table needs it.
    pub fn blend_row(&self, px: &mut [u8], alpha: &[u8], k: f32) {
        let n = alpha.len().min(px.len() / 3);
        let fill = |cell: usize| -> [[f32; 4]; 8] {
            let base = ((cell / (NC * NC)) * N3 + (cell / NC) % NC) * N3 + cell % NC;
            CORNERS.map(|off| {
                let [r, g, b] = self.node(base + off);
                [r, g, b, 0.0]
            })
        };
        CACHE.with_borrow_mut(|cache| {
            // Pixels done 8 at a time; the rest (all of them below AVX2) one at a time.
            #[cfg(target_arch = "x86_64")]
            let done = if crate::simd::active() == crate::simd::Level::Avx2Fma {
                // SAFETY: `active` is at most `detected`, which found AVX2 and FMA on this CPU.
                #[allow(unsafe_code)]
                unsafe {
                    avx2::blend_row(cache, self.id, &fill, &mut px[..3 * n], &alpha[..n], k)
                }
            } else {
                0
            };
            #[cfg(not(target_arch = "x86_64"))]
            let done = 0;
            for (p, &a) in px[3 * done..3 * n].chunks_exact_mut(3).zip(&alpha[done..n]) {
                blend_px(cache, self.id, &fill, p, a, k);
            }
        });
    }
}

/// Cells along an axis (the cubes between neighbouring nodes) and in all.
const NC: usize = N3 - 1;
const CELLS: usize = NC * NC * NC;

/// A cell's corners, numbered dr << 2 | dg << 1 | db, as node offsets.
const CORNERS: [usize; 8] = [0, DB, DG, DG + DB, DR, DR + DB, DR + DG, DR + DG + DB];
/// FIRST and SECOND as corner numbers.
const FIRST_C: [usize; 8] = [1, 1, 2, 4, 2, 4, 2, 4];
const SECOND_C: [usize; 8] = [3, 5, 3, 6, 3, 5, 6, 6];

/// Tables ever made, for [`Lut3`]'s id: a cell cache entry is valid for the table whose id it carries.
static TABLES: AtomicU32 = AtomicU32::new(0);

/// Per thread, the nodes of the cells that rows of recent tables needed: 8 corners per cell (as [r, g, b, 0], so
/// that the AVX2 kernel loads a node with one 128-bit load: gathering each channel, 12 gathers per 8 pixels, was
/// its bottleneck), and per cell the id of the table they belong to. Filling cells as rows need them, instead of
/// marking the region's cells in a pass before the blend, saves a pass over the photo (the marking pass was
/// memory-bound and cost a third as much as the blend itself). Corners are stored per cell, not shared, so that a
/// thread that interleaves rows of two tables (two items on one pool) never mixes their nodes. 4 MiB of address
/// space per thread; only the cells a photo's colours touch are ever written.
struct CellCache {
    owner: Vec<u32>,
    corners: Vec<[f32; 4]>,
}

thread_local! {
    static CACHE: RefCell<CellCache> = RefCell::new(CellCache {
        owner: vec![0; CELLS],
        corners: vec![[0.0; 4]; CELLS * 8],
    });
}

impl CellCache {
    /// Makes `cell` hold table `id`'s corners.
    #[inline]
    fn ensure(&mut self, id: u32, fill: &dyn Fn(usize) -> [[f32; 4]; 8], cell: usize) {
        if self.owner[cell] != id {
            self.corners[cell * 8..cell * 8 + 8].copy_from_slice(&fill(cell));
            self.owner[cell] = id;
        }
    }
}

/// One pixel of [`Lut3::blend_row`], with [`Lut3::eval`]'s arithmetic in the same order (so the same floats).
#[inline(always)]
fn blend_px(
    cache: &mut CellCache,
    id: u32,
    fill: &dyn Fn(usize) -> [[f32; 4]; 8],
    px: &mut [u8],
    a: u8,
    k: f32,
) {
    if a == 0 {
        return;
    }
    let src = [px[0], px[1], px[2]];
    let (r, fr) = SPLIT[src[0] as usize];
    let (g, fg) = SPLIT[src[1] as usize];
    let (b, fb) = SPLIT[src[2] as usize];
    let cell = (r as usize * NC + g as usize) * NC + b as usize;
    cache.ensure(id, fill, cell);
    let case = (fr >= fg) as usize | ((fg >= fb) as usize) << 1 | ((fr >= fb) as usize) << 2;
    let hi = fr.max(fg).max(fb);
    let lo = fr.min(fg).min(fb);
    let mid = fr + fg + fb - hi - lo;
    let c: &[[f32; 4]; 8] = cache.corners[cell * 8..cell * 8 + 8].try_into().unwrap();
    let (c0, c1, c2, c3) = (c[0], c[FIRST_C[case] & 7], c[SECOND_C[case] & 7], c[7]);
    let wgt = a as f32 * k;
    for ch in 0..3 {
        let e = c0[ch] + hi * (c1[ch] - c0[ch]) + mid * (c2[ch] - c1[ch]) + lo * (c3[ch] - c2[ch]);
        let v = src[ch] as f32 + wgt * (e - src[ch] as f32);
        px[ch] = (v + 0.5) as u8;
    }
}

/// The AVX2 row loop, 8 pixels a step. No closures inside the loop: LLVM left them out of line, as calls without
/// AVX2, in a first version; macros keep the shared steps inline.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::{CellCache, FIRST_C, NC, SECOND_C, STEP};
    use std::arch::x86_64::*;

    // Cell indices are packed with shifts below.
    const _: () = assert!(NC == 32);

    /// SPLIT's arithmetic on 8 codes (as floats): t = code / STEP, i = min(trunc t, N3 - 2), fraction t - i.
    /// The division is a product by the reciprocal corrected by its FMA residual (one Newton step), which rounds
    /// to the quotient itself for every code 0..=255 (`tests::split_matches_the_table` checks all) and costs less
    /// than three divisions per 8 pixels.
    macro_rules! split {
        ($c:expr) => {{
            let (c, step, inv) = ($c, _mm256_set1_ps(STEP), _mm256_set1_ps(1.0 / STEP));
            let q = _mm256_mul_ps(c, inv);
            let t = _mm256_fmadd_ps(_mm256_fnmadd_ps(q, step, c), inv, q);
            let i = _mm256_min_epi32(_mm256_cvttps_epi32(t), _mm256_set1_epi32(NC as i32 - 1));
            (i, _mm256_sub_ps(t, _mm256_cvtepi32_ps(i)))
        }};
    }

    /// [`super::Lut3::blend_row`] on whole groups of 8 pixels; returns how many pixels it did (a multiple of 8).
    /// Per group: the cell and fractions per channel, the cells of blended pixels filled where this thread's cache
    /// holds another table's, the tetrahedron from the fractions' order (the same corner tables, looked up with a
    /// lane permute), 4 corners x 8 pixels loaded and transposed to channel vectors, the blend and the saturating
    /// rounding, then the bytes re-interleaved and stored over the group's 24.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn blend_row(
        cache: &mut CellCache,
        id: u32,
        fill: &dyn Fn(usize) -> [[f32; 4]; 8],
        px: &mut [u8],
        alpha: &[u8],
        k: f32,
    ) -> usize {
        let n = alpha.len() / 8 * 8;
        assert!(px.len() >= 3 * n && cache.corners.len() == 8 * cache.owner.len());
        let as_i32 = |t: [usize; 8]| t.map(|v| v as i32);
        let [f0, f1, f2, f3, f4, f5, f6, f7] = as_i32(FIRST_C);
        let first = _mm256_setr_epi32(f0, f1, f2, f3, f4, f5, f6, f7);
        let [s0, s1, s2, s3, s4, s5, s6, s7] = as_i32(SECOND_C);
        let second = _mm256_setr_epi32(s0, s1, s2, s3, s4, s5, s6, s7);
        let far = _mm256_set1_epi32(7);
        let idv = _mm256_set1_epi32(id as i32);
        let mut idx = [[0i32; 8]; 4];
        let mut cells = [0i32; 8];
        for x in (0..n).step_by(8) {
            let a8 = u64::from_le_bytes(alpha[x..x + 8].try_into().unwrap());
            if a8 == 0 {
                continue;
            }
            let p = px[3 * x..3 * x + 24].as_mut_ptr();
            let [r, g, b] = crate::simd::load_rgb8!(p);
            let src = [
                _mm256_cvtepi32_ps(r),
                _mm256_cvtepi32_ps(g),
                _mm256_cvtepi32_ps(b),
            ];
            let ((ir, fr), (ig, fg), (ib, fb)) = (split!(src[0]), split!(src[1]), split!(src[2]));
            let cell = _mm256_or_si256(
                _mm256_or_si256(_mm256_slli_epi32::<10>(ir), _mm256_slli_epi32::<5>(ig)),
                ib,
            );
            let a = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(a8 as i64));
            let keep = _mm256_cmpeq_epi32(a, _mm256_setzero_si256());
            // SAFETY: cell indices are below CELLS (each of ir, ig, ib is at most NC - 1), the length of `owner`.
            let owner =
                unsafe { _mm256_i32gather_epi32::<4>(cache.owner.as_ptr() as *const i32, cell) };
            // Lanes to fill: blended (alpha > 0) and not yet this table's.
            let fresh = _mm256_or_si256(keep, _mm256_cmpeq_epi32(owner, idv));
            let mut todo = !_mm256_movemask_ps(_mm256_castsi256_ps(fresh)) & 0xff;
            if todo != 0 {
                // SAFETY: `cells` is 8 i32s, 32 bytes.
                unsafe { _mm256_storeu_si256(cells.as_mut_ptr() as *mut __m256i, cell) };
                while todo != 0 {
                    cache.ensure(id, fill, cells[todo.trailing_zeros() as usize] as usize);
                    todo &= todo - 1;
                }
            }
            let base = _mm256_slli_epi32::<3>(cell);
            macro_rules! bit {
                ($a:expr, $b:expr, $v:expr) => {
                    _mm256_and_si256(
                        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>($a, $b)),
                        _mm256_set1_epi32($v),
                    )
                };
            }
            let case = _mm256_or_si256(
                _mm256_or_si256(bit!(fr, fg, 1), bit!(fg, fb, 2)),
                bit!(fr, fb, 4),
            );
            let ids = [
                base,
                _mm256_add_epi32(base, _mm256_permutevar8x32_epi32(first, case)),
                _mm256_add_epi32(base, _mm256_permutevar8x32_epi32(second, case)),
                _mm256_add_epi32(base, far),
            ];
            for (to, i) in idx.iter_mut().zip(ids) {
                // SAFETY: `to` is 8 i32s, 32 bytes.
                unsafe { _mm256_storeu_si256(to.as_mut_ptr() as *mut __m256i, i) };
            }
            // Each node set as channel vectors: 8 loads of [r g b 0], paired into 256-bit halves (pixels j and
            // j + 4) and transposed.
            let mut c = [[_mm256_setzero_ps(); 3]; 4];
            for (to, i) in c.iter_mut().zip(&idx) {
                // SAFETY: every index is a cell's first corner (cell < CELLS) plus at most 7, so below 8 CELLS, the
                // length of `corners` (asserted): each load reads one corner's 4 floats inside it.
                let t: [__m256; 4] = std::array::from_fn(|j| unsafe {
                    let at = |k: usize| cache.corners.as_ptr().add(i[k] as usize) as *const f32;
                    _mm256_insertf128_ps::<1>(
                        _mm256_castps128_ps256(_mm_loadu_ps(at(j))),
                        _mm_loadu_ps(at(j + 4)),
                    )
                });
                *to = crate::simd::transpose_rgb4x8!(t);
            }
            let hi_f = _mm256_max_ps(_mm256_max_ps(fr, fg), fb);
            let lo_f = _mm256_min_ps(_mm256_min_ps(fr, fg), fb);
            let mid_f = _mm256_sub_ps(
                _mm256_sub_ps(_mm256_add_ps(_mm256_add_ps(fr, fg), fb), hi_f),
                lo_f,
            );
            let mut e = [_mm256_setzero_ps(); 3];
            for ch in 0..3 {
                let (c0, c1, c2, c3) = (c[0][ch], c[1][ch], c[2][ch], c[3][ch]);
                // c0 + hi (c1 - c0) + mid (c2 - c1) + lo (c3 - c2), left to right, as Lut3::eval.
                e[ch] = _mm256_add_ps(
                    _mm256_add_ps(
                        _mm256_add_ps(c0, _mm256_mul_ps(hi_f, _mm256_sub_ps(c1, c0))),
                        _mm256_mul_ps(mid_f, _mm256_sub_ps(c2, c1)),
                    ),
                    _mm256_mul_ps(lo_f, _mm256_sub_ps(c3, c2)),
                );
            }
            // Alpha-0 lanes keep their bytes whatever their (maybe another table's) cell holds.
            crate::simd::blend_store_rgb8!(p, src, e, a, k);
        }
        n
    }

    /// `split!` on every code, for the tests: (index, fraction) per code.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn split_codes() -> Vec<(i32, f32)> {
        let mut out = Vec::new();
        for c0 in (0..256).step_by(8) {
            let c = _mm256_setr_epi32(c0, c0 + 1, c0 + 2, c0 + 3, c0 + 4, c0 + 5, c0 + 6, c0 + 7);
            let (i, f) = split!(_mm256_cvtepi32_ps(c));
            let (mut iv, mut fv) = ([0i32; 8], [0f32; 8]);
            // SAFETY: each destination is 8 4-byte values, 32 bytes.
            unsafe {
                _mm256_storeu_si256(iv.as_mut_ptr() as *mut __m256i, i);
                _mm256_storeu_ps(fv.as_mut_ptr(), f);
            }
            out.extend((0..8).map(|k| (iv[k], fv[k])));
        }
        out
    }
}

/// A table of `f(8-bit codes as floats)`.
pub fn lut3_from_codes(
    f: impl Fn([f32; 3]) -> [f32; 3] + Sync,
) -> Lut3<impl Fn([usize; 3]) -> [f32; 3] + Sync> {
    Lut3::new(move |n: [usize; 3]| f(n.map(node_code)))
}

/// Per 8-bit code: the lower node index (at most N3 - 2) and the fraction toward the next node.
static SPLIT: std::sync::LazyLock<[(u8, f32); 256]> = std::sync::LazyLock::new(|| {
    std::array::from_fn(|c| {
        let t = c as f32 / STEP;
        let i = (t as usize).min(N3 - 2);
        (i as u8, t - i as f32)
    })
});

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 kernel's index and fraction arithmetic (reciprocal + FMA correction) against
    /// SPLIT's division, for every code: bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn split_matches_the_table() {
        if crate::simd::detected() != crate::simd::Level::Avx2Fma {
            return;
        }
        // SAFETY: `detected` found AVX2 and FMA on this CPU.
        #[allow(unsafe_code)]
        let got = unsafe { avx2::split_codes() };
        for (c, &(i, f)) in got.iter().enumerate() {
            let (want_i, want_f) = SPLIT[c];
            assert_eq!(
                (i, f.to_bits()),
                (want_i as i32, want_f.to_bits()),
                "code {c}"
            );
        }
    }

    /// Rows through `blend_row` at both levels, with every code in every channel and every tetrahedron: the same
    /// bytes, and those of `eval` blended per pixel; also after another table has filled this thread's cache.
    #[test]
    fn row_kernel_levels_agree() {
        let f = |c: [f32; 3]| {
            [
                255.0 * (c[0] / 255.0).powf(0.7),
                0.4 * c[1] + 0.5 * c[2],
                250.0 - 0.9 * c[2],
            ]
        };
        let lut = lut3_from_codes(f);
        let n = 256 * 6 + 5;
        let px: Vec<u8> = (0..n)
            .flat_map(|i| {
                let (c, perm) = ((i % 256) as u8, i / 256);
                let v = [c, c.wrapping_mul(7).wrapping_add(3), 255 - c];
                [
                    v[perm % 3],
                    v[(perm + 1 + perm / 3) % 3],
                    v[(perm + 2 - perm / 3) % 3],
                ]
            })
            .collect();
        let alpha: Vec<u8> = (0..n)
            .map(|i| if i % 37 < 3 { 0 } else { (i * 11 % 256) as u8 })
            .collect();
        let run = |level| {
            let mut out = px.clone();
            crate::simd::with_level(level, || lut.blend_row(&mut out, &alpha, 0.9 / 255.0));
            out
        };
        let base = run(crate::simd::Level::Baseline);
        assert!(base != px);
        assert!(run(crate::simd::detected()) == base);
        let other = lut3_from_codes(|c| c.map(|v| 255.0 - v));
        for level in [crate::simd::Level::Baseline, crate::simd::detected()] {
            let mut out = px.clone();
            crate::simd::with_level(level, || other.blend_row(&mut out, &alpha, 0.5 / 255.0));
            assert!(out != base);
            assert!(run(level) == base);
        }
        // And the per-pixel formulation.
        for ((p, &a), got) in px.chunks_exact(3).zip(&alpha).zip(base.chunks_exact(3)) {
            let e = lut.eval([p[0], p[1], p[2]]);
            let want: Vec<u8> = (0..3)
                .map(|c| {
                    let v = p[c] as f32 + a as f32 * (0.9 / 255.0) * (e[c] - p[c] as f32);
                    if a == 0 { p[c] } else { (v + 0.5) as u8 }
                })
                .collect();
            assert_eq!(got, &want[..]);
        }
    }

    #[test]
    fn tables_interpolate_smooth_maps() {
        let sq = Lut1::build(0.0, 1.0, 257, |x| [x * x]);
        assert!((sq.eval(0.3)[0] - 0.09).abs() < 1e-5);
        assert_eq!(sq.eval(2.0)[0], 1.0);
        let id = lut3_from_codes(|c| c);
        for p in [
            [17u8, 200, 255],
            [200, 17, 90],
            [90, 17, 200],
            [5, 5, 5],
            [255, 0, 128],
            [128, 255, 0],
        ] {
            let v = id.eval(p);
            assert!(
                v.iter().zip(p).all(|(a, b)| (a - b as f32).abs() < 1e-3),
                "{p:?} -> {v:?}"
            );
        }
        // A smooth non-linear map stays within half a code.
        let f = |c: [f32; 3]| {
            [
                255.0 * (c[0] / 255.0).powf(0.8),
                0.5 * c[1] + 0.3 * c[2],
                c[2],
            ]
        };
        let m = lut3_from_codes(f);
        for p in [[33u8, 77, 200], [250, 3, 100]] {
            let (a, b) = (m.eval(p), f(p.map(f32::from)));
            assert!(
                a.iter().zip(b).all(|(x, y)| (x - y).abs() < 0.5),
                "{a:?} vs {b:?}"
            );
        }
    }
}
