//! Per-photo cost of the rules' kernels on one thread, as the orchestrator runs them (`ITEM_THREADS=one`): region
//! building and the in-place recolour, tone and texture at 1 MP and 12 MP on a JPEG-noisy synthetic room under a
//! soft region that covers the frame (what the bundled tiny model's masks look like). The fixed part of a rule
//! (tables, statistics set-up) shows as the 1 MP time being more than 1/12 of the 12 MP one. Each is timed with
//! the kernels this CPU dispatches to (`simd::detected`, e.g. AVX2 + FMA) and capped at the baseline build's,
//! alternately, and the last column is their ratio (baseline / detected).
//!
//! cargo run --release -p palette-rules --example bench_kernels [-- --reps N] [--only 1|12] [--rule NAME]
//! (NAME: recolor, tone, texture, or none for the regions alone)

use palette_rules::rule::{Rule, parse_rule};
use palette_rules::simd::{self, Level};
use palette_rules::{GrayImage, InPlace, RegionParams, RgbImage, apply_in_place, region, synth};
use serde_json::json;
use std::time::Instant;

fn rules() -> Vec<(&'static str, Rule)> {
    let p = |t: &str, v: serde_json::Value| parse_rule(t, v.as_object().unwrap(), None).unwrap();
    vec![
        ("recolor", p("recolor", json!({"color": "#1F3A5F"}))),
        ("tone", p("tone", json!({"warmth": 0.3}))),
        ("texture", p("texture", json!({"builtin": "linen"}))),
    ]
}

/// The synthetic room through a JPEG round trip (q90, as the bench's uploads), so pixels carry codec noise.
fn photo(w: u32, h: u32) -> RgbImage {
    let room = synth::room(w, h);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&room.photo)
        .unwrap();
    image::load_from_memory(&jpeg).unwrap().to_rgb8()
}

/// Soft noise in 1..=255 over the whole frame, smooth over a few pixels: no pixel is skipped as alpha 0.
fn soft_mask(w: u32, h: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        let v = synth::noise(x / 8, y / 8, 7);
        image::Luma([(1.0 + v.clamp(0.0, 1.0) * 254.0) as u8])
    })
}

/// Best of `reps` of `f(level)` at the detected level and at the baseline, taken alternately: (detected, baseline) ms.
fn best_ms(reps: usize, mut f: impl FnMut(Level) -> f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps {
        best.0 = best.0.min(f(simd::detected()));
        best.1 = best.1.min(f(Level::Baseline));
    }
    (best.0 * 1e3, best.1 * 1e3)
}

fn report(label: &str, (t, base): (f64, f64), mp: f64) {
    println!(
        "  {label:<8} {t:>8.2} {:>8.2} {base:>9.2} {:>6.2}x",
        t / mp,
        base / t
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let reps: usize = arg("--reps").map_or(5, |v| v.parse().unwrap());
    let sizes: Vec<(u32, u32)> = match arg("--only").as_deref() {
        Some("1") => vec![(1008, 756)],
        Some("12") => vec![(4032, 3024)],
        _ => vec![(1008, 756), (4032, 3024)],
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    palette_rules::color::warm_tables();
    let only_rule = arg("--rule");
    for (w, h) in sizes {
        let mp = (w * h) as f64 / 1e6;
        let photo = photo(w, h);
        let mask = soft_mask(w, h);
        let mut work = photo.clone();
        println!(
            "{w}x{h} ({mp:.2} MP), one thread, best of {reps}: ms per call and per MP at {:?}, ms at Baseline, ratio",
            simd::detected()
        );
        let region = pool.install(|| {
            region::build_region(
                &photo,
                std::slice::from_ref(&mask),
                &[],
                &RegionParams::default(),
            )
        });
        // The job's region, and the preview's (guided filter solved one step coarser).
        for (label, coarse) in [("region", false), ("coarse", true)] {
            let params = RegionParams {
                coarse,
                ..RegionParams::default()
            };
            let t = best_ms(reps, |level| {
                let t = Instant::now();
                let r = pool.install(|| {
                    simd::with_level(level, || {
                        region::build_region(&photo, std::slice::from_ref(&mask), &[], &params)
                    })
                });
                std::hint::black_box(r);
                t.elapsed().as_secs_f64()
            });
            report(label, t, mp);
        }
        for (name, rule) in rules()
            .into_iter()
            .filter(|(n, _)| only_rule.as_deref().is_none_or(|o| o == *n))
        {
            let t = best_ms(reps, |level| {
                work.copy_from_slice(&photo);
                let t = Instant::now();
                let r = pool.install(|| {
                    simd::with_level(level, || {
                        apply_in_place(&mut work, &region, &rule, None).unwrap()
                    })
                });
                assert!(matches!(r, InPlace::Edited));
                t.elapsed().as_secs_f64()
            });
            report(name, t, mp);
        }
    }
}
