//! The CPU work of an item as plain functions of their inputs (no I/O, no runtime): a rule's region and rendering
//! one rule (the instance masks are in `instance_masks`). `ItemRunner` calls them on the blocking pool.

use std::collections::HashMap;

use palette_rules::guide_stats::GuideCache;
use palette_rules::mask::{Rect, nonzero_bounds};
use palette_rules::swatch::LinearSwatch;
use palette_rules::{GrayImage, InPlace, RgbImage};
use palette_service_kit::image_input::rgba_on_white;

use super::error::ItemError;
use super::imaging;
use crate::jobs::validate::PlannedRule;

mod not_applied;
pub use not_applied::{NotApplied, region_not_applied};

/// How a rule's output is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Jpeg,
    /// A cut-out, or any output of a job that asked for PNG (`JobSpec.output_format`).
    Png,
}

impl OutputFormat {
    pub fn is_png(self) -> bool {
        self == OutputFormat::Png
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Png => "image/png",
        }
    }
}

/// One rule applied to one photo.
pub struct RenderedRule {
    pub encoded: Vec<u8>,
    pub format: OutputFormat,
    /// The item's 256x256 preview, when asked for.
    pub preview: Option<Vec<u8>>,
    /// Why the rule changed nothing, when it did not: its output is then the photo as it was.
    pub not_applied: Option<NotApplied>,
}

/// A rule's soft region (full frame, zero outside its box) and whether it leaves the photo as it was.
pub struct Region {
    pub alpha: GrayImage,
    pub not_applied: Option<NotApplied>,
}

/// Whether rules `a` and `b` have the same region: same concept, occluders and region parameters. Rules of one
/// photo that share it (a recolour and a tone on the wall) refine it once (`RuleInput::region`).
pub fn same_region(a: &PlannedRule, b: &PlannedRule) -> bool {
    a.concept == b.concept
        && a.occluders == b.occluders
        && a.rule.region_params() == b.rule.region_params()
}

/// The rule's region: its concept minus its occluders, refined (`palette_rules::region::build_region_shared`).
/// `guides`: one per photo, shared by its rules' regions (those over the same crop solve the guided filter's
/// photo-only half once: `palette_rules::guide_stats`).
pub fn rule_region(
    photo: &RgbImage,
    masks: &HashMap<String, GrayImage>,
    rule: &PlannedRule,
    guides: &GuideCache,
) -> Region {
    // Full-resolution masks are large: borrowed, never copied.
    let target = masks
        .get(&rule.concept)
        .map_or(&[][..], std::slice::from_ref);
    let occluders: Vec<&GrayImage> = rule.occluders.iter().filter_map(|c| masks.get(c)).collect();
    let mut alpha = palette_rules::region::build_region_shared(
        photo,
        target,
        &occluders,
        &rule.rule.region_params(),
        guides,
    );
    // A rule with nothing to edit still writes its output (the photo as it was, in the rule's format), and says why.
    let not_applied = region_not_applied(masks.get(&rule.concept), &occluders, &mut alpha);
    Region { alpha, not_applied }
}

/// What rendering one rule needs.
pub struct RuleInput<'a> {
    /// The photo as decoded: never edited.
    pub photo: &'a RgbImage,
    /// The photo's alpha when it has transparent parts (`imaging::decode_photo`): a cut-out keeps them.
    pub transparency: Option<&'a GrayImage>,
    /// A copy of `photo` the rule edits in place; equal to `photo` again when `render_rule` returns (with
    /// `restore`), so the next rule of the photo starts from the original without a full-frame copy per rule.
    pub work: &'a mut RgbImage,
    /// Whether to put `work` back as `photo` after encoding: false for a photo's last rule, whose caller drops the
    /// copy (the region's box copied back for nothing: ~1 % of a 12 MP photo with three rules, perf).
    pub restore: bool,
    /// The rule's region (`rule_region`), possibly shared with other rules of the photo.
    pub region: &'a Region,
    pub rule: &'a PlannedRule,
    /// The image's index in the job (a rule may differ per image, e.g. a texture's perspective).
    pub idx: u32,
    pub swatch: Option<&'a LinearSwatch>,
    pub want_preview: bool,
    /// Encode an edit as PNG, keeping the photo's transparency (`JobSpec.output_format`); JPEG otherwise.
    pub png: bool,
}

/// The edit and the encoded output of one rule on its region.
pub fn render_rule(input: RuleInput<'_>) -> Result<RenderedRule, ItemError> {
    let RuleInput {
        photo,
        transparency,
        work,
        region,
        rule,
        idx,
        swatch,
        want_preview,
        restore: put_back,
        png,
    } = input;
    let applied =
        palette_rules::apply_in_place(work, &region.alpha, &rule.rule.for_image(idx), swatch)
            .map_err(|source| ItemError::Rule {
                rule_id: rule.rule_id.clone(),
                source,
            })?;
    let not_applied = region
        .not_applied
        .or_else(|| NotApplied::by_rule(&rule.rule, &region.alpha));
    match applied {
        InPlace::Edited => {
            let encoded = if png {
                imaging::encode_png_keeping(work, transparency)
            } else {
                imaging::encode_jpeg(work)
            };
            let preview = want_preview.then(|| imaging::preview_jpeg(work));
            // Only pixels inside the region's box were written: put those back before anything can fail.
            if put_back {
                restore(work, photo, nonzero_bounds(&region.alpha));
            }
            Ok(RenderedRule {
                preview: preview.transpose()?,
                encoded: encoded?,
                format: if png {
                    OutputFormat::Png
                } else {
                    OutputFormat::Jpeg
                },
                not_applied,
            })
        }
        InPlace::Cutout(mut img) => {
            if let Some(alpha) = transparency {
                palette_rules::ops::remove::keep_source_transparency(&mut img, alpha);
            }
            Ok(RenderedRule {
                preview: want_preview
                    .then(|| imaging::preview_jpeg(&rgba_on_white(&img)))
                    .transpose()?,
                encoded: imaging::encode_png_rgba(&img)?,
                format: OutputFormat::Png,
                not_applied,
            })
        }
    }
}

/// Copies the box `b` of `from` into `to` (same size).
fn restore(to: &mut RgbImage, from: &RgbImage, b: Rect) {
    if b.is_empty() {
        return;
    }
    let stride = from.width() as usize * 3;
    let (x0, x1) = (b.x0 as usize * 3, b.x1 as usize * 3);
    for (dst, src) in to
        .as_mut()
        .chunks_exact_mut(stride)
        .zip(from.as_raw().chunks_exact(stride))
        .skip(b.y0 as usize)
        .take(b.height() as usize)
    {
        dst[x0..x1].copy_from_slice(&src[x0..x1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(
        rule_id: &str,
        concept: &str,
        rule_type: &str,
        params: serde_json::Value,
    ) -> PlannedRule {
        let params = params.as_object().cloned().unwrap_or_default();
        PlannedRule {
            rule_id: rule_id.into(),
            concept: concept.into(),
            rule: palette_rules::rule::parse_rule(rule_type, &params, None).unwrap(),
            occluders: Vec::new(),
        }
    }

    #[test]
    fn rules_rendered_in_place_on_one_copy_with_a_shared_region_give_what_each_gives_alone() {
        // A paint and a tone on the wall (one region, built once), then a tone on the floor: each output must be
        // the photo with only its own rule applied, as `palette_rules::apply` on a fresh copy gives.
        let (w, h) = (96u32, 64u32);
        let photo = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, 90]));
        let wall = GrayImage::from_fn(w, h, |_, y| image::Luma([if y < 40 { 255 } else { 0 }]));
        let floor = GrayImage::from_fn(w, h, |_, y| image::Luma([if y >= 44 { 255 } else { 0 }]));
        let masks = HashMap::from([("wall".to_string(), wall), ("floor".to_string(), floor)]);
        let rules = [
            planned(
                "paint",
                "wall",
                "recolor",
                serde_json::json!({"color": "#1F3A5F"}),
            ),
            planned("warm", "wall", "tone", serde_json::json!({"warmth": 0.4})),
            planned(
                "dark",
                "floor",
                "tone",
                serde_json::json!({"brightness": -0.3}),
            ),
        ];
        assert!(same_region(&rules[0], &rules[1]) && !same_region(&rules[1], &rules[2]));
        let guides = GuideCache::new();
        let shared = rule_region(&photo, &masks, &rules[0], &guides);
        let mut work = photo.clone();
        for rule in &rules {
            let own = rule_region(&photo, &masks, rule, &GuideCache::new());
            let region = if same_region(rule, &rules[0]) {
                &shared
            } else {
                &own
            };
            let rendered = render_rule(RuleInput {
                photo: &photo,
                transparency: None,
                work: &mut work,
                region,
                rule,
                idx: 0,
                swatch: None,
                want_preview: false,
                restore: true,
                png: false,
            })
            .unwrap();
            let Ok(palette_rules::Edited::Rgb(alone)) =
                palette_rules::apply(&photo, &own.alpha, &rule.rule, None)
            else {
                panic!("{} gives RGB", rule.rule_id);
            };
            assert_eq!(
                rendered.encoded,
                imaging::encode_jpeg(&alone).unwrap(),
                "{}",
                rule.rule_id
            );
            assert_eq!(work, photo, "{} restored the working copy", rule.rule_id);
        }
    }

    #[test]
    fn a_fill_over_the_whole_photo_is_not_applied_while_a_paint_sharing_its_region_is() {
        let (w, h) = (64u32, 48u32);
        let photo = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 4) as u8, 90]));
        let masks = HashMap::from([(
            "wall".to_string(),
            GrayImage::from_pixel(w, h, image::Luma([255])),
        )]);
        let paint = planned(
            "paint",
            "wall",
            "recolor",
            serde_json::json!({"color": "#1F3A5F"}),
        );
        let gone = planned(
            "gone",
            "wall",
            "remove",
            serde_json::json!({"mode": "fill"}),
        );
        assert!(same_region(&paint, &gone));
        let region = rule_region(&photo, &masks, &paint, &GuideCache::new());
        assert_eq!(region.not_applied, None);
        let mut work = photo.clone();
        let mut render = |rule| {
            render_rule(RuleInput {
                photo: &photo,
                transparency: None,
                work: &mut work,
                region: &region,
                rule,
                idx: 0,
                swatch: None,
                want_preview: false,
                restore: true,
                png: false,
            })
            .unwrap()
        };
        assert_eq!(render(&paint).not_applied, None);
        let filled = render(&gone);
        assert_eq!(filled.not_applied, Some(NotApplied::NothingToFillFrom));
        assert_eq!(filled.encoded, imaging::encode_jpeg(&photo).unwrap());
    }
}
