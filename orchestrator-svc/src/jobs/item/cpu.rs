//! The CPU work of an item as plain functions of their inputs (no I/O, no runtime): upsampling an instance mask,
//! and rendering one rule. `ItemRunner` calls them on the blocking pool.

use std::collections::HashMap;

use palette_rules::mask::{InstanceUpsampler, ModelMask, PixelBox, Rect, nonzero_bounds};
use palette_rules::{GrayImage, InPlace, RgbImage};

use super::error::ItemError;
use super::imaging;
use super::mask_cache::ConceptMasks;
use crate::jobs::validate::PlannedRule;
use crate::mask_png::{self, Placement};

/// One instance at full resolution, as stored.
pub struct InstanceMask {
    /// The instance as stored (`masks/...png`): its crop to its non-zero pixels (see `crate::mask_png`).
    pub png: Vec<u8>,
    /// Where the crop sits in the photo.
    pub placement: Placement,
}

/// Upsamples one instance inside its box to `width` x `height`, a row at a time, and encodes its crop to its
/// non-zero pixels; when given `union` (a full-frame plane: the concept's union so far), folds the instance into it
/// (max). A region is built from the union of a concept's instances, so memory is one plane per concept a rule
/// needs and none per instance: at 12 MP a full-frame plane per instance (~20 per photo) cost more in page faults
/// and zeroing than the upsample itself.
pub fn instance_mask(
    model: &ModelMask<'_>,
    bbox: PixelBox,
    (width, height): (u32, u32),
    mut union: Option<&mut GrayImage>,
) -> Result<InstanceMask, ItemError> {
    let up = InstanceUpsampler::new(model, bbox, width, height);
    let b = up.nonzero_bounds();
    let encode_error = |e: png::EncodingError| ItemError::Encode {
        what: "PNG encode",
        source: e.into(),
    };
    if b.is_empty() {
        let png =
            mask_png::encode_rows(Placement::EMPTY, |_, out| out.fill(0)).map_err(encode_error)?;
        return Ok(InstanceMask {
            png,
            placement: Placement::EMPTY,
        });
    }
    let placement = Placement {
        x: b.x0,
        y: b.y0,
        width: b.width(),
        height: b.height(),
    };
    let stride = width as usize;
    let png = mask_png::encode_rows(placement, |y, row| {
        up.row(y, b.x0, row);
        if let Some(union) = union.as_deref_mut() {
            let start = y as usize * stride + b.x0 as usize;
            for (u, &v) in union.as_mut()[start..start + row.len()]
                .iter_mut()
                .zip(row.iter())
            {
                *u = (*u).max(v);
            }
        }
    })
    .map_err(encode_error)?;
    Ok(InstanceMask { png, placement })
}

/// Every instance of one concept (`instance_mask`), and their union when `keep_union` (a rule needs the concept).
/// Boxes are in the segmenter's view of the image; both apply EXIF orientation, so only a scale can differ.
pub fn concept_masks(
    masks: &ConceptMasks,
    (w, h): (u32, u32),
    keep_union: bool,
) -> Result<(Vec<InstanceMask>, Option<GrayImage>), ItemError> {
    let sx = w as f32 / masks.image_width.max(1) as f32;
    let sy = h as f32 / masks.image_height.max(1) as f32;
    let instances = &masks.result.instances;
    // Zeroed lazily by the allocator: only the pages instances touch are ever written.
    let mut union = (keep_union && !instances.is_empty()).then(|| GrayImage::new(w, h));
    let mut out = Vec::with_capacity(instances.len());
    for instance in instances {
        let model = ModelMask {
            width: masks.mask_width,
            height: masks.mask_height,
            probs: instance.mask.as_ref().map_or(&[][..], |m| &m.data[..]),
        };
        let bbox = instance.r#box.map_or(
            PixelBox {
                x0: 0.0,
                y0: 0.0,
                x1: w as f32,
                y1: h as f32,
            },
            |b| PixelBox {
                x0: b.x0 * sx,
                y0: b.y0 * sy,
                x1: b.x1 * sx,
                y1: b.y1 * sy,
            },
        );
        out.push(instance_mask(&model, bbox, (w, h), union.as_mut())?);
    }
    Ok((out, union))
}

/// How a rule's output is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Jpeg,
    /// A cut-out with transparency.
    Png,
}

impl OutputFormat {
    pub fn has_alpha(self) -> bool {
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

/// Why a rule left a photo as it was (`RuleOutput.not_applied_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotApplied {
    /// The segmenter found no instance of the rule's concept in the photo.
    ConceptNotFound,
    /// Instances were found, but occluders in front cover (nearly) all of them.
    RegionEmpty,
}

impl NotApplied {
    pub fn as_str(self) -> &'static str {
        match self {
            NotApplied::ConceptNotFound => "concept_not_found",
            NotApplied::RegionEmpty => "region_empty",
        }
    }
}

/// Whether the occluders leave less than 2 % of the target's mask (by alpha) in the rule's region: soft edges keep a
/// rim where an occluder's edge meets the target's (1.5 % of a 64x48 photo's half, measured), so not exactly 0.
pub fn hidden_by_occluders(target: &GrayImage, region: &GrayImage) -> bool {
    let sum = |img: &GrayImage| img.iter().map(|&a| a as u64).sum::<u64>();
    sum(region) * 50 < sum(target)
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

/// The rule's region: its concept minus its occluders, refined (`palette_rules::region::build_region`).
pub fn rule_region(
    photo: &RgbImage,
    masks: &HashMap<String, GrayImage>,
    rule: &PlannedRule,
) -> Region {
    // Full-resolution masks are large: borrow them; copy only to join several occluder concepts.
    let of = |c: &String| masks.get(c).map_or(&[][..], std::slice::from_ref);
    let joined: Vec<GrayImage>;
    let occluders: &[GrayImage] = match rule.occluders.as_slice() {
        [] => &[],
        [one] => of(one),
        many => {
            joined = many.iter().flat_map(|c| of(c).iter().cloned()).collect();
            &joined
        }
    };
    let mut alpha = palette_rules::region::build_region(
        photo,
        of(&rule.concept),
        occluders,
        &rule.rule.region_params(),
    );
    // A rule with nothing to edit still writes its output (the photo as it was), and says why.
    let not_applied = match masks.get(&rule.concept) {
        None => Some(NotApplied::ConceptNotFound),
        Some(target) if hidden_by_occluders(target, &alpha) => {
            // Soft edges leave a faint rim where the occluder's edge meets the target's: not an edit anyone asked
            // for. Nothing at all, then; the output keeps the rule's format.
            alpha.fill(0);
            Some(NotApplied::RegionEmpty)
        }
        Some(_) => None,
    };
    Region { alpha, not_applied }
}

/// What rendering one rule needs.
pub struct RuleInput<'a> {
    /// The photo as decoded: never edited.
    pub photo: &'a RgbImage,
    /// A copy of `photo` the rule edits in place; equal to `photo` again when `render_rule` returns, so the next
    /// rule of the photo starts from the original without a full-frame copy per rule.
    pub work: &'a mut RgbImage,
    /// The rule's region (`rule_region`), possibly shared with other rules of the photo.
    pub region: &'a Region,
    pub rule: &'a PlannedRule,
    /// The image's index in the job (a rule may differ per image, e.g. a texture's perspective).
    pub idx: u32,
    pub swatch: Option<&'a RgbImage>,
    pub want_preview: bool,
}

/// The edit and the encoded output of one rule on its region.
pub fn render_rule(input: RuleInput<'_>) -> Result<RenderedRule, ItemError> {
    let RuleInput {
        photo,
        work,
        region,
        rule,
        idx,
        swatch,
        want_preview,
    } = input;
    let applied =
        palette_rules::apply_in_place(work, &region.alpha, &rule.rule.for_image(idx), swatch)
            .map_err(|source| ItemError::Rule {
                rule_id: rule.rule_id.clone(),
                source,
            })?;
    let not_applied = region.not_applied;
    match applied {
        InPlace::Edited => {
            let encoded = imaging::encode_jpeg(work);
            let preview = want_preview.then(|| imaging::preview_jpeg(work));
            // Only pixels inside the region's box were written: put those back before anything can fail.
            restore(work, photo, nonzero_bounds(&region.alpha));
            Ok(RenderedRule {
                preview: preview.transpose()?,
                encoded: encoded?,
                format: OutputFormat::Jpeg,
                not_applied,
            })
        }
        InPlace::Cutout(img) => Ok(RenderedRule {
            preview: want_preview
                .then(|| imaging::preview_jpeg(&imaging::flatten_on_white(&img)))
                .transpose()?,
            encoded: imaging::encode_png_rgba(&img)?,
            format: OutputFormat::Png,
            not_applied,
        }),
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
        let shared = rule_region(&photo, &masks, &rules[0]);
        let mut work = photo.clone();
        for rule in &rules {
            let own = rule_region(&photo, &masks, rule);
            let region = if same_region(rule, &rules[0]) {
                &shared
            } else {
                &own
            };
            let rendered = render_rule(RuleInput {
                photo: &photo,
                work: &mut work,
                region,
                rule,
                idx: 0,
                swatch: None,
                want_preview: false,
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

    /// A SAM-like instance at the real model's 288x288 mask resolution: saturated inside and outside, a soft edge
    /// about one model pixel wide (a sigmoid of the signed distance to an ellipse).
    fn saturated_blob(cx: f32, cy: f32, rx: f32, ry: f32) -> Vec<u8> {
        const N: usize = 288;
        (0..N * N)
            .map(|i| {
                let (x, y) = ((i % N) as f32 + 0.5, (i / N) as f32 + 0.5);
                let d = (((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2)).sqrt() - 1.0;
                let logit = -d * rx.min(ry) * 4.0;
                (255.0 / (1.0 + (-logit).exp())).round() as u8
            })
            .collect()
    }

    #[test]
    fn realistic_masks_of_a_12_mp_photo_store_in_well_under_2_mb() {
        // Ten instances of mixed sizes, as a real SAM3 gives for wall, floor and sofa in a room shot. The bundled
        // random-weights model instead makes soft noise everywhere (48x48 masks, no 0 and no 255 inside a box):
        // orchestrator-bench's 14.5 MB per 12 MP photo measures that model, not what a real one stores.
        let (w, h) = (4032u32, 3024u32);
        let blobs = [
            (144.0, 70.0, 140.0, 70.0),
            (144.0, 240.0, 140.0, 45.0),
            (150.0, 190.0, 70.0, 35.0),
            (60.0, 150.0, 25.0, 40.0),
            (230.0, 150.0, 25.0, 40.0),
            (100.0, 120.0, 10.0, 12.0),
            (190.0, 110.0, 15.0, 8.0),
            (40.0, 60.0, 20.0, 20.0),
            (260.0, 250.0, 18.0, 10.0),
            (200.0, 200.0, 30.0, 12.0),
        ];
        let mut total = 0;
        for (cx, cy, rx, ry) in blobs {
            let probs = saturated_blob(cx, cy, rx, ry);
            let model = ModelMask {
                width: 288,
                height: 288,
                probs: &probs,
            };
            let (sx, sy) = (w as f32 / 288.0, h as f32 / 288.0);
            let bbox = PixelBox {
                x0: (cx - rx) * sx,
                y0: (cy - ry) * sy,
                x1: (cx + rx) * sx,
                y1: (cy + ry) * sy,
            };
            let stored = instance_mask(&model, bbox, (w, h), None).unwrap();
            total += stored.png.len();
        }
        println!("10 saturated instances at 12 MP: {total} bytes");
        assert!(total < 2 << 20, "{total} bytes");
    }
}
