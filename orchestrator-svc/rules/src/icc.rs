//! Embedded ICC profiles: photos are edited in sRGB. A phone photo tagged Display P3, or a camera's Adobe RGB one,
//! holds numbers that mean other colours than the same numbers in sRGB; read as sRGB, "paint it #1F3A5F" would be
//! judged against the wrong colours and the untouched parts would shift when the (untagged, hence sRGB) output is
//! viewed. So pixels are converted to sRGB once, after decoding; colours outside sRGB's gamut are clipped.

use image::RgbImage;
use moxcms::{ColorProfile, DataColorSpace, Layout, TransformOptions};
use rayon::prelude::*;

/// What `to_srgb` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversion {
    /// The pixels were converted from the embedded profile to sRGB.
    Converted,
    /// The profile describes sRGB (within one code value): the pixels are left exactly as they were.
    AlreadySrgb,
    /// The profile cannot apply to RGB pixels, or cannot be read: the pixels are left as they were, as viewers
    /// do with a broken profile. The reason is for the log.
    Ignored(String),
}

/// Converts `img` from the colour space of `icc` (an embedded ICC profile) to sRGB, in place.
pub fn to_srgb(img: &mut RgbImage, icc: &[u8]) -> Conversion {
    let source = match ColorProfile::new_from_slice(icc) {
        Ok(p) => p,
        Err(e) => return Conversion::Ignored(format!("unreadable ICC profile: {e:?}")),
    };
    if source.color_space != DataColorSpace::Rgb {
        return Conversion::Ignored(format!(
            "a {:?} ICC profile on RGB pixels",
            source.color_space
        ));
    }
    let transform = match source.create_transform_8bit(
        Layout::Rgb,
        &ColorProfile::new_srgb(),
        Layout::Rgb,
        TransformOptions::default(),
    ) {
        Ok(t) => t,
        Err(e) => {
            return Conversion::Ignored(format!("ICC profile without an sRGB transform: {e:?}"));
        }
    };
    // Many cameras embed an sRGB profile: a grid of colours that comes back unchanged means there is nothing to do
    // (and converting anyway would move some values by a code for nothing).
    let probe: Vec<u8> = (0..6u8)
        .flat_map(|r| {
            (0..6u8).flat_map(move |g| (0..6u8).flat_map(move |b| [r * 51, g * 51, b * 51]))
        })
        .collect();
    let mut probed = vec![0u8; probe.len()];
    if transform.transform(&probe, &mut probed).is_err() {
        return Conversion::Ignored("ICC transform failed".into());
    }
    if probe.iter().zip(&probed).all(|(a, b)| a.abs_diff(*b) <= 1) {
        return Conversion::AlreadySrgb;
    }
    let row_len = img.width() as usize * 3;
    if row_len == 0 {
        return Conversion::Converted;
    }
    let failed = std::sync::atomic::AtomicBool::new(false);
    img.par_chunks_mut(row_len * 16).for_each(|rows| {
        let mut converted = vec![0u8; rows.len()];
        if transform.transform(rows, &mut converted).is_ok() {
            rows.copy_from_slice(&converted);
        } else {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    if failed.into_inner() {
        // Some rows may be converted and others not: still the better picture than none converted, but say so.
        return Conversion::Ignored("ICC transform failed on some rows".into());
    }
    Conversion::Converted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(rgb: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(37, 23, image::Rgb(rgb))
    }

    /// Display P3 -> sRGB by the book: same transfer curve, linear RGB through XYZ (D65 both).
    fn p3_to_srgb(rgb: [u8; 3]) -> [f64; 3] {
        let decode = |v: u8| {
            let c = f64::from(v) / 255.0;
            if c <= 0.04045 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        let encode = |c: f64| {
            let c = c.clamp(0.0, 1.0);
            255.0
                * if c <= 0.0031308 {
                    12.92 * c
                } else {
                    1.055 * c.powf(1.0 / 2.4) - 0.055
                }
        };
        let l = rgb.map(decode);
        let m = [
            [1.224_940_2, -0.224_940_2, 0.0],
            [-0.042_056_9, 1.042_056_9, 0.0],
            [-0.019_637_6, -0.078_636_1, 1.098_273_7],
        ];
        [0, 1, 2].map(|i| encode(m[i][0] * l[0] + m[i][1] * l[1] + m[i][2] * l[2]))
    }

    #[test]
    fn display_p3_pixels_become_the_same_colours_in_srgb() {
        let icc = ColorProfile::new_display_p3().encode().unwrap();
        for rgb in [
            [200, 100, 50],
            [31, 58, 95],
            [120, 180, 90],
            [250, 250, 250],
        ] {
            let mut img = flat(rgb);
            assert_eq!(to_srgb(&mut img, &icc), Conversion::Converted);
            let want = p3_to_srgb(rgb);
            let got = img.get_pixel(36, 22).0;
            for c in 0..3 {
                assert!(
                    (f64::from(got[c]) - want[c]).abs() <= 1.5,
                    "{rgb:?}: got {got:?}, want {want:?}"
                );
            }
        }
    }

    #[test]
    fn an_srgb_profile_leaves_pixels_exactly_as_they_were() {
        let icc = ColorProfile::new_srgb().encode().unwrap();
        let mut img = flat([200, 100, 50]);
        img.put_pixel(3, 4, image::Rgb([1, 2, 3]));
        let before = img.clone();
        assert_eq!(to_srgb(&mut img, &icc), Conversion::AlreadySrgb);
        assert_eq!(img, before);
    }

    #[test]
    fn profiles_that_cannot_apply_are_ignored_with_a_reason() {
        let gray = ColorProfile::new_gray_with_gamma(2.2).encode().unwrap();
        for icc in [gray, b"not an icc profile".to_vec(), Vec::new()] {
            let mut img = flat([200, 100, 50]);
            let before = img.clone();
            assert!(matches!(to_srgb(&mut img, &icc), Conversion::Ignored(_)));
            assert_eq!(img, before);
        }
    }
}
