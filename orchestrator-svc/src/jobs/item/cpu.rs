//! The CPU work of an item as plain functions of their inputs (no I/O, no runtime): upsampling an instance mask,
//! and rendering one rule. `ItemRunner` calls them on the blocking pool.

use std::collections::HashMap;

use palette_rules::mask::{InstanceUpsampler, ModelMask, PixelBox};
use palette_rules::{Edited, GrayImage, RgbImage};

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

/// What rendering one rule needs.
pub struct RuleInput<'a> {
    pub photo: &'a RgbImage,
    /// The full-resolution union mask of every concept a rule needs (see `instance_mask`).
    pub masks: &'a HashMap<String, GrayImage>,
    pub rule: &'a PlannedRule,
    /// The image's index in the job (a rule may differ per image, e.g. a texture's perspective).
    pub idx: u32,
    pub swatch: Option<&'a RgbImage>,
    pub want_preview: bool,
}

/// The rule's region (its concept minus its occluders, refined), the edit, and the encoded output.
pub fn render_rule(input: RuleInput<'_>) -> Result<RenderedRule, ItemError> {
    let RuleInput {
        photo,
        masks,
        rule,
        idx,
        swatch,
        want_preview,
    } = input;
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
    let mut region = palette_rules::region::build_region(
        photo,
        of(&rule.concept),
        occluders,
        &rule.rule.region_params(),
    );
    // A rule with nothing to edit still writes its output (the photo as it was), and says why.
    let not_applied = match masks.get(&rule.concept) {
        None => Some(NotApplied::ConceptNotFound),
        Some(target) if hidden_by_occluders(target, &region) => {
            // Soft edges leave a faint rim where the occluder's edge meets the target's: not an edit anyone asked
            // for. Nothing at all, then; the output keeps the rule's format.
            region.fill(0);
            Some(NotApplied::RegionEmpty)
        }
        Some(_) => None,
    };
    let edited = palette_rules::apply(photo, &region, &rule.rule.for_image(idx), swatch).map_err(
        |source| ItemError::Rule {
            rule_id: rule.rule_id.clone(),
            source,
        },
    )?;
    Ok(match edited {
        Edited::Rgb(img) => RenderedRule {
            preview: want_preview
                .then(|| imaging::preview_jpeg(&img))
                .transpose()?,
            encoded: imaging::encode_jpeg(&img)?,
            format: OutputFormat::Jpeg,
            not_applied,
        },
        Edited::Rgba(img) => RenderedRule {
            preview: want_preview
                .then(|| imaging::preview_jpeg(&imaging::flatten_on_white(&img)))
                .transpose()?,
            encoded: imaging::encode_png_rgba(&img)?,
            format: OutputFormat::Png,
            not_applied,
        },
    })
}
