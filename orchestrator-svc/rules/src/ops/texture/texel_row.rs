//! One texel row interpolated across an image row's span, for unrotated tiling: each image column has a fixed
//! pair of neighbouring texel columns and a fraction. `bilerp`'s first step (p + fx (q - p)), 8 columns at a time
//! with AVX2 gathers where the CPU has AVX2 + FMA; no FMA is formed, so both paths give the same floats.

/// Each image column's texel columns (i, i + 1 wrapped) and fraction. The columns are checked against the row
/// length once, here: the vector path's loads rely on it.
pub(super) struct Columns {
    i: Vec<i32>,
    i1: Vec<i32>,
    fx: Vec<f32>,
    /// Texels per row.
    lw: usize,
}

impl Columns {
    pub fn new(cols: impl Iterator<Item = (u32, u32, f32)>, lw: u32) -> Self {
        let (mut i, mut i1, mut fx) = (Vec::new(), Vec::new(), Vec::new());
        for (a, b, f) in cols {
            assert!(a < lw && b < lw);
            i.push(a as i32);
            i1.push(b as i32);
            fx.push(f);
        }
        Columns {
            i,
            i1,
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
            // texels (checked above) and every column is below lw (checked in `new`).
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
        for k in from..self.len() {
            let (p, q, fx) = (
                texels[self.i[k] as usize],
                texels[self.i1[k] as usize],
                self.fx[k],
            );
            for (c, o) in out.iter_mut().enumerate() {
                o[k] = p[c] + fx * (q[c] - p[c]);
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
        // The row one plane per channel, continued by its first 8 texels: texel i + 1 is then the wrapped i1, and
        // 8 texels from any column load in one go.
        let stride = self.lw + 8;
        let mut planes = vec![0.0f32; 3 * stride];
        for k in 0..stride {
            let t = texels[k % self.lw];
            for c in 0..3 {
                planes[c * stride + k] = t[c];
            }
        }
        let (zero, one, six) = (
            _mm256_setzero_si256(),
            _mm256_set1_epi32(1),
            _mm256_set1_epi32(6),
        );
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: columns k..k + 8 exist in the column arrays and in `out`. Texel columns are below lw, so
            // gathers at i and i1 and the 8-texel load from i0 + c stride (i0 < lw) stay within the planes.
            unsafe {
                let i = _mm256_loadu_si256(self.i.as_ptr().add(k).cast());
                let fx = _mm256_loadu_ps(self.fx.as_ptr().add(k));
                // Magnified tiles (most: scale 1 puts a texel on two pixels) keep 8 columns within 8 texels: one
                // load and two permutes per channel instead of two gathers, which cost ~10 cycles each on Zen 4.
                let i0 = *self.i.get_unchecked(k);
                let d = _mm256_sub_epi32(i, _mm256_set1_epi32(i0));
                let outside =
                    _mm256_or_si256(_mm256_cmpgt_epi32(d, six), _mm256_cmpgt_epi32(zero, d));
                if _mm256_testz_si256(outside, outside) == 1 {
                    let d1 = _mm256_add_epi32(d, one);
                    for (c, o) in out.iter_mut().enumerate() {
                        let run = _mm256_loadu_ps(planes.as_ptr().add(c * stride + i0 as usize));
                        let p = _mm256_permutevar8x32_ps(run, d);
                        let q = _mm256_permutevar8x32_ps(run, d1);
                        let v = _mm256_add_ps(p, _mm256_mul_ps(fx, _mm256_sub_ps(q, p)));
                        _mm256_storeu_ps(o.as_mut_ptr().add(k), v);
                    }
                } else {
                    let i1 = _mm256_loadu_si256(self.i1.as_ptr().add(k).cast());
                    for (c, o) in out.iter_mut().enumerate() {
                        let plane = planes.as_ptr().add(c * stride);
                        let p = _mm256_i32gather_ps::<4>(plane, i);
                        let q = _mm256_i32gather_ps::<4>(plane, i1);
                        let v = _mm256_add_ps(p, _mm256_mul_ps(fx, _mm256_sub_ps(q, p)));
                        _mm256_storeu_ps(o.as_mut_ptr().add(k), v);
                    }
                }
            }
            k += 8;
        }
        self.scalar(texels, out, k);
    }
}
