//! Lookup tables for per-pixel maps that depend on few inputs. A rule's colour map is evaluated exactly at the
//! table's nodes (gamut mapping included) and interpolated per pixel, which turns ~100 flops and a bisection into a
//! few loads and multiply-adds.

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
