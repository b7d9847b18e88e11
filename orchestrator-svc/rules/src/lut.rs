//! Lookup tables for per-pixel maps that depend on few inputs. A rule's colour map is evaluated exactly at the
//! table's nodes (gamut mapping included) and interpolated per pixel, which turns ~100 flops and a bisection into a
//! few loads and multiply-adds.

use rayon::prelude::*;
use std::sync::OnceLock;

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
    /// The nodes of the marked cells (see [`mark_cells`]), evaluated in parallel and laid out densely for
    /// [`blend_row`]; nodes of unmarked cells are 0 there and must not be read for a pixel that is blended.
    pub fn nodes(&self, cells: &[bool]) -> Nodes {
        let mut used = vec![false; NODES];
        for cell in (0..CELLS).filter(|&c| cells[c]) {
            let base = ((cell / (NC * NC)) * N3 + (cell / NC) % NC) * N3 + cell % NC;
            for off in [0, DB, DG, DG + DB, DR, DR + DB, DR + DG, DR + DG + DB] {
                used[base + off] = true;
            }
        }
        let todo: Vec<usize> = (0..NODES).filter(|&i| used[i]).collect();
        let values: Vec<[f32; 3]> = todo.par_iter().map(|&i| self.node(i)).collect();
        let mut data = vec![[0.0; 4]; NODES];
        for (&i, [r, g, b]) in todo.iter().zip(values) {
            data[i] = [r, g, b, 0.0];
        }
        Nodes { data }
    }
}

/// Cells along an axis (the cubes between neighbouring nodes) and in all.
const NC: usize = N3 - 1;
pub const CELLS: usize = NC * NC * NC;
const NODES: usize = N3 * N3 * N3;

/// Marks in `cells` (CELLS + 1 long; the last is a scratch entry) the cell of every pixel of `px` (RGB) whose
/// `alpha` is not 0: the cells whose nodes [`blend_row`] will read.
pub fn mark_cells(cells: &mut [bool], px: &[u8], alpha: &[u8]) {
    assert_eq!(cells.len(), CELLS + 1);
    let n = alpha.len().min(px.len() / 3);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::active() == crate::simd::Level::Avx2Fma {
        // SAFETY: `active` is at most `detected`, which found AVX2 and FMA on this CPU.
        #[allow(unsafe_code)]
        {
            done = unsafe { avx2::mark_cells(cells, &px[..3 * n], &alpha[..n]) };
        }
    }
    let split = &*SPLIT;
    for (p, &a) in px[3 * done..3 * n].chunks_exact(3).zip(&alpha[done..n]) {
        if a != 0 {
            let [r, g, b] = [0, 1, 2].map(|c| split[p[c] as usize].0 as usize);
            cells[(r * NC + g) * NC + b] = true;
        }
    }
}

/// A [`Lut3`]'s nodes as plain RGB floats padded to 16 bytes, in the table's order: the AVX2 row kernel loads a
/// node with one 128-bit load (faster than gathering each channel: 12 gathers per 8 pixels were its bottleneck).
pub struct Nodes {
    data: Vec<[f32; 4]>,
}

impl Nodes {
    /// [`Lut3::eval`] on these nodes, with the same arithmetic in the same order (so the same floats).
    #[inline(always)]
    fn eval(&self, p: [u8; 3]) -> [f32; 3] {
        let (r, fr) = SPLIT[p[0] as usize];
        let (g, fg) = SPLIT[p[1] as usize];
        let (b, fb) = SPLIT[p[2] as usize];
        let base = (r as usize * N3 + g as usize) * N3 + b as usize;
        let case = (fr >= fg) as usize | ((fg >= fb) as usize) << 1 | ((fr >= fb) as usize) << 2;
        let hi = fr.max(fg).max(fb);
        let lo = fr.min(fg).min(fb);
        let mid = fr + fg + fb - hi - lo;
        let (c0, c1, c2, c3) = (
            self.data[base],
            self.data[base + FIRST[case]],
            self.data[base + SECOND[case]],
            self.data[base + DR + DG + DB],
        );
        std::array::from_fn(|k| {
            c0[k] + hi * (c1[k] - c0[k]) + mid * (c2[k] - c1[k]) + lo * (c3[k] - c2[k])
        })
    }
}

/// One pixel of [`blend_row`]: `crate::ops::blend_masked`'s blend of the table's colour, to the same bytes.
#[inline(always)]
fn blend_px(nodes: &Nodes, px: &mut [u8], a: u8, k: f32) {
    if a == 0 {
        return;
    }
    let src = [px[0], px[1], px[2]];
    let e = nodes.eval(src);
    let wgt = a as f32 * k;
    for c in 0..3 {
        let v = src[c] as f32 + wgt * (e[c] - src[c] as f32);
        px[c] = (v + 0.5) as u8;
    }
}

/// One row of `crate::ops::blend_masked` with the table as its edit: each pixel of `px` (RGB) whose `alpha` is
/// not 0 becomes px + alpha * `k` * (table(px) - px), rounded; alpha-0 pixels keep their bytes. The AVX2 path does 8
/// pixels per step with the same operations in the same order (no FMA contraction), so it gives the same bytes.
pub fn blend_row(nodes: &Nodes, px: &mut [u8], alpha: &[u8], k: f32) {
    let n = alpha.len().min(px.len() / 3);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::active() == crate::simd::Level::Avx2Fma {
        // SAFETY: `active` is at most `detected`, which found AVX2 and FMA on this CPU.
        #[allow(unsafe_code)]
        {
            done = unsafe { avx2::blend_row(nodes, &mut px[..3 * n], &alpha[..n], k) };
        }
    }
    for (p, &a) in px[3 * done..3 * n].chunks_exact_mut(3).zip(&alpha[done..n]) {
        blend_px(nodes, p, a, k);
    }
}

/// AVX2 versions of the row loops, 8 pixels a step. No closures inside the loops: LLVM left them out of line, as
/// calls without AVX2, in a first version; macros keep the shared steps inline.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::{CELLS, DB, DG, DR, FIRST, N3, NC, NODES, Nodes, SECOND, STEP};
    use std::arch::x86_64::*;

    /// The R, G and B codes of 8 RGB pixels at `p` (24 bytes readable) as floats.
    macro_rules! load_rgb {
        ($p:expr) => {{
            // SAFETY: the caller's `p` has 24 readable bytes; the loads read 0..16 and 16..24.
            let (lo, hi) = unsafe {
                (
                    _mm_loadu_si128($p as *const __m128i),
                    _mm_loadl_epi64($p.add(16) as *const __m128i),
                )
            };
            // Byte shuffles that pick one channel out of bytes 0..16 (`lo`) and 16..24 (`hi`).
            let x = -1;
            let channel = [
                (
                    _mm_setr_epi8(0, 3, 6, 9, 12, 15, x, x, x, x, x, x, x, x, x, x),
                    _mm_setr_epi8(x, x, x, x, x, x, 2, 5, x, x, x, x, x, x, x, x),
                ),
                (
                    _mm_setr_epi8(1, 4, 7, 10, 13, x, x, x, x, x, x, x, x, x, x, x),
                    _mm_setr_epi8(x, x, x, x, x, 0, 3, 6, x, x, x, x, x, x, x, x),
                ),
                (
                    _mm_setr_epi8(2, 5, 8, 11, 14, x, x, x, x, x, x, x, x, x, x, x),
                    _mm_setr_epi8(x, x, x, x, x, 1, 4, 7, x, x, x, x, x, x, x, x),
                ),
            ];
            let mut out = [_mm256_setzero_ps(); 3];
            for c in 0..3 {
                let bytes = _mm_or_si128(
                    _mm_shuffle_epi8(lo, channel[c].0),
                    _mm_shuffle_epi8(hi, channel[c].1),
                );
                out[c] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
            }
            out
        }};
    }

    /// SPLIT's arithmetic on 8 codes (as floats): t = code / STEP, i = min(trunc t, N3 - 2), fraction t - i.
    macro_rules! split {
        ($c:expr) => {{
            let t = _mm256_div_ps($c, _mm256_set1_ps(STEP));
            let i = _mm256_min_epi32(_mm256_cvttps_epi32(t), _mm256_set1_epi32((N3 - 2) as i32));
            (i, _mm256_sub_ps(t, _mm256_cvtepi32_ps(i)))
        }};
    }

    /// [`super::mark_cells`] on whole groups of 8 pixels; returns how many pixels it did.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn mark_cells(cells: &mut [bool], px: &[u8], alpha: &[u8]) -> usize {
        let n = alpha.len() / 8 * 8;
        assert!(px.len() >= 3 * n && cells.len() == CELLS + 1);
        let mut idx = [0i32; 8];
        for x in (0..n).step_by(8) {
            let a8 = u64::from_le_bytes(alpha[x..x + 8].try_into().unwrap());
            if a8 == 0 {
                continue;
            }
            let [r, g, b] = load_rgb!(px[3 * x..3 * x + 24].as_ptr());
            let (ir, ig, ib) = (split!(r).0, split!(g).0, split!(b).0);
            let nc = _mm256_set1_epi32(NC as i32);
            let cell = _mm256_add_epi32(
                _mm256_mullo_epi32(_mm256_add_epi32(_mm256_mullo_epi32(ir, nc), ig), nc),
                ib,
            );
            // Alpha-0 pixels mark the scratch entry.
            let a = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(a8 as i64));
            let off = _mm256_cmpeq_epi32(a, _mm256_setzero_si256());
            let cell = _mm256_blendv_epi8(cell, _mm256_set1_epi32(CELLS as i32), off);
            // SAFETY: idx is 8 i32s, 32 bytes.
            unsafe { _mm256_storeu_si256(idx.as_mut_ptr() as *mut __m256i, cell) };
            for i in idx {
                cells[i as usize] = true;
            }
        }
        n
    }

    /// [`super::blend_row`] on whole groups of 8 pixels; returns how many pixels it did (a multiple of 8). Per
    /// group: the node index and fractions per channel, the tetrahedron from the fractions' order (the same
    /// FIRST/SECOND tables, looked up with a lane permute), 4 nodes x 8 pixels loaded and transposed to channel
    /// vectors, the blend and the saturating rounding, then the bytes re-interleaved and stored over the group's 24.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn blend_row(nodes: &Nodes, px: &mut [u8], alpha: &[u8], k: f32) -> usize {
        let n = alpha.len() / 8 * 8;
        assert!(px.len() >= 3 * n && nodes.data.len() == NODES);
        let x = -1;
        // Back to RGB from [r0..3 g0..3 b0..3 ..] (`l`) and [r4..7 g4..7 b4..7 ..] (`h`): bytes 0..16 and 16..24.
        let out_l = _mm_setr_epi8(0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11, x, x, x, x);
        let out_h = _mm_setr_epi8(x, x, x, x, x, x, x, x, x, x, x, x, 0, 4, 8, 1);
        let out_h2 = _mm_setr_epi8(5, 9, 2, 6, 10, 3, 7, 11, x, x, x, x, x, x, x, x);
        let as_i32 = |t: [usize; 8]| t.map(|v| v as i32);
        let [f0, f1, f2, f3, f4, f5, f6, f7] = as_i32(FIRST);
        let first = _mm256_setr_epi32(f0, f1, f2, f3, f4, f5, f6, f7);
        let [s0, s1, s2, s3, s4, s5, s6, s7] = as_i32(SECOND);
        let second = _mm256_setr_epi32(s0, s1, s2, s3, s4, s5, s6, s7);
        let far = _mm256_set1_epi32((DR + DG + DB) as i32);
        let n3 = _mm256_set1_epi32(N3 as i32);
        let (zero, half, top, kv) = (
            _mm256_setzero_ps(),
            _mm256_set1_ps(0.5),
            _mm256_set1_ps(255.0),
            _mm256_set1_ps(k),
        );
        let data = nodes.data.as_ptr() as *const f32;
        let mut idx = [[0i32; 8]; 4];
        for x in (0..n).step_by(8) {
            let a8 = u64::from_le_bytes(alpha[x..x + 8].try_into().unwrap());
            if a8 == 0 {
                continue;
            }
            let p = px[3 * x..3 * x + 24].as_mut_ptr();
            let src = load_rgb!(p);
            let ((ir, fr), (ig, fg), (ib, fb)) = (split!(src[0]), split!(src[1]), split!(src[2]));
            let base = _mm256_add_epi32(
                _mm256_mullo_epi32(_mm256_add_epi32(_mm256_mullo_epi32(ir, n3), ig), n3),
                ib,
            );
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
                // SAFETY: base is at most node (N3-2, N3-2, N3-2) and the offsets at most DR + DG + DB, so every
                // index is below NODES: each load reads one node's 4 floats inside `nodes.data` (asserted).
                let t: [__m256; 4] = std::array::from_fn(|j| unsafe {
                    let at = |k: usize| data.add(4 * i[k] as usize);
                    _mm256_insertf128_ps::<1>(
                        _mm256_castps128_ps256(_mm_loadu_ps(at(j))),
                        _mm_loadu_ps(at(j + 4)),
                    )
                });
                let (u0, u1) = (
                    _mm256_unpacklo_ps(t[0], t[1]),
                    _mm256_unpackhi_ps(t[0], t[1]),
                );
                let (u2, u3) = (
                    _mm256_unpacklo_ps(t[2], t[3]),
                    _mm256_unpackhi_ps(t[2], t[3]),
                );
                *to = [
                    _mm256_shuffle_ps::<0x44>(u0, u2),
                    _mm256_shuffle_ps::<0xEE>(u0, u2),
                    _mm256_shuffle_ps::<0x44>(u1, u3),
                ];
            }
            let hi_f = _mm256_max_ps(_mm256_max_ps(fr, fg), fb);
            let lo_f = _mm256_min_ps(_mm256_min_ps(fr, fg), fb);
            let mid_f = _mm256_sub_ps(
                _mm256_sub_ps(_mm256_add_ps(_mm256_add_ps(fr, fg), fb), hi_f),
                lo_f,
            );
            let a = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(a8 as i64));
            let wgt = _mm256_mul_ps(_mm256_cvtepi32_ps(a), kv);
            // Alpha-0 lanes take their own colour as the edit, so that they blend to their own bytes whatever the
            // (unevaluated, 0) nodes they point at.
            let keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(a, _mm256_setzero_si256()));
            let mut res = [_mm256_setzero_si256(); 3];
            for ch in 0..3 {
                let (c0, c1, c2, c3) = (c[0][ch], c[1][ch], c[2][ch], c[3][ch]);
                // c0 + hi (c1 - c0) + mid (c2 - c1) + lo (c3 - c2), left to right, as Lut3::eval.
                let e = _mm256_add_ps(
                    _mm256_add_ps(
                        _mm256_add_ps(c0, _mm256_mul_ps(hi_f, _mm256_sub_ps(c1, c0))),
                        _mm256_mul_ps(mid_f, _mm256_sub_ps(c2, c1)),
                    ),
                    _mm256_mul_ps(lo_f, _mm256_sub_ps(c3, c2)),
                );
                let s = src[ch];
                let e = _mm256_blendv_ps(e, s, keep);
                let v = _mm256_add_ps(s, _mm256_mul_ps(wgt, _mm256_sub_ps(e, s)));
                // `(v + 0.5) as u8`: saturating, NaN to 0 (max returns its second operand for NaN).
                let v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, half), zero), top);
                res[ch] = _mm256_cvttps_epi32(v);
            }
            let bytes = _mm256_packus_epi16(
                _mm256_packus_epi32(res[0], res[1]),
                _mm256_packus_epi32(res[2], res[2]),
            );
            let (l, h) = (
                _mm256_castsi256_si128(bytes),
                _mm256_extracti128_si256::<1>(bytes),
            );
            let head = _mm_or_si128(_mm_shuffle_epi8(l, out_l), _mm_shuffle_epi8(h, out_h));
            let tail = _mm_shuffle_epi8(h, out_h2);
            // SAFETY: the same 24 bytes of `px` as loaded: 0..16 and 16..24.
            unsafe {
                _mm_storeu_si128(p as *mut __m128i, head);
                _mm_storel_epi64(p.add(16) as *mut __m128i, tail);
            }
        }
        n
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
