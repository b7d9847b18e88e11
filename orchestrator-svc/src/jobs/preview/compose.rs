//! The rules of one preview, applied in order to the photo at preview size (each rule's region from the cache or
//! built and cached), then the encoding: the CPU part of `PreviewService::preview`, run on a blocking thread.

use std::sync::Arc;

use palette_proto::orchestrator::v1::{PreviewEditResponse, RuleOutput};
use palette_rules::{Edited, GrayImage};

use super::Loaded;
use super::cache::{Cached, PreviewCache};
use super::render;
use crate::jobs::item::ItemError;
use crate::jobs::item::cpu::NotApplied;
use crate::jobs::stage::Stage;
use crate::jobs::validate::PlannedRule;

/// Each rule's region (cached) and edit, in order, then the encoding.
pub(super) fn render_all(
    cache: &PreviewCache,
    prefix: &str,
    loaded: &Loaded,
    rules: &[PlannedRule],
    idx: u32,
    png: bool,
) -> Result<PreviewEditResponse, ItemError> {
    let factor = render::scale_factor(loaded.photo.dimensions(), loaded.full_size);
    // None until the first rule: the cached photo is read in place, not copied.
    let mut current: Option<Edited> = None;
    let mut outcomes = Vec::new();
    for (rule, swatch) in rules.iter().zip(&loaded.swatches) {
        let params = render::scaled(rule.rule.region_params(), factor);
        let key = format!(
            "{prefix}|g|{}|{}|{params:?}",
            rule.concept,
            rule.occluders.join(",")
        );
        let target = loaded.masks.get(&rule.concept).map(|m| m.as_ref());
        let (region, not_applied) = match (cache.get(&key), target) {
            (Some(Cached::Plane(region)), Some(_)) => (region, None),
            _ => {
                let stage = Stage::preview("region");
                let occluders: Vec<GrayImage> = rule
                    .occluders
                    .iter()
                    .filter_map(|c| loaded.masks.get(c).map(|m| (**m).clone()))
                    .collect();
                let (region, not_applied) =
                    render::region(&loaded.photo, target, &occluders, &params);
                let region = Arc::new(region);
                if not_applied.is_none() {
                    cache.insert(key, Cached::Plane(region.clone()));
                }
                stage.finish();
                (region, not_applied)
            }
        };
        // Judged on the region at preview size: a full-size region that leaves only a rim of a pixel or two can cover
        // the whole preview, which then shows the photo unchanged while the job fills from the rim (docs/api.md).
        let not_applied = not_applied.or_else(|| NotApplied::by_rule(&rule.rule, &region));
        let input = match &current {
            None => loaded.photo.as_ref(),
            Some(Edited::Rgb(edited)) => edited,
            Some(Edited::Rgba(_)) => {
                unreachable!("a cut-out is the last rule (check_cutout_last)")
            }
        };
        let stage = Stage::preview("rules");
        current = Some(
            palette_rules::apply(input, &region, &rule.rule.for_image(idx), swatch.as_deref())
                .map_err(|source| ItemError::Rule {
                    rule_id: rule.rule_id.clone(),
                    source,
                })?,
        );
        stage.finish();
        outcomes.push(RuleOutput {
            rule_id: rule.rule_id.clone(),
            output_key: String::new(),
            applied: not_applied.is_none(),
            not_applied_reason: not_applied.map_or("", |n| n.as_str()).to_string(),
        });
    }
    let mut current = current.unwrap_or_else(|| Edited::Rgb((*loaded.photo).clone()));
    if let (Edited::Rgba(cut), Some(alpha)) = (&mut current, &loaded.transparency) {
        palette_rules::ops::remove::keep_source_transparency(cut, alpha);
    }
    let (width, height) = match &current {
        Edited::Rgb(i) => i.dimensions(),
        Edited::Rgba(i) => i.dimensions(),
    };
    let stage = Stage::preview("encode");
    let (image, content_type) = render::encode(&current, png, loaded.transparency.as_deref())?;
    stage.finish();
    Ok(PreviewEditResponse {
        image,
        content_type: content_type.to_string(),
        width,
        height,
        rules: outcomes,
    })
}
