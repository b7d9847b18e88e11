//! The CPU work of an item as plain functions of their inputs (no I/O, no runtime): upsampling an instance mask,
//! and rendering one rule. `ItemRunner` calls them on the blocking pool.

use std::collections::HashMap;

use palette_rules::mask::{ModelMask, PixelBox, upsample_instance};
use palette_rules::{Edited, GrayImage, RgbImage};

use super::error::ItemError;
use super::imaging;
use crate::jobs::validate::PlannedRule;
use crate::mask_png::{self, Placement};

/// One instance at full resolution.
pub struct InstanceMask {
    /// The instance as stored (`masks/...png`): its crop to its non-zero pixels (see `crate::mask_png`).
    pub png: Vec<u8>,
    /// Where the crop sits in the photo.
    pub placement: Placement,
    /// The union (max) of the concept's instances so far, this one included; None when no rule needs the concept.
    pub union: Option<GrayImage>,
}

/// Upsamples one instance inside its box to `width` x `height` and encodes its crop to its non-zero pixels; when
/// `keep_union`, folds the full-frame plane into `union_so_far` (a region is built from the union of a concept's
/// instances, so memory is one plane per concept).
pub fn instance_mask(
    model: &ModelMask<'_>,
    bbox: PixelBox,
    (width, height): (u32, u32),
    union_so_far: Option<GrayImage>,
    keep_union: bool,
) -> Result<InstanceMask, ItemError> {
    let gray = upsample_instance(model, bbox, width, height);
    let placement = mask_png::nonzero_bounds(&gray).unwrap_or(Placement::EMPTY);
    let png = imaging::encode_mask_png(&gray, placement)?;
    let union = keep_union.then(|| match union_so_far {
        Some(mut union) => {
            for (u, g) in union.iter_mut().zip(gray.iter()) {
                *u = (*u).max(*g);
            }
            union
        }
        None => gray,
    });
    Ok(InstanceMask {
        png,
        placement,
        union,
    })
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
