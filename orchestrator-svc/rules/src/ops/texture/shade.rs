//! The texture's per-pixel tail as a row kernel: the swatch colour (linear, one plane per channel) lit by the
//! photo's light, rolled off past the knee, mixed by opacity, encoded to sRGB and blended by the region's weight,
//! in place. The AVX2 path does 8 pixels at a time with the same operations in the same order as the scalar one
//! (table lookups become gathers; no FMA is formed), so both give the same bytes.

use crate::color::{ENC_N, encode_with, luminance};
use crate::light::KNEE;
use crate::lut::Lut1;

/// What the shading needs besides the pixel: the colour tables and the rule's constants.
pub(super) struct Shade<'a> {
    /// sRGB code -> linear.
    pub lt: &'a [f32; 256],
    /// Linear -> sRGB code, `ENC_N + 1` entries (see `encode_with`).
    pub enc: &'a [f32],
    pub inv_lit: f32,
    pub opacity: f32,
    /// The shoulder's roll-off factor (rolled-off / input) over [KNEE, top]; None when nothing can pass white.
    pub roll_off: Option<&'a Lut1<1>>,
    /// strength / 255: the region's weight (a byte) times this is the blend weight.
    pub k: f32,
}

/// A row of swatch colours as two rows of planes and the fraction between them (see [`Shade::row`]).
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    pub top: [&'a [f32]; 3],
    pub bot: [&'a [f32]; 3],
    pub fy: f32,
}

impl Shade<'_> {
    /// One pixel: swatch colour `s` (linear) on photo pixel `src` of weight `a`. The reference formulation; the
    /// vector path must match it bit for bit.
    #[inline]
    fn px(&self, s: [f32; 3], src: [u8; 3], a: u8) -> [u8; 3] {
        let inp = src.map(|c| self.lt[c as usize]);
        let light = luminance(inp[0], inp[1], inp[2]) * self.inv_lit;
        let mut t = s.map(|v| v * light);
        // Past the knee, the whole colour scales with its largest channel's roll-off: hue and chroma survive and
        // no channel flattens at 255 (see recolor.rs).
        if let Some(roll_off) = self.roll_off {
            let m = t[0].max(t[1]).max(t[2]);
            if m > KNEE {
                let k = roll_off.eval(m)[0];
                t = t.map(|v| v * k);
            }
        }
        let wgt = a as f32 * self.k;
        std::array::from_fn(|c| {
            let e = encode_with(self.enc, inp[c] + self.opacity * (t[c] - inp[c]));
            let v = src[c] as f32 + wgt * (e - src[c] as f32);
            // Float-to-int `as` saturates (and maps NaN to 0): the clamp is built in.
            (v + 0.5) as u8
        })
    }

    /// Shades a row span in place: `px` is its RGB bytes, `alpha` its weights, the swatch colour is
    /// `top` + `fy` (`bot` - `top`) by planes (each at least as long as `alpha`: bilerp's last step, done here so
    /// that it is not a pass of its own; a ready colour passes itself twice and 0). Pixels of weight 0 keep their
    /// bytes.
    pub fn row(&self, px: &mut [u8], alpha: &[u8], rows: Rows) {
        let n = alpha.len();
        assert!(px.len() == 3 * n && rows.top.iter().chain(&rows.bot).all(|c| c.len() >= n));
        assert!(self.enc.len() == ENC_N + 1);
        #[cfg(target_arch = "x86_64")]
        if crate::simd::active() == crate::simd::Level::Avx2Fma {
            // SAFETY: `active` is at most `detected`, which found AVX2 and FMA on this CPU; the lengths were
            // checked above.
            #[allow(unsafe_code)]
            unsafe {
                avx2::row(self, px, alpha, rows)
            };
            return;
        }
        self.scalar(px, alpha, rows, 0);
    }

    /// The scalar path from pixel `from` on (the vector path's tail).
    #[inline]
    fn scalar(&self, px: &mut [u8], alpha: &[u8], rows: Rows, from: usize) {
        let Rows { top, bot, fy } = rows;
        for x in from..alpha.len() {
            let a = alpha[x];
            if a == 0 {
                continue;
            }
            let p = &mut px[3 * x..3 * x + 3];
            let s = std::array::from_fn(|c| top[c][x] + fy * (bot[c][x] - top[c][x]));
            let out = self.px(s, [p[0], p[1], p[2]], a);
            p.copy_from_slice(&out);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::{ENC_N, KNEE, Rows, Shade};
    use std::arch::x86_64::*;

    /// pshufb masks that pick channel `c` of 8 packed RGB pixels into bytes 0..8: from the 16 bytes at offset 0
    /// (`hi` false) or at offset 8 (`hi` true); a byte comes from the first load that holds it, -1 zeroes.
    const fn deinterleave(c: usize, hi: bool) -> [i8; 16] {
        let mut m = [-1i8; 16];
        let mut i = 0;
        while i < 8 {
            let pos = 3 * i + c;
            if pos < 16 && !hi {
                m[i] = pos as i8;
            } else if pos >= 16 && hi {
                m[i] = (pos - 8) as i8;
            }
            i += 1;
        }
        m
    }

    /// pshufb masks that build output bytes `start..start + 16` of 8 packed RGB pixels from [r0..r7, g0..g7]
    /// (`b` false) or [b0..b7] (`b` true).
    const fn interleave(start: usize, b: bool) -> [i8; 16] {
        let mut m = [-1i8; 16];
        let mut k = 0;
        while k < 16 {
            let o = start + k;
            if o < 24 {
                let (i, c) = (o / 3, o % 3);
                if b && c == 2 {
                    m[k] = i as i8;
                } else if !b && c < 2 {
                    m[k] = (8 * c + i) as i8;
                }
            }
            k += 1;
        }
        m
    }

    const MASKS: [[i8; 16]; 10] = [
        deinterleave(0, false),
        deinterleave(0, true),
        deinterleave(1, false),
        deinterleave(1, true),
        deinterleave(2, false),
        deinterleave(2, true),
        interleave(0, false),
        interleave(0, true),
        interleave(16, false),
        interleave(16, true),
    ];

    /// Eight i32 in 0..=255 to their bytes in the low 8 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn bytes(v: __m256i) -> __m128i {
        let w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        _mm_packus_epi16(w, w)
    }

    /// One channel's codes of 8 packed RGB pixels (`lo`: their bytes 0..16, `hi`: 8..24) by its two masks.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn codes(lo: __m128i, hi: __m128i, m_lo: __m128i, m_hi: __m128i) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_or_si128(
            _mm_shuffle_epi8(lo, m_lo),
            _mm_shuffle_epi8(hi, m_hi),
        ))
    }

    /// Per-row constants, splatted.
    struct Consts {
        zero: __m256,
        one: __m256,
        half: __m256,
        opacity: __m256,
        enc_n: __m256,
        enc_max: __m256i,
        max_code: __m256,
    }

    /// One channel's tail: mix by opacity, encode (as `encode_with`: max/min, where max_ps returns its second
    /// operand on NaN as f32::max does; sqrt; index rounded by + 0.5 and truncation, clamped to the table), blend
    /// with the source code by `wgt` and round (the scalar path's saturating cast: clamp to 0..=255, truncate).
    ///
    /// # Safety
    /// `enc` has ENC_N + 1 floats.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn encode_blend(
        c: &Consts,
        enc: *const f32,
        inp: __m256,
        t: __m256,
        src: __m256i,
        wgt: __m256,
    ) -> __m128i {
        let mix = _mm256_add_ps(inp, _mm256_mul_ps(c.opacity, _mm256_sub_ps(t, inp)));
        let q = _mm256_sqrt_ps(_mm256_min_ps(_mm256_max_ps(mix, c.zero), c.one));
        let idx = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(q, c.enc_n), c.half));
        // SAFETY: the index is clamped to ENC_N; `enc` has ENC_N + 1 floats.
        let e = unsafe { _mm256_i32gather_ps::<4>(enc, _mm256_min_epi32(idx, c.enc_max)) };
        let sf = _mm256_cvtepi32_ps(src);
        let v = _mm256_add_ps(
            _mm256_add_ps(sf, _mm256_mul_ps(wgt, _mm256_sub_ps(e, sf))),
            c.half,
        );
        bytes(_mm256_cvttps_epi32(_mm256_min_ps(
            _mm256_max_ps(v, c.zero),
            c.max_code,
        )))
    }

    /// [`Shade::row`] 8 pixels at a time, the tail by the scalar path.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `px.len() == 3 * alpha.len()`, each plane of `rows` at least
    /// `alpha.len()` long, and `sh.enc.len() == ENC_N + 1` (checked by the caller).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row(sh: &Shade, px: &mut [u8], alpha: &[u8], rows: Rows) {
        let Rows { top, bot, fy } = rows;
        let fy = _mm256_set1_ps(fy);
        let n = alpha.len();
        let mut m = [_mm_setzero_si128(); 10];
        for (d, src) in m.iter_mut().zip(&MASKS) {
            // SAFETY: reads the 16 bytes of `src`.
            *d = unsafe { _mm_loadu_si128(src.as_ptr().cast()) };
        }
        let c = Consts {
            zero: _mm256_setzero_ps(),
            one: _mm256_set1_ps(1.0),
            half: _mm256_set1_ps(0.5),
            opacity: _mm256_set1_ps(sh.opacity),
            enc_n: _mm256_set1_ps(ENC_N as f32),
            enc_max: _mm256_set1_epi32(ENC_N as i32),
            max_code: _mm256_set1_ps(255.0),
        };
        let (inv_lit, k, knee) = (
            _mm256_set1_ps(sh.inv_lit),
            _mm256_set1_ps(sh.k),
            _mm256_set1_ps(KNEE),
        );
        let (lum_r, lum_g, lum_b) = (
            _mm256_set1_ps(0.212_672_9),
            _mm256_set1_ps(0.715_152_2),
            _mm256_set1_ps(0.072_175),
        );
        let roll_off = sh.roll_off.map(|r| r.raw());
        let (lt, enc) = (sh.lt.as_ptr(), sh.enc.as_ptr());
        let mut x = 0;
        while x + 8 <= n {
            // A run of weight 0 (outside the region's shape, within its box) costs one load per 8 pixels.
            let a8 = u64::from_le_bytes(alpha[x..x + 8].try_into().unwrap());
            if a8 == 0 {
                x += 8;
                continue;
            }
            // SAFETY: pixels x..x + 8 are in the row (x + 8 <= n): bytes 3x..3x + 24 of `px`, floats x..x + 8 of
            // each plane, bytes x..x + 8 of `alpha`. Gather indices: codes (< 256 = lt.len()), encode indices
            // (see encode_blend), roll-off indices clamped to last - 1 (reading nodes i and i + 1 of last + 1).
            unsafe {
                let p = px.as_mut_ptr().add(3 * x);
                let (lo, hi) = (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(8).cast()));
                let src = [
                    codes(lo, hi, m[0], m[1]),
                    codes(lo, hi, m[2], m[3]),
                    codes(lo, hi, m[4], m[5]),
                ];
                let inp = [
                    _mm256_i32gather_ps::<4>(lt, src[0]),
                    _mm256_i32gather_ps::<4>(lt, src[1]),
                    _mm256_i32gather_ps::<4>(lt, src[2]),
                ];
                // luminance(): (kr r + kg g) + kb b, then over the lit level.
                let light = _mm256_mul_ps(
                    _mm256_add_ps(
                        _mm256_add_ps(_mm256_mul_ps(lum_r, inp[0]), _mm256_mul_ps(lum_g, inp[1])),
                        _mm256_mul_ps(lum_b, inp[2]),
                    ),
                    inv_lit,
                );
                let swatch = |c: usize| {
                    let t = _mm256_loadu_ps(top[c].as_ptr().add(x));
                    let b = _mm256_loadu_ps(bot[c].as_ptr().add(x));
                    _mm256_add_ps(t, _mm256_mul_ps(fy, _mm256_sub_ps(b, t)))
                };
                let mut t = [
                    _mm256_mul_ps(swatch(0), light),
                    _mm256_mul_ps(swatch(1), light),
                    _mm256_mul_ps(swatch(2), light),
                ];
                if let Some((r_lo, r_scale, data)) = roll_off {
                    let mx = _mm256_max_ps(_mm256_max_ps(t[0], t[1]), t[2]);
                    let over = _mm256_cmp_ps::<_CMP_GT_OQ>(mx, knee);
                    // Most pixels are below the knee: only a group with one above pays for the lookups.
                    if _mm256_movemask_ps(over) != 0 {
                        // Lut1::eval: clamp to the table, node and fraction, lerp.
                        let last = data.len() - 1;
                        let u = _mm256_mul_ps(
                            _mm256_sub_ps(mx, _mm256_set1_ps(r_lo)),
                            _mm256_set1_ps(r_scale),
                        );
                        let u =
                            _mm256_min_ps(_mm256_max_ps(u, c.zero), _mm256_set1_ps(last as f32));
                        let i = _mm256_min_epi32(
                            _mm256_cvttps_epi32(u),
                            _mm256_set1_epi32(last as i32 - 1),
                        );
                        let f = _mm256_sub_ps(u, _mm256_cvtepi32_ps(i));
                        let base: *const f32 = data.as_ptr().cast();
                        let a = _mm256_i32gather_ps::<4>(base, i);
                        let b = _mm256_i32gather_ps::<4>(base.add(1), i);
                        let kk = _mm256_add_ps(a, _mm256_mul_ps(f, _mm256_sub_ps(b, a)));
                        // Lanes at or below the knee scale by exactly 1.
                        let kk = _mm256_blendv_ps(c.one, kk, over);
                        t = [
                            _mm256_mul_ps(t[0], kk),
                            _mm256_mul_ps(t[1], kk),
                            _mm256_mul_ps(t[2], kk),
                        ];
                    }
                }
                let wgt = _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        alpha.as_ptr().add(x).cast(),
                    ))),
                    k,
                );
                let out = [
                    encode_blend(&c, enc, inp[0], t[0], src[0], wgt),
                    encode_blend(&c, enc, inp[1], t[1], src[1], wgt),
                    encode_blend(&c, enc, inp[2], t[2], src[2], wgt),
                ];
                // Back to packed RGB: bytes 0..16 from [r, g] and [b], bytes 16..24 likewise.
                let rg = _mm_unpacklo_epi64(out[0], out[1]);
                let first =
                    _mm_or_si128(_mm_shuffle_epi8(rg, m[6]), _mm_shuffle_epi8(out[2], m[7]));
                let rest = _mm_or_si128(_mm_shuffle_epi8(rg, m[8]), _mm_shuffle_epi8(out[2], m[9]));
                _mm_storeu_si128(p.cast(), first);
                _mm_storel_epi64(p.add(16).cast(), rest);
            }
            x += 8;
        }
        sh.scalar(px, alpha, rows, x);
    }
}
