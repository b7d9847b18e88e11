//! Properties every rule must have: pixels with alpha 0 are untouched, and strength 0 changes nothing anywhere.

use palette_rules::rule::{Rule, parse_rule};
use palette_rules::{Edited, GrayImage, RgbImage, apply};
use proptest::prelude::*;
use serde_json::{Value, json};

fn rules(strength: f64) -> Vec<Rule> {
    let specs: [(&str, Value); 6] = [
        ("recolor", json!({"color": "#8a2be2"})),
        (
            "recolor",
            json!({"color": {"l": 90, "a": -60, "b": 70}, "finish": "gloss"}),
        ),
        (
            "tone",
            json!({"brightness": 0.4, "contrast": -0.3, "saturation": 0.8, "warmth": -0.5}),
        ),
        (
            "texture",
            json!({"builtin": "marble", "rotation": 30, "scale": 0.3}),
        ),
        ("texture", json!({"builtin": "herringbone", "opacity": 0.5})),
        ("remove", json!({"mode": "fill"})),
    ];
    specs
        .into_iter()
        .map(|(t, mut p)| {
            p["strength"] = json!(strength);
            parse_rule(t, p.as_object().unwrap(), None).unwrap()
        })
        .collect()
}

fn rgb(e: Edited) -> RgbImage {
    match e {
        Edited::Rgb(i) => i,
        Edited::Rgba(_) => panic!("expected RGB"),
    }
}

fn image_and_mask() -> impl Strategy<Value = (RgbImage, GrayImage)> {
    (4u32..24, 4u32..24).prop_flat_map(|(w, h)| {
        let n = (w * h) as usize;
        (
            proptest::collection::vec(any::<u8>(), n * 3),
            proptest::collection::vec(prop_oneof![Just(0u8), Just(255u8), any::<u8>()], n),
        )
            .prop_map(move |(px, m)| {
                (
                    RgbImage::from_raw(w, h, px).unwrap(),
                    GrayImage::from_raw(w, h, m).unwrap(),
                )
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn alpha_zero_pixels_are_untouched((photo, mask) in image_and_mask(), strength in 0.0f64..=1.0) {
        for r in rules(strength) {
            let out = rgb(apply(&photo, &mask, &r, None).unwrap());
            for (i, a) in mask.pixels().enumerate() {
                if a[0] == 0 {
                    prop_assert_eq!(&out.as_raw()[i * 3..i * 3 + 3], &photo.as_raw()[i * 3..i * 3 + 3], "{}", r.kind());
                }
            }
        }
    }

    #[test]
    fn strength_zero_is_identity((photo, _m) in image_and_mask()) {
        let full = GrayImage::from_pixel(photo.width(), photo.height(), image::Luma([255]));
        for r in rules(0.0) {
            prop_assert_eq!(&rgb(apply(&photo, &full, &r, None).unwrap()), &photo, "{}", r.kind());
        }
        let cut = parse_rule("remove", json!({"mode": "cutout", "strength": 0}).as_object().unwrap(), None).unwrap();
        match apply(&photo, &full, &cut, None).unwrap() {
            Edited::Rgba(o) => prop_assert!(o.pixels().zip(photo.pixels()).all(|(o, p)| o[3] == 255 && o.0[..3] == p.0)),
            Edited::Rgb(_) => prop_assert!(false, "cut-out must be RGBA"),
        }
    }
}
