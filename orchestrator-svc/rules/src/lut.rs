//! Lookup tables for per-pixel maps that depend on few inputs. A rule's colour map is evaluated exactly at the
//! table's nodes (gamut mapping included) and interpolated per pixel, which turns ~100 flops and a bisection into a
//! few loads and multiply-adds.

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

/// A 3-D table over 8-bit RGB (33 nodes a side: ~8 codes apart), interpolated tetrahedrally.
pub struct Lut3 {
    data: Vec<[f32; 3]>,
}

const N3: usize = 33;
const STEP: f32 = 255.0 / (N3 - 1) as f32;

impl Lut3 {
    pub fn build(f: impl Fn([f32; 3]) -> [f32; 3] + Sync) -> Self {
        use rayon::prelude::*;
        let data = (0..N3 * N3 * N3)
            .into_par_iter()
            .map(|i| {
                let (r, g, b) = (i / (N3 * N3), (i / N3) % N3, i % N3);
                f([r as f32 * STEP, g as f32 * STEP, b as f32 * STEP])
            })
            .collect();
        Lut3 { data }
    }

    /// Tetrahedral interpolation: 4 nodes per pixel instead of trilinear's 8, and exact on the grey axis.
    #[inline]
    pub fn eval(&self, p: [u8; 3]) -> [f32; 3] {
        // Node index and fraction per channel from precomputed per-code tables (no float->int per pixel).
        let (r, fr) = SPLIT[p[0] as usize];
        let (g, fg) = SPLIT[p[1] as usize];
        let (b, fb) = SPLIT[p[2] as usize];
        let base = (r as usize * N3 + g as usize) * N3 + b as usize;
        let (dr, dg, db) = (N3 * N3, N3, 1);
        // The tetrahedron holding the point is fixed by the order of the fractions: step first along the axis with
        // the largest, then the middle one.
        let (o1, o2, w0, w1, w2) = if fr >= fg {
            if fg >= fb {
                (dr, dr + dg, fr, fg, fb)
            } else if fr >= fb {
                (dr, dr + db, fr, fb, fg)
            } else {
                (db, dr + db, fb, fr, fg)
            }
        } else if fb > fg {
            (db, dg + db, fb, fg, fr)
        } else if fb > fr {
            (dg, dg + db, fg, fb, fr)
        } else {
            (dg, dr + dg, fg, fr, fb)
        };
        let d = &self.data[base..base + dr + dg + db + 1];
        let (c0, c1, c2, c3) = (d[0], d[o1], d[o2], d[dr + dg + db]);
        [
            c0[0] + w0 * (c1[0] - c0[0]) + w1 * (c2[0] - c1[0]) + w2 * (c3[0] - c2[0]),
            c0[1] + w0 * (c1[1] - c0[1]) + w1 * (c2[1] - c1[1]) + w2 * (c3[1] - c2[1]),
            c0[2] + w0 * (c1[2] - c0[2]) + w1 * (c2[2] - c1[2]) + w2 * (c3[2] - c2[2]),
        ]
    }
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
        let id = Lut3::build(|c| c);
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
        let m = Lut3::build(f);
        for p in [[33u8, 77, 200], [250, 3, 100]] {
            let (a, b) = (m.eval(p), f(p.map(f32::from)));
            assert!(
                a.iter().zip(b).all(|(x, y)| (x - y).abs() < 0.5),
                "{a:?} vs {b:?}"
            );
        }
    }
}
