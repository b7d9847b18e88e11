//! One texel row interpolated across an image row's span, for unrotated tiling: each image column has a fixed
//! pair of neighbouring texel columns and a fraction. `bilerp`'s first step (p + fx (q - p)), 8 columns at a time
//! with AVX2 gathers where the CPU has AVX2 + FMA; no FMA is formed, so both paths give the same floats.

/// Each image column's texel columns (i, i + 1 wrapped) as float offsets into a row of RGB texels, and its
/// fraction. The offsets are checked against the row length once, here: the gathers rely on it.
pub(super) struct Columns {
    /// 3 i and 3 i1: the first float of each texel.
    left: Vec<i32>,
    right: Vec<i32>,
    fx: Vec<f32>,
    /// Texels per row.
    lw: usize,
}

impl Columns {
    pub fn new(cols: impl Iterator<Item = (u32, u32, f32)>, lw: u32) -> Self {
        let (mut left, mut right, mut fx) = (Vec::new(), Vec::new(), Vec::new());
        for (i, i1, f) in cols {
            assert!(i < lw && i1 < lw);
            left.push(3 * i as i32);
            right.push(3 * i1 as i32);
            fx.push(f);
        }
        Columns {
            left,
            right,
            fx,
            lw: lw as usize,
        }
    }

    pub fn len(&self) -> usize {
        self.fx.len()
    }

    /// `out[c][k]` = texel row `texels` interpolated at column k, channel c.
    pub fn interpolate(&self, texels: &[[f32; 3]], out: &mut [Vec<f32>; 3]) {
        let n = self.len();
        assert!(texels.len() == self.lw && out.iter().all(|o| o.len() >= n));
        #[cfg(target_arch = "x86_64")]
        if crate::simd::active() == crate::simd::Level::Avx2Fma {
            // SAFETY: `active` is at most `detected`, which found AVX2 and FMA on this CPU; the row holds lw
            // texels (checked above) and every offset is below 3 lw (checked in `new`).
            #[allow(unsafe_code)]
            unsafe {
                self.avx2(texels, out)
            };
            return;
        }
        self.scalar(texels, out, 0);
    }

    /// The scalar path from column `from` on (the vector path's tail).
    fn scalar(&self, texels: &[[f32; 3]], out: &mut [Vec<f32>; 3], from: usize) {
        let flat = texels.as_flattened();
        for k in from..self.len() {
            let (l, r, fx) = (self.left[k] as usize, self.right[k] as usize, self.fx[k]);
            for (c, o) in out.iter_mut().enumerate() {
                let (p, q) = (flat[l + c], flat[r + c]);
                o[k] = p + fx * (q - p);
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; `texels.len() == self.lw` and each `out[c].len() >= self.len()`.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(&self, texels: &[[f32; 3]], out: &mut [Vec<f32>; 3]) {
        use std::arch::x86_64::*;
        let n = self.len();
        let flat = texels.as_flattened().as_ptr();
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: columns k..k + 8 exist in the three column arrays and in `out`; offsets + c (c < 3) are
            // below 3 lw, the row's length in floats.
            unsafe {
                let l = _mm256_loadu_si256(self.left.as_ptr().add(k).cast());
                let r = _mm256_loadu_si256(self.right.as_ptr().add(k).cast());
                let fx = _mm256_loadu_ps(self.fx.as_ptr().add(k));
                for (c, o) in out.iter_mut().enumerate() {
                    let p = _mm256_i32gather_ps::<4>(flat.add(c), l);
                    let q = _mm256_i32gather_ps::<4>(flat.add(c), r);
                    let v = _mm256_add_ps(p, _mm256_mul_ps(fx, _mm256_sub_ps(q, p)));
                    _mm256_storeu_ps(o.as_mut_ptr().add(k), v);
                }
            }
            k += 8;
        }
        self.scalar(texels, out, k);
    }
}
