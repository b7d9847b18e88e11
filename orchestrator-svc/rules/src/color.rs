//! Colour maths in f32: sRGB <-> linear via lookup tables, CIELAB (D65) and Oklab, chroma-reducing gamut mapping
//! and CIEDE2000. Every rule converts millions of pixels, so the transcendental parts are tables or a Newton cbrt.

use std::sync::LazyLock;

/// Linear-light value of each 8-bit sRGB code.
static SRGB_TO_LIN: LazyLock<[f32; 256]> = LazyLock::new(|| {
    let mut t = [0.0; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = srgb_decode(i as f32 / 255.0);
    }
    t
});

/// Encoding table from linear light to sRGB in 0..=255 (as f32, so blends keep sub-code precision), indexed by
/// sqrt(linear): the square root flattens the curve's steep dark end, so 2k nodes (8 KB, resident in L1) keep every
/// lookup within 0.1 code of the exact value, which a uniform table needed 16k nodes (64 KB) for.
pub(crate) const ENC_N: usize = 2048;
static LIN_TO_SRGB: LazyLock<Vec<f32>> = LazyLock::new(|| {
    (0..=ENC_N)
        .map(|i| {
            let s = i as f32 / ENC_N as f32;
            255.0 * srgb_encode(s * s)
        })
        .collect()
});

/// sRGB-encoded value in 0..1 to linear light (exact; for table nodes between 8-bit codes).
pub fn srgb_decode_f(c: f32) -> f32 {
    srgb_decode(c)
}

fn srgb_decode(c: f32) -> f32 {
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

fn srgb_encode(l: f32) -> f32 {
    if l <= 0.003_130_8 {
        12.92 * l
    } else {
        1.055 * l.powf(1.0 / 2.4) - 0.055
    }
}

/// 8-bit sRGB code to linear light.
#[inline]
pub fn to_linear(c: u8) -> f32 {
    SRGB_TO_LIN[c as usize]
}

/// The decoding table itself, for inner loops (one lookup of the lazy static per row, not per pixel).
pub fn linear_table() -> &'static [f32; 256] {
    &SRGB_TO_LIN
}

/// The encoding table, for inner loops; use with [`encode_with`].
pub fn encode_table() -> &'static [f32] {
    &LIN_TO_SRGB
}

/// [`to_srgb`] with the table already in hand.
#[inline]
pub fn encode_with(table: &[f32], l: f32) -> f32 {
    // max/min rather than clamp: no NaN-propagation code in the hot loop (NaN maps to 0 here).
    #[allow(clippy::manual_clamp)]
    let s = l.max(0.0).min(1.0).sqrt();
    table[((s * ENC_N as f32 + 0.5) as usize).min(ENC_N)]
}

/// Forces both tables to be built (benchmarks call this so they time pixels, not table set-up).
pub fn warm_tables() {
    let _ = to_linear(0);
    let _ = to_srgb(0.5);
}

/// Linear light to sRGB in 0..=255 (clamped), as f32.
#[inline]
pub fn to_srgb(l: f32) -> f32 {
    encode_with(&LIN_TO_SRGB, l)
}

/// Cube root to ~1e-7 relative: a bit-trick first guess and two Newton steps, several times faster than libm.
#[inline]
pub fn cbrt_fast(x: f32) -> f32 {
    if x <= 0.0 {
        return 0.0;
    }
    let mut y = f32::from_bits(x.to_bits() / 3 + 0x2a51_37a0);
    y = (2.0 * y + x / (y * y)) * (1.0 / 3.0);
    y = (2.0 * y + x / (y * y)) * (1.0 / 3.0);
    y
}

// D65 white point used by CIELAB.
const XN: f32 = 0.950_47;
const ZN: f32 = 1.088_83;

/// Linear sRGB to CIE XYZ (D65).
#[inline]
fn lin_to_xyz(r: f32, g: f32, b: f32) -> [f32; 3] {
    [
        0.412_456_4 * r + 0.357_576_1 * g + 0.180_437_5 * b,
        0.212_672_9 * r + 0.715_152_2 * g + 0.072_175 * b,
        0.019_333_9 * r + 0.119_192 * g + 0.950_304_1 * b,
    ]
}

#[inline]
fn xyz_to_lin(x: f32, y: f32, z: f32) -> [f32; 3] {
    [
        3.240_454_2 * x - 1.537_138_5 * y - 0.498_531_4 * z,
        -0.969_266 * x + 1.876_010_8 * y + 0.041_556 * z,
        0.055_643_4 * x - 0.204_025_9 * y + 1.057_225_2 * z,
    ]
}

#[inline]
fn lab_f(t: f32) -> f32 {
    if t > 0.008_856 {
        cbrt_fast(t)
    } else {
        7.787 * t + 16.0 / 116.0
    }
}

#[inline]
fn lab_f_inv(f: f32) -> f32 {
    if f > 0.206_893 {
        f * f * f
    } else {
        (f - 16.0 / 116.0) / 7.787
    }
}

/// Relative luminance Y of linear sRGB.
#[inline]
pub fn luminance(r: f32, g: f32, b: f32) -> f32 {
    0.212_672_9 * r + 0.715_152_2 * g + 0.072_175 * b
}

/// CIELAB L* from luminance Y (0..1).
#[inline]
pub fn l_from_y(y: f32) -> f32 {
    116.0 * lab_f(y) - 16.0
}

/// Luminance Y (0..1) from CIELAB L*.
#[inline]
pub fn y_from_l(l: f32) -> f32 {
    lab_f_inv((l + 16.0) / 116.0)
}

/// Linear sRGB to CIELAB.
#[inline]
pub fn lin_to_lab(r: f32, g: f32, b: f32) -> [f32; 3] {
    let [x, y, z] = lin_to_xyz(r, g, b);
    let (fx, fy, fz) = (lab_f(x / XN), lab_f(y), lab_f(z / ZN));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// CIELAB to linear sRGB (may be out of [0,1]: callers gamut-map).
#[inline]
pub fn lab_to_lin(l: f32, a: f32, b: f32) -> [f32; 3] {
    let fy = (l + 16.0) / 116.0;
    let (fx, fz) = (fy + a / 500.0, fy - b / 200.0);
    xyz_to_lin(XN * lab_f_inv(fx), lab_f_inv(fy), ZN * lab_f_inv(fz))
}

/// 8-bit sRGB to CIELAB.
pub fn srgb8_to_lab(p: [u8; 3]) -> [f32; 3] {
    lin_to_lab(to_linear(p[0]), to_linear(p[1]), to_linear(p[2]))
}

/// Linear sRGB to Oklab.
#[inline]
pub fn lin_to_oklab(r: f32, g: f32, b: f32) -> [f32; 3] {
    let l = cbrt_fast(0.412_221_46 * r + 0.536_332_55 * g + 0.051_445_995 * b);
    let m = cbrt_fast(0.211_903_5 * r + 0.680_699_5 * g + 0.107_396_96 * b);
    let s = cbrt_fast(0.088_302_46 * r + 0.281_718_85 * g + 0.629_978_7 * b);
    [
        0.210_454_26 * l + 0.793_617_8 * m - 0.004_072_047 * s,
        1.977_998_5 * l - 2.428_592_2 * m + 0.450_593_7 * s,
        0.025_904_037 * l + 0.782_771_77 * m - 0.808_675_77 * s,
    ]
}

/// Oklab to linear sRGB (may be out of [0,1]).
#[inline]
pub fn oklab_to_lin(l: f32, a: f32, b: f32) -> [f32; 3] {
    let l_ = l + 0.396_337_78 * a + 0.215_803_76 * b;
    let m_ = l - 0.105_561_346 * a - 0.063_854_17 * b;
    let s_ = l - 0.089_484_18 * a - 1.291_485_5 * b;
    let (l3, m3, s3) = (l_ * l_ * l_, m_ * m_ * m_, s_ * s_ * s_);
    [
        4.076_741_7 * l3 - 3.307_711_6 * m3 + 0.230_969_94 * s3,
        -1.268_438 * l3 + 2.609_757_4 * m3 - 0.341_319_38 * s3,
        -0.004_196_086_3 * l3 - 0.703_418_6 * m3 + 1.707_614_7 * s3,
    ]
}

#[inline]
fn in_gamut(c: [f32; 3]) -> bool {
    const T: f32 = 1e-4;
    c.iter().all(|&v| (-T..=1.0 + T).contains(&v))
}

/// Keeps lightness and hue, reduces chroma until the colour fits sRGB: clipping each channel instead would shift the
/// hue of saturated paints and flatten the shading. `to_lin` is the space's inverse (CIELAB or Oklab).
#[inline]
pub fn gamut_map(l: f32, a: f32, b: f32, to_lin: fn(f32, f32, f32) -> [f32; 3]) -> [f32; 3] {
    let c = to_lin(l, a, b);
    if in_gamut(c) {
        return c;
    }
    // Bisection on the chroma scale; 12 steps put us within 0.03 % of the boundary.
    let (mut lo, mut hi) = (0.0f32, 1.0f32);
    for _ in 0..12 {
        let mid = 0.5 * (lo + hi);
        if in_gamut(to_lin(l, a * mid, b * mid)) {
            lo = mid
        } else {
            hi = mid
        }
    }
    let c = to_lin(l, a * lo, b * lo);
    [
        c[0].clamp(0.0, 1.0),
        c[1].clamp(0.0, 1.0),
        c[2].clamp(0.0, 1.0),
    ]
}

/// CIEDE2000 colour difference (Sharma et al. 2005), in f64 because tests compare against published values.
pub fn delta_e2000(lab1: [f32; 3], lab2: [f32; 3]) -> f64 {
    use std::f64::consts::PI;
    let (l1, a1, b1) = (lab1[0] as f64, lab1[1] as f64, lab1[2] as f64);
    let (l2, a2, b2) = (lab2[0] as f64, lab2[1] as f64, lab2[2] as f64);
    let c_bar = 0.5 * ((a1 * a1 + b1 * b1).sqrt() + (a2 * a2 + b2 * b2).sqrt());
    let c7 = c_bar.powi(7);
    let g = 0.5 * (1.0 - (c7 / (c7 + 25f64.powi(7))).sqrt());
    let (a1p, a2p) = ((1.0 + g) * a1, (1.0 + g) * a2);
    let (c1p, c2p) = ((a1p * a1p + b1 * b1).sqrt(), (a2p * a2p + b2 * b2).sqrt());
    let hue = |b: f64, a: f64| {
        if a == 0.0 && b == 0.0 {
            0.0
        } else {
            b.atan2(a).to_degrees().rem_euclid(360.0)
        }
    };
    let (h1p, h2p) = (hue(b1, a1p), hue(b2, a2p));
    let dlp = l2 - l1;
    let dcp = c2p - c1p;
    let dhp = if c1p * c2p == 0.0 {
        0.0
    } else if (h2p - h1p).abs() <= 180.0 {
        h2p - h1p
    } else if h2p - h1p > 180.0 {
        h2p - h1p - 360.0
    } else {
        h2p - h1p + 360.0
    };
    let dhp_big = 2.0 * (c1p * c2p).sqrt() * (dhp.to_radians() / 2.0).sin();
    let lbp = 0.5 * (l1 + l2);
    let cbp = 0.5 * (c1p + c2p);
    let hbp = if c1p * c2p == 0.0 {
        h1p + h2p
    } else if (h1p - h2p).abs() <= 180.0 {
        0.5 * (h1p + h2p)
    } else if h1p + h2p < 360.0 {
        0.5 * (h1p + h2p + 360.0)
    } else {
        0.5 * (h1p + h2p - 360.0)
    };
    let t = 1.0 - 0.17 * (hbp - 30.0).to_radians().cos()
        + 0.24 * (2.0 * hbp).to_radians().cos()
        + 0.32 * (3.0 * hbp + 6.0).to_radians().cos()
        - 0.20 * (4.0 * hbp - 63.0).to_radians().cos();
    let dtheta = 30.0 * (-((hbp - 275.0) / 25.0).powi(2)).exp();
    let cbp7 = cbp.powi(7);
    let rc = 2.0 * (cbp7 / (cbp7 + 25f64.powi(7))).sqrt();
    let sl = 1.0 + 0.015 * (lbp - 50.0).powi(2) / (20.0 + (lbp - 50.0).powi(2)).sqrt();
    let sc = 1.0 + 0.045 * cbp;
    let sh = 1.0 + 0.015 * cbp * t;
    let rt = -(2.0 * dtheta * PI / 180.0).sin() * rc;
    let (tl, tc, th) = (dlp / sl, dcp / sc, dhp_big / sh);
    (tl * tl + tc * tc + th * th + rt * tc * th).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn de2000_matches_sharma_table() {
        // Pairs 1, 7 and 17 of Sharma, Wu & Dalal's test data.
        let cases = [
            ([50.0, 2.6772, -79.7751], [50.0, 0.0, -82.7485], 2.0425),
            ([50.0, 0.0, 0.0], [50.0, -1.0, 2.0], 2.3669),
            ([50.0, 2.5, 0.0], [73.0, 25.0, -18.0], 27.1492),
        ];
        for (a, b, want) in cases {
            assert!((delta_e2000(a, b) - want).abs() < 1e-3, "{a:?} {b:?}");
        }
    }

    #[test]
    fn lab_round_trips_and_cbrt_is_accurate() {
        for x in [1e-6f32, 0.001, 0.3, 1.0, 7.0] {
            assert!((cbrt_fast(x) - x.cbrt()).abs() <= 1e-6 * x.cbrt().max(1.0));
        }
        let lab = srgb8_to_lab([200, 30, 90]);
        let lin = lab_to_lin(lab[0], lab[1], lab[2]);
        for (v, c) in lin.iter().zip([200u8, 30, 90]) {
            assert!((to_srgb(*v) - c as f32).abs() < 0.3);
        }
        let ok = lin_to_oklab(0.2, 0.5, 0.9);
        let back = oklab_to_lin(ok[0], ok[1], ok[2]);
        assert!((back[0] - 0.2).abs() < 1e-4 && (back[2] - 0.9).abs() < 1e-4);
        // White is L* 100, a* b* 0.
        let w = srgb8_to_lab([255, 255, 255]);
        assert!((w[0] - 100.0).abs() < 0.05 && w[1].abs() < 0.05 && w[2].abs() < 0.05);
    }

    #[test]
    fn encoding_table_is_within_a_tenth_of_a_code_everywhere() {
        // Dense sweep in linear light, denser still in the steep dark end.
        let worst = (0..=200_000)
            .map(|i| {
                let t = i as f32 / 200_000.0;
                t * t
            })
            .map(|l| (to_srgb(l) - 255.0 * srgb_encode(l)).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 0.1, "worst {worst} codes");
        assert_eq!(to_srgb(-1.0), 0.0);
        assert_eq!(to_srgb(f32::NAN), 0.0);
        assert!((to_srgb(2.0) - 255.0).abs() < 1e-3);
    }

    #[test]
    fn gamut_map_keeps_lightness_and_hue() {
        let (l, a, b) = (60.0, 90.0, -90.0);
        let c = gamut_map(l, a, b, lab_to_lin);
        assert!(in_gamut(c));
        let lab = lin_to_lab(c[0], c[1], c[2]);
        assert!((lab[0] - l).abs() < 0.5);
        let (h0, h1) = (b.atan2(a), lab[2].atan2(lab[1]));
        assert!((h0 - h1).abs() < 0.05);
    }
}
