//! The kernels dispatched to AVX2 + FMA give the baseline build's bytes: each check runs the same work twice on a
//! one-thread pool, once at the detected level and once capped at the baseline (`simd::with_level`), and compares.
//! On a CPU without AVX2 + FMA there is only one path; the checks say so and pass.

use palette_rules::filter::{Plane, box_mean, box_mean_product, gaussian};
use palette_rules::mask::{InstanceUpsampler, ModelMask, PixelBox};
use palette_rules::simd::{self, Level};
use palette_rules::{GrayImage, RegionParams, region, synth};

/// `f` at the detected level and at the baseline, on one thread (the level is per thread); None where the CPU has
/// nothing above the baseline.
fn both<R: Send>(f: impl Fn() -> R + Sync) -> Option<(R, R)> {
    if simd::detected() == Level::Baseline {
        eprintln!(
            "skipped: this CPU has no AVX2 + FMA, so the kernels have only their baseline path"
        );
        return None;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let run = |level| pool.install(|| simd::with_level(level, || (simd::active(), f())));
    let (fast_level, fast) = run(simd::detected());
    let (base_level, base) = run(Level::Baseline);
    assert_eq!(
        (fast_level, base_level),
        (simd::detected(), Level::Baseline)
    );
    Some((fast, base))
}

/// A soft, JPEG-free mask: smooth noise with a hard-edged hole, so regions have both soft and sharp edges.
fn soft_mask(w: u32, h: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        let v = synth::noise(x / 6, y / 6, 3).clamp(0.0, 1.0);
        let hole = (x as i32 - w as i32 / 3).pow(2) + (y as i32 - h as i32 / 2).pow(2) < 400;
        image::Luma([if hole { 0 } else { (v * 255.0) as u8 }])
    })
}

#[test]
fn regions_are_the_same_bytes_on_both_paths() {
    // Odd sizes leave loop tails on both paths; 1031x777 refines with r = 5, s = 3 like a 1 MP photo.
    for (w, h) in [(333u32, 251u32), (1031, 777)] {
        let room = synth::room(w, h);
        let mask = soft_mask(w, h);
        let params = [
            RegionParams::default(),
            RegionParams {
                coarse: true,
                ..RegionParams::default()
            },
            RegionParams {
                grow_px: 2.0,
                feather_px: 1.4,
                ..RegionParams::default()
            },
            RegionParams {
                refine_edges: false,
                feather_px: 5.0,
                ..RegionParams::default()
            },
        ];
        for p in &params {
            let occluders: &[GrayImage] = if p.grow_px > 0.0 {
                std::slice::from_ref(&room.sofa)
            } else {
                &[]
            };
            let build =
                || region::build_region(&room.photo, std::slice::from_ref(&mask), occluders, p);
            let Some((fast, base)) = both(build) else {
                return;
            };
            assert!(fast == base, "{w}x{h} {p:?}");
        }
    }
}

#[test]
fn filters_are_the_same_floats_on_both_paths() {
    let (w, h) = (203, 131);
    let plane = |seed| Plane {
        w,
        h,
        data: (0..w * h)
            .map(|k| synth::noise((k % w) as u32, (k / w) as u32, seed))
            .collect(),
    };
    let (a, b) = (plane(1), plane(2));
    let bits = |p: Plane| p.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let Some((fast, base)) = both(|| {
        [
            box_mean(&a, 3),
            box_mean_product(&a, &b, 2),
            gaussian(&a, 0.6),
            gaussian(&a, 2.0),
        ]
        .map(bits)
    }) else {
        return;
    };
    assert!(fast == base);
}

#[test]
fn instance_masks_are_the_same_bytes_on_both_paths() {
    let (mw, mh) = (48u32, 36u32);
    let probs: Vec<u8> = (0..mw * mh)
        .map(|k| (synth::noise(k % mw, k / mw, 5).clamp(0.0, 1.0) * 255.0) as u8)
        .collect();
    let mask = ModelMask {
        width: mw,
        height: mh,
        probs: &probs,
    };
    let (w, h) = (1001u32, 743u32);
    let bbox = PixelBox {
        x0: 37.0,
        y0: 20.5,
        x1: 913.0,
        y1: 700.0,
    };
    let upsample = || {
        let up = InstanceUpsampler::new(&mask, bbox, w, h);
        let span = up.span();
        let mut writer = up.row_writer(span.x0, span.width() as usize);
        let mut out = vec![0u8; span.width() as usize * span.height() as usize];
        for (y, row) in (span.y0..span.y1).zip(out.chunks_exact_mut(span.width() as usize)) {
            writer.row(y, row);
        }
        out
    };
    let Some((fast, base)) = both(upsample) else {
        return;
    };
    assert!(fast == base);
}

#[test]
fn the_detected_level_is_what_the_cpu_has() {
    #[cfg(target_arch = "x86_64")]
    {
        let has = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        assert_eq!(simd::detected() == Level::Avx2Fma, has);
    }
    // A cap above what the CPU has is no cap.
    assert_eq!(
        simd::with_level(Level::Avx2Fma, simd::active),
        simd::detected()
    );
    assert_eq!(
        simd::with_level(Level::Baseline, simd::active),
        Level::Baseline
    );
    assert_eq!(simd::active(), simd::detected());
}
