//! The callback body of a terminal item: what the seed's contract sends per item.

use palette_proto::orchestrator::v1::{Item, ItemState};

use crate::callback::{CallbackBody, CallbackJob, MaskRef, OutputRef};

/// The callback body of a terminal item of `job`.
pub fn callback_body(job: CallbackJob<'_>, item: &Item) -> CallbackBody {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let status = match ItemState::try_from(item.state) {
        Ok(ItemState::Completed) => "completed",
        Ok(ItemState::Failed) => "failed",
        _ => "cancelled",
    };
    CallbackBody {
        user_id: job.user_id.to_string(),
        job_id: job.job_id.to_string(),
        idx: item.idx,
        status,
        output_key: non_empty(&item.output_key),
        preview_key: non_empty(&item.preview_key),
        error: non_empty(&item.error),
        error_code: non_empty(&item.error_code),
        outputs: item
            .outputs
            .iter()
            .map(|o| OutputRef {
                rule_id: o.rule_id.clone(),
                output_key: o.output_key.clone(),
                applied: o.applied,
                not_applied_reason: non_empty(&o.not_applied_reason),
            })
            .collect(),
        masks: item
            .masks
            .iter()
            .map(|m| MaskRef {
                concept: m.concept.clone(),
                instance: m.instance,
                key: m.key.clone(),
                x: m.x,
                y: m.y,
                width: m.width,
                height: m.height,
                image_width: m.image_width,
                image_height: m.image_height,
                grid_width: m.grid_width,
                grid_height: m.grid_height,
            })
            .collect(),
    }
}
