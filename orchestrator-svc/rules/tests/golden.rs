//! Golden images: every rule on a tiny synthetic room, compared with committed PNGs within a numeric tolerance
//! (float maths may differ by a code between CPUs/compilers). Regenerate with PALETTE_UPDATE_GOLDEN=1 after an
//! intended change, then look at the files before committing them.

use palette_rules::rule::parse_rule;
use palette_rules::{Edited, RegionParams, apply, contact, region, synth};
use serde_json::json;
use std::path::PathBuf;

const MAX_DIFF: u8 = 3;
const MEAN_DIFF: f64 = 0.25;

#[test]
fn rules_match_golden_images() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("PALETTE_UPDATE_GOLDEN").is_some();
    let room = synth::room(64, 48);
    let cases = [
        ("recolor", &room.wall, json!({"color": "#1f3a5f"})),
        (
            "tone",
            &room.floor,
            json!({"brightness": 0.3, "warmth": 0.6}),
        ),
        (
            "texture",
            &room.sofa,
            json!({"builtin": "velvet", "scale": 0.5}),
        ),
        ("remove", &room.sofa, json!({"mode": "fill", "grow": 2})),
    ];
    // Light paints on a wall by a window (fall-off, a soft cast shadow, a chair in front): the shadows must stay.
    let window = synth::window_wall(64, 48, true);
    let window_cases = [
        ("recolor_window_white", json!({"color": "#ffffff"})),
        ("recolor_window_greige", json!({"color": "#beb3a3"})),
        ("recolor_window_navy", json!({"color": "#1f3a5f"})),
    ];
    let rows = cases
        .into_iter()
        .map(|(ty, target, params)| {
            let occ = if ty == "texture" || ty == "remove" {
                vec![]
            } else {
                vec![room.sofa.clone()]
            };
            (ty, ty, &room.photo, target, occ, params)
        })
        .chain(window_cases.into_iter().map(|(name, params)| {
            let occ = vec![window.chair.clone(), window.skirting.clone()];
            (name, "recolor", &window.photo, &window.wall, occ, params)
        }));
    for (name, ty, photo, target, occ, params) in rows {
        let rule = parse_rule(ty, params.as_object().unwrap(), None).unwrap();
        let reg = region::build_region(
            photo,
            std::slice::from_ref(target),
            &occ,
            &RegionParams::default(),
        );
        let out = match apply(photo, &reg, &rule, None).unwrap() {
            Edited::Rgb(i) => i,
            Edited::Rgba(i) => contact::flatten(&image::DynamicImage::ImageRgba8(i)),
        };
        let path = dir.join(format!("{name}.png"));
        if update {
            out.save(&path).unwrap();
            continue;
        }
        let want = image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8();
        assert_eq!(want.dimensions(), out.dimensions(), "{name}");
        let diffs: Vec<u8> = want
            .as_raw()
            .iter()
            .zip(out.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
        assert!(
            max <= MAX_DIFF && mean <= MEAN_DIFF,
            "{name}: max diff {max}, mean {mean:.3}"
        );
    }
}
