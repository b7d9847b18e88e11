//! Texture in perspective: with the whole photo marked as the rectangle it is flat tiling; on a receding floor the
//! tiles shrink toward the far edge, far tiles blend to the swatch's mean instead of aliasing, and the plane beyond
//! the horizon gets that mean too. Bad corners are refused with the field named.

use palette_rules::rule::parse_rule;
use palette_rules::{Edited, GrayImage, RgbImage, apply};
use serde_json::{Value, json};

fn texture(photo: &RgbImage, mut params: Value, swatch: &RgbImage) -> RgbImage {
    params["swatch"] = json!("test/checker.png");
    let region = GrayImage::from_pixel(photo.width(), photo.height(), image::Luma([255]));
    let rule = parse_rule("texture", params.as_object().unwrap(), None).unwrap();
    let swatch = palette_rules::swatch::LinearSwatch::from_rgb(swatch);
    match apply(photo, &region, &rule, Some(&swatch)).unwrap() {
        Edited::Rgb(out) => out,
        Edited::Rgba(_) => panic!("texture gives RGB"),
    }
}

/// 64x64 red/blue checker of 8x8 squares: 8 squares per tile side.
fn checker() -> RgbImage {
    RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb(if (x / 8 + y / 8) % 2 == 0 {
            [220, 40, 40]
        } else {
            [40, 40, 220]
        })
    })
}

fn grey(w: u32, h: u32) -> RgbImage {
    RgbImage::from_pixel(w, h, image::Rgb([128, 128, 128]))
}

/// Red-dominant -> blue-dominant switches along row `y` between x0 and x1.
fn switches(img: &RgbImage, y: u32, x0: u32, x1: u32) -> usize {
    let red = |x: u32| {
        let p = img.get_pixel(x, y).0;
        p[0] > p[2]
    };
    (x0 + 1..x1).filter(|&x| red(x) != red(x - 1)).count()
}

fn row_stats(img: &RgbImage, y: u32, x0: u32, x1: u32) -> ([f64; 3], f64) {
    let px: Vec<[f64; 3]> = (x0..x1)
        .map(|x| img.get_pixel(x, y).0.map(f64::from))
        .collect();
    let n = px.len() as f64;
    let mean: [f64; 3] = std::array::from_fn(|c| px.iter().map(|p| p[c]).sum::<f64>() / n);
    let var = px
        .iter()
        .map(|p| (0..3).map(|c| (p[c] - mean[c]).powi(2)).sum::<f64>())
        .sum::<f64>()
        / n;
    (mean, var)
}

/// A plank swatch: 64x16, red/blue squares of 8x8 (8 across, 2 down).
fn planks() -> RgbImage {
    let square = checker();
    RgbImage::from_fn(64, 16, |x, y| *square.get_pixel(x, y))
}

#[test]
fn the_whole_photo_as_the_rectangle_is_flat_tiling() {
    let (w, h) = (240, 160);
    let photo = grey(w, h);
    // Tiles of 90 px for a 64 px swatch: magnified, so the perspective path stays on mip level 0 like flat tiling.
    let flat = json!({"scale": 3.0, "rotation": 20.0});
    let mut persp = flat.clone();
    persp["perspective"] = json!([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]);
    persp["perspective_aspect"] = json!(w as f64 / h as f64);
    // A square swatch, and one four times as wide as it is tall, which keeps its shape (it came out square).
    for (name, swatch) in [("checker", checker()), ("planks", planks())] {
        let (a, b) = (
            texture(&photo, flat.clone(), &swatch),
            texture(&photo, persp.clone(), &swatch),
        );
        let worst = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(p, q)| p.abs_diff(*q))
            .max()
            .unwrap();
        assert!(
            worst <= 1,
            "{name}: perspective of the full frame differs from flat by {worst} codes"
        );
    }
}

#[test]
fn tiles_shrink_toward_the_far_edge_and_blend_to_the_mean_there() {
    let (w, h) = (400, 300);
    let photo = grey(w, h);
    // A floor: far edge a third of the width, 20 % down; near edge the full bottom.
    let params = json!({
        "scale": 0.5,
        "perspective": [[0.33, 0.2], [0.67, 0.2], [1.0, 1.0], [0.0, 1.0]],
    });
    let out = texture(&photo, params, &checker());
    // Along a row, squares per pixel of floor width: the far rows are denser.
    let density = |y: u32| {
        let t = (y as f64 / h as f64 - 0.2) / 0.8;
        let (x0, x1) = ((0.33 * (1.0 - t)) * w as f64, (0.67 + 0.33 * t) * w as f64);
        switches(&out, y, x0 as u32 + 2, x1 as u32 - 2) as f64 / (x1 - x0)
    };
    let (near, mid) = (density(290), density(140));
    assert!(
        near > 0.0 && mid > 1.5 * near,
        "squares per px: near {near:.3}, mid {mid:.3}"
    );
    // Right below the far edge a pixel spans several squares: the mip chain blends them (no moiré), to the
    // swatch's mean (purple-grey), while near rows keep full contrast.
    let (far_mean, far_var) = row_stats(&out, 63, 140, 260);
    let (_, near_var) = row_stats(&out, 290, 20, 380);
    assert!(
        far_var < 0.1 * near_var,
        "variance far {far_var:.0} vs near {near_var:.0}"
    );
    assert!(
        (far_mean[0] - far_mean[2]).abs() < 20.0,
        "far rows average red and blue: {far_mean:?}"
    );
}

#[test]
fn beyond_the_horizon_the_plane_is_the_swatchs_mean() {
    let (w, h) = (200, 200);
    let photo = grey(w, h);
    // Strongly converging sides: their lines meet above the rectangle but inside the photo (y ~ 0.33).
    let params = json!({"perspective": [[0.45, 0.6], [0.55, 0.6], [1.0, 1.0], [0.0, 1.0]]});
    let out = texture(&photo, params, &checker());
    let (mean, var) = row_stats(&out, 2, 0, w);
    assert!(var < 1.0, "the sky row is one colour: {mean:?} var {var}");
    assert!(mean.iter().all(|c| c.is_finite() && *c > 0.0));
}

#[test]
fn bad_corners_are_refused_naming_the_field() {
    let bad = [
        json!([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]),
        json!([[0.0, 0.0], [1.0, 0.0], [1.0, 1.5], [0.0, 1.0]]),
        json!("top left"),
        // Counter-clockwise on screen.
        json!([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
        // Self-intersecting (a bow tie).
        json!([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
        // Three corners on one line.
        json!([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [0.5, 1.0]]),
    ];
    for corners in bad {
        let params = json!({"builtin": "wood", "perspective": corners});
        let errs = parse_rule("texture", params.as_object().unwrap(), None).unwrap_err();
        assert!(
            errs.iter().any(|e| e.field == "params.perspective"),
            "{corners}: {errs:?}"
        );
    }
    let params = json!({"builtin": "wood", "perspective_aspect": 0.0,
        "perspective": [[0.3, 0.2], [0.7, 0.2], [1.0, 1.0], [0.0, 1.0]]});
    let errs = parse_rule("texture", params.as_object().unwrap(), None).unwrap_err();
    assert_eq!(errs[0].field, "params.perspective_aspect");
}

#[test]
fn a_per_image_perspective_resolves_per_image_and_names_bad_entries() {
    use palette_rules::rule::Rule;
    let floor = json!([[0.3, 0.5], [0.7, 0.5], [1.0, 1.0], [0.0, 1.0]]);
    let params = json!({"builtin": "wood", "perspective_aspect": 2.0, "perspective": {"2": floor}});
    let rule = parse_rule("texture", params.as_object().unwrap(), None).unwrap();
    assert_eq!(rule.perspective_images(), [2]);
    let plane = |idx| match rule.for_image(idx).into_owned() {
        Rule::Texture(p) => p.perspective,
        _ => unreachable!(),
    };
    let two = plane(2).unwrap();
    assert_eq!((two.corners[1], two.aspect), ([0.7, 0.5], 2.0));
    assert!(plane(0).is_none(), "images without an entry are tiled flat");
    // Unresolved (apply without for_image): flat, never another image's plane.
    match &rule {
        Rule::Texture(p) => assert!(p.perspective.is_none()),
        _ => unreachable!(),
    }

    let bad = json!({"builtin": "wood", "perspective": {"x": floor, "01": floor, "1": [[0, 0]]}});
    let errs = parse_rule("texture", bad.as_object().unwrap(), None).unwrap_err();
    let mut fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "params.perspective.01",
            "params.perspective.1",
            "params.perspective.x"
        ]
    );
}
