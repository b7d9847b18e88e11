//! Quality checks with tolerances: the recolour lands on the paint colour and keeps the wall's shading; tone,
//! texture and remove do what they say; refined regions follow the photo's edges.

mod common;

use common::*;
use palette_rules::color::{delta_e2000, lin_to_oklab, srgb8_to_lab, to_linear};
use palette_rules::filter::{Plane, morph};
use palette_rules::rule::parse_rule;
use palette_rules::{Edited, GrayImage, RegionParams, RgbImage, apply, mask, region, synth};
use serde_json::{Value, json};

fn rule(ty: &str, params: Value) -> palette_rules::rule::Rule {
    parse_rule(ty, params.as_object().unwrap(), None).unwrap()
}

fn rgb(e: Edited) -> RgbImage {
    match e {
        Edited::Rgb(i) => i,
        Edited::Rgba(_) => panic!("expected RGB"),
    }
}

#[test]
fn recolor_hits_the_paint_and_keeps_shading() {
    let (w, h) = (320, 240);
    let wall = shaded_wall(w, h);
    let region = ellipse(w, h);
    let hp_in = high_pass_l(&wall);
    // Fully selected pixels at least 10 px from the region's edge: nearer, the high-pass blur mixes in unpainted
    // wall and measures the paint's edge instead of the shading.
    let plane = Plane {
        w: w as usize,
        h: h as usize,
        data: region.pixels().map(|a| a[0] as f32).collect(),
    };
    let inner = morph(&plane, 10, false);
    let interior: Vec<usize> = (0..inner.data.len())
        .filter(|&i| inner.data[i] == 255.0)
        .collect();
    for (hex, finish) in [
        ("#1f3a5f", "matte"),
        ("#9caf88", "eggshell"),
        ("#c0504d", "satin"),
        ("#f2e6d0", "gloss"),
        ("#3a3a3a", "eggshell"),
        ("#e8c547", "satin"),
    ] {
        let out = rgb(apply(
            &wall,
            &region,
            &rule("recolor", json!({"color": hex, "finish": finish})),
            None,
        )
        .unwrap());
        let target = srgb8_to_lab(palette_rules::rule::parse_hex(hex).unwrap());
        let full = interior.clone();
        // The paint is what the wall's lit part looks like (a wall half in shadow has a darker median, as it
        // should): the median colour of its brightest quarter, by input lightness.
        let med = lit_median(&wall, &out, &full);
        let de = delta_e2000(med, target);
        assert!(
            de <= 5.0,
            "{hex}: lit median {med:?} vs target {target:?}: dE2000 {de:.2}"
        );
        let hp_out = high_pass_l(&out);
        let (a, b): (Vec<f32>, Vec<f32>) = full.iter().map(|&i| (hp_in[i], hp_out[i])).unzip();
        let corr = correlation(&a, &b);
        assert!(corr >= 0.9, "{hex}: shading correlation {corr:.3}");
        for (i, a) in region.pixels().enumerate() {
            if a[0] == 0 {
                assert_eq!(
                    out.as_raw()[i * 3..i * 3 + 3],
                    wall.as_raw()[i * 3..i * 3 + 3],
                    "{hex}: alpha-0 pixel {i} changed"
                );
            }
        }
        println!("{hex} {finish}: dE2000 {de:.2}, shading corr {corr:.3}");
    }
}

/// Median CIELAB colour of `out` over the brightest quarter of `at` by the input's lightness.
fn lit_median(input: &RgbImage, out: &RgbImage, at: &[usize]) -> [f32; 3] {
    let px = |img: &RgbImage, i: usize| -> [u8; 3] {
        img.as_raw()[i * 3..i * 3 + 3].try_into().unwrap()
    };
    let mut by_l: Vec<(f32, usize)> = at
        .iter()
        .map(|&i| (srgb8_to_lab(px(input, i))[0], i))
        .collect();
    by_l.sort_by(|a, b| a.0.total_cmp(&b.0));
    let labs: Vec<[f32; 3]> = by_l[by_l.len() * 3 / 4..]
        .iter()
        .map(|&(_, i)| srgb8_to_lab(px(out, i)))
        .collect();
    [0, 1, 2].map(|k| median(labs.iter().map(|l| l[k]).collect()))
}

#[test]
fn recolor_gamut_maps_by_chroma_not_clipping() {
    // Lab(50, 80, -100) lies far outside sRGB: the result must keep the requested hue and lightness.
    let wall = shaded_wall(64, 64);
    let region = GrayImage::from_pixel(64, 64, image::Luma([255]));
    let out = rgb(apply(
        &wall,
        &region,
        &rule("recolor", json!({"color": {"l": 50, "a": 80, "b": -100}})),
        None,
    )
    .unwrap());
    let all: Vec<usize> = (0..64 * 64).collect();
    let med = lit_median(&wall, &out, &all);
    let hue = |l: [f32; 3]| l[2].atan2(l[1]).to_degrees();
    assert!((med[0] - 50.0).abs() < 3.0, "{med:?}");
    assert!(
        (hue(med) - hue([50.0, 80.0, -100.0])).abs() < 6.0,
        "{med:?}"
    );
}

#[test]
fn tone_moves_brightness_saturation_and_warmth() {
    let room = synth::room(160, 120);
    let r = region::build_region(
        &room.photo,
        std::slice::from_ref(&room.floor),
        std::slice::from_ref(&room.sofa),
        &RegionParams::default(),
    );
    let stats = |img: &RgbImage| {
        let (mut l, mut c, mut b, mut n) = (0.0, 0.0, 0.0, 0.0);
        for (p, a) in img.pixels().zip(r.pixels()) {
            if a[0] == 255 {
                let o = lin_to_oklab(to_linear(p[0]), to_linear(p[1]), to_linear(p[2]));
                (l, c, b, n) = (l + o[0], c + o[1].hypot(o[2]), b + o[2], n + 1.0);
            }
        }
        (l / n, c / n, b / n)
    };
    let base = stats(&room.photo);
    let bright = stats(&rgb(apply(
        &room.photo,
        &r,
        &rule("tone", json!({"brightness": 0.5})),
        None,
    )
    .unwrap()));
    assert!(bright.0 > base.0 + 0.07, "{base:?} -> {bright:?}");
    let grey = stats(&rgb(apply(
        &room.photo,
        &r,
        &rule("tone", json!({"saturation": -1})),
        None,
    )
    .unwrap()));
    assert!(grey.1 < 0.01, "{grey:?}");
    let warm = stats(&rgb(apply(
        &room.photo,
        &r,
        &rule("tone", json!({"warmth": 1})),
        None,
    )
    .unwrap()));
    assert!(warm.2 > base.2 + 0.02, "{base:?} -> {warm:?}");
}

#[test]
fn texture_carries_the_walls_shading() {
    let (w, h) = (256, 192);
    let wall = shaded_wall(w, h);
    let region = GrayImage::from_pixel(w, h, image::Luma([255]));
    for b in ["linen", "wood", "marble", "herringbone", "velvet"] {
        let out = rgb(apply(
            &wall,
            &region,
            &rule("texture", json!({"builtin": b, "scale": 0.5})),
            None,
        )
        .unwrap());
        // Light falls off to the lower right and a shadow band sits at 70 % width: both must survive.
        let ratio = |img: &RgbImage| {
            mean_lum(img, |x, y| x < w / 4 && y < h / 4)
                / mean_lum(img, |x, _| (x as f32 / w as f32 - 0.7).abs() < 0.03)
        };
        let (rin, rout) = (ratio(&wall), ratio(&out));
        assert!(
            (rout / rin - 1.0).abs() < 0.2,
            "{b}: lit/shadow ratio {rin:.2} -> {rout:.2}"
        );
        assert_ne!(out, wall);
    }
    let keyed = rule("texture", json!({"swatch": "user/1/swatch.png"}));
    assert_eq!(
        apply(&wall, &region, &keyed, None).unwrap_err().field,
        "params.swatch"
    );
    let sw = RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb(if (x / 4 + y / 4) % 2 == 0 {
            [200, 40, 40]
        } else {
            [40, 40, 200]
        })
    });
    let sw = palette_rules::swatch::LinearSwatch::from_rgb(&sw);
    let out = rgb(apply(&wall, &region, &keyed, Some(&sw)).unwrap());
    assert_ne!(out, wall);
}

#[test]
fn cutout_makes_the_object_transparent() {
    let room = synth::room(96, 72);
    let r = rule("remove", json!({"mode": "cutout"}));
    match apply(&room.photo, &room.sofa, &r, None).unwrap() {
        Edited::Rgba(out) => {
            for ((o, p), a) in out
                .pixels()
                .zip(room.photo.pixels())
                .zip(room.sofa.pixels())
            {
                assert_eq!(o[3], 255 - a[0]);
                assert_eq!(&o.0[..3], &p.0);
            }
        }
        Edited::Rgb(_) => panic!("cut-out must be RGBA"),
    }
}

#[test]
fn a_cutout_of_a_transparent_photo_keeps_its_transparency_and_colours() {
    // A product on a transparent page, read on white as the pipeline reads it; alpha 0..255 across the columns.
    let (w, h) = (256u32, 4u32);
    let colour = |x: u32, y: u32| [(x % 200) as u8 + 30, (y * 50) as u8, 200 - (x % 150) as u8];
    let source_alpha = GrayImage::from_fn(w, h, |x, _| image::Luma([x as u8]));
    let on_white = RgbImage::from_fn(w, h, |x, y| {
        let a = x;
        image::Rgb(colour(x, y).map(|c| ((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8))
    });
    // The cut-out region: the top half of the rows removed.
    let region = GrayImage::from_fn(w, h, |_, y| image::Luma([if y < 2 { 255 } else { 0 }]));
    let Edited::Rgba(mut out) =
        apply(&on_white, &region, &rule("remove", json!({})), None).unwrap()
    else {
        panic!("cut-out must be RGBA");
    };
    palette_rules::ops::remove::keep_source_transparency(&mut out, &source_alpha);
    for (x, y, px) in out.enumerate_pixels() {
        if y < 2 {
            assert_eq!(px[3], 0, "removed stays removed at ({x}, {y})");
            continue;
        }
        assert_eq!(u32::from(px[3]), x, "the source's alpha at ({x}, {y})");
        if x >= 32 {
            // Taken back off the white: within the rounding of an 8-bit blend at this alpha.
            let tolerance = 255 / x + 1;
            for (got, want) in px.0[..3].iter().zip(colour(x, y)) {
                assert!(
                    got.abs_diff(want) as u32 <= tolerance,
                    "({x}, {y}): {got} vs {want}"
                );
            }
        }
    }
    // An opaque photo is left exactly as the plain cut-out.
    let opaque = GrayImage::from_pixel(w, h, image::Luma([255]));
    let Edited::Rgba(plain) = apply(&on_white, &region, &rule("remove", json!({})), None).unwrap()
    else {
        unreachable!()
    };
    let mut kept = plain.clone();
    palette_rules::ops::remove::keep_source_transparency(&mut kept, &opaque);
    assert_eq!(kept, plain);
}

/// Stripes + grain: the kind of regular texture where copying beats diffusing.
fn striped(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let s = if ((x + y / 2) / 6) % 2 == 0 {
            1.0
        } else {
            0.55
        };
        let g = 1.0 + 0.04 * synth::noise(x, y, 5);
        image::Rgb([190.0, 150.0, 110.0].map(|c: f32| (c * s * g).clamp(0.0, 255.0) as u8))
    })
}

#[test]
fn fill_reconstructs_texture_better_than_diffusion() {
    let (w, h) = (128, 96);
    let truth = striped(w, h);
    let hole = GrayImage::from_fn(w, h, |x, y| {
        image::Luma(if (48..80).contains(&x) && (32..64).contains(&y) {
            [255]
        } else {
            [0]
        })
    });
    let mut holed = truth.clone();
    for (x, y, p) in holed.enumerate_pixels_mut() {
        if hole.get_pixel(x, y)[0] > 0 {
            *p = image::Rgb([0, 255, 0]);
        }
    }
    let filled = rgb(apply(
        &holed,
        &hole,
        &rule("remove", json!({"mode": "fill"})),
        None,
    )
    .unwrap());
    let ours = psnr_on(&filled, &truth, &hole);
    // Baseline: every hole pixel set to the mean colour around it (what diffusion converges to on stripes).
    let ring: Vec<[u8; 3]> = holed
        .enumerate_pixels()
        .filter(|&(x, y, _)| {
            (44..84).contains(&x) && (28..68).contains(&y) && hole.get_pixel(x, y)[0] == 0
        })
        .map(|(_, _, p)| p.0)
        .collect();
    let mean: [u8; 3] = [0, 1, 2]
        .map(|k| (ring.iter().map(|p| p[k] as f32).sum::<f32>() / ring.len() as f32) as u8);
    let mut flat = holed.clone();
    for (x, y, p) in flat.enumerate_pixels_mut() {
        if hole.get_pixel(x, y)[0] > 0 {
            *p = image::Rgb(mean);
        }
    }
    let base = psnr_on(&flat, &truth, &hole);
    println!("fill PSNR {ours:.1} dB vs flat {base:.1} dB");
    assert!(ours > base + 3.0, "fill {ours:.1} dB vs flat {base:.1} dB");
}

#[test]
fn refined_region_follows_the_photo_edge() {
    // Sizes where the guided filter runs at full resolution (r = 2) and subsampled (r = 5, s = 2; r = 10, s = 5).
    for (w, h) in [(504, 378), (1008, 756), (2016, 1512)] {
        refined_region_follows_the_photo_edge_at(w, h);
    }
}

fn refined_region_follows_the_photo_edge_at(w: u32, h: u32) {
    let room = synth::room(w, h);
    let (w, h) = room.photo.dimensions();
    let probs = synth::to_model(&room.sofa, 72, 72);
    let m = mask::ModelMask {
        width: 72,
        height: 72,
        probs: &probs,
    };
    let b = mask::nonzero_bounds(&room.sofa);
    let bx = mask::PixelBox {
        x0: b.x0 as f32,
        y0: b.y0 as f32,
        x1: b.x1 as f32,
        y1: b.y1 as f32,
    };
    let up = mask::upsample_instance(&m, bx, w, h);
    let err = |r: &GrayImage| {
        r.pixels()
            .zip(room.sofa.pixels())
            .map(|(a, t)| (a[0] as f64 - t[0] as f64).abs())
            .sum::<f64>()
            / (w * h) as f64
    };
    let plain = region::build_region(
        &room.photo,
        std::slice::from_ref(&up),
        &[],
        &RegionParams {
            refine_edges: false,
            coarse: false,
            feather_px: 0.0,
            grow_px: 0.0,
        },
    );
    let refined = region::build_region(
        &room.photo,
        &[up],
        &[],
        &RegionParams {
            refine_edges: true,
            coarse: false,
            feather_px: 0.0,
            grow_px: 0.0,
        },
    );
    let (e0, e1) = (err(&plain), err(&refined));
    println!("{w}x{h}: mean |alpha - truth|: upsampled {e0:.2}, refined {e1:.2}");
    assert!(e1 < 0.5 * e0, "{w}x{h}: refined {e1:.2} vs plain {e0:.2}");
}
