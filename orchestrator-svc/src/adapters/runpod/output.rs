//! What a Runpod job reports: progress (counts) while it runs, the whole job when it ends.

use palette_proto::orchestrator::v1::{Item, ItemState, Job, JobState};

use crate::jobs::job::Progress;
use serde_json::{Value as Json, json};

fn job_state_name(state: i32) -> &'static str {
    match JobState::try_from(state) {
        Ok(JobState::Queued) => "QUEUED",
        Ok(JobState::Running) => "RUNNING",
        Ok(JobState::Done) => "DONE",
        Ok(JobState::Cancelled) => "CANCELLED",
        _ => "UNSPECIFIED",
    }
}

fn item_state_name(state: i32) -> &'static str {
    match ItemState::try_from(state) {
        Ok(ItemState::Pending) => "PENDING",
        Ok(ItemState::Running) => "RUNNING",
        Ok(ItemState::Completed) => "COMPLETED",
        Ok(ItemState::Failed) => "FAILED",
        Ok(ItemState::Cancelled) => "CANCELLED",
        _ => "UNSPECIFIED",
    }
}

fn item_json(item: &Item) -> Json {
    json!({
        "idx": item.idx,
        "state": item_state_name(item.state),
        "inputKey": item.input_key,
        "outputKey": item.output_key,
        // Whether each rule edited the photo (an output is written either way), as the callbacks and GetJob say.
        "outputs": item.outputs.iter().map(|o| json!({
            "ruleId": o.rule_id, "outputKey": o.output_key, "applied": o.applied,
            "notAppliedReason": (!o.applied).then_some(o.not_applied_reason.as_str()),
        })).collect::<Vec<_>>(),
        "previewKey": item.preview_key,
        // What the item callbacks say of each mask: where it is non-zero on the photo and the stored layout, so a
        // caller can place it without reading the PNG.
        "masks": item.masks.iter().map(|m| json!({
            "concept": m.concept, "instance": m.instance, "key": m.key, "score": m.score,
            "x": m.x, "y": m.y, "width": m.width, "height": m.height,
            "imageWidth": m.image_width, "imageHeight": m.image_height,
            "gridWidth": m.grid_width, "gridHeight": m.grid_height,
        })).collect::<Vec<_>>(),
        "error": item.error,
        "errorCode": item.error_code,
        "masksReused": item.masks_reused,
    })
}

/// Largest result posted with every item's `masks[]`. Runpod refuses large job outputs (a 400 on the result post;
/// its clients cite 2 MB): a 500-photo job with 20+ instances each is several MB of masks, and the result would never
/// arrive. Past this the masks are left out (`masksOmitted: true`); the item callbacks and GetJob carry them.
pub const MAX_RESULT_BYTES: usize = 1 << 20;

/// The final `output`: the whole job, every item's state, outputs and error; without `masks[]` when larger than
/// `MAX_RESULT_BYTES`, and without `items[]` (`itemsOmitted: true`, counts kept) when still larger.
pub fn result_json(job: &Job) -> Json {
    let mut result = job_json(job);
    if serde_json::to_vec(&result).map_or(0, |b| b.len()) > MAX_RESULT_BYTES {
        if let Some(items) = result["items"].as_array_mut() {
            for item in items {
                if let Some(item) = item.as_object_mut() {
                    item.remove("masks");
                }
            }
        }
        result["masksOmitted"] = json!(true);
    }
    // Still too large (thousands of images with many rules each): the counts alone, which Runpod takes; every
    // item's end is in its callback and in GetJob. Retried as it was, a refused result never arrived, and the Runpod
    // job stayed IN_PROGRESS until Runpod's own timeout.
    if serde_json::to_vec(&result).map_or(0, |b| b.len()) > MAX_RESULT_BYTES {
        result["items"] = json!([]);
        result["itemsOmitted"] = json!(true);
    }
    result
}

/// The whole job, every item's state, outputs, masks and error.
pub fn job_json(job: &Job) -> Json {
    json!({
        "userId": job.user_id,
        "jobId": job.job_id,
        "state": job_state_name(job.state),
        "imageCount": job.items.len(),
        "completed": job.completed,
        "failed": job.failed,
        "cancelled": job.cancelled,
        "items": job.items.iter().map(item_json).collect::<Vec<_>>(),
    })
}

/// A progress `output`: counts only (a job may have hundreds of items).
pub fn progress_json(job_id: &str, job: &Progress) -> Json {
    json!({
        "jobId": job_id,
        "state": job_state_name(job.state),
        "imageCount": job.items,
        "completed": job.completed,
        "failed": job.failed,
        "cancelled": job.cancelled,
        "running": job.running,
    })
}

#[cfg(test)]
mod tests {
    use palette_proto::orchestrator::v1::{MaskKey, RuleOutput};

    use super::*;

    fn job(items: u32, masks: u32) -> Job {
        Job {
            job_id: "j".into(),
            state: JobState::Done as i32,
            items: (0..items)
                .map(|idx| Item {
                    idx,
                    state: ItemState::Completed as i32,
                    outputs: vec![RuleOutput {
                        rule_id: "paint".into(),
                        output_key: format!("outputs/u/j/paint/{idx}.jpg"),
                        applied: idx != 0,
                        not_applied_reason: if idx == 0 {
                            "concept_not_found".into()
                        } else {
                            String::new()
                        },
                    }],
                    masks: (0..masks)
                        .map(|instance| MaskKey {
                            concept: "wall".into(),
                            instance,
                            key: format!("masks/u/j/wall/{idx}_{instance}.png"),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn outputs_say_whether_their_rule_applied() {
        let result = result_json(&job(2, 1));
        let outputs = |i: usize| result["items"][i]["outputs"][0].clone();
        assert_eq!(outputs(0)["applied"], json!(false));
        assert_eq!(outputs(0)["notAppliedReason"], json!("concept_not_found"));
        assert_eq!(outputs(1)["applied"], json!(true));
        assert_eq!(outputs(1)["notAppliedReason"], Json::Null);
        assert!(result.get("masksOmitted").is_none());
        assert_eq!(result["items"][0]["masks"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_result_still_too_large_without_masks_keeps_the_counts_only() {
        let mut big = job(2_000, 0);
        for item in &mut big.items {
            item.outputs = (0..16)
                .map(|r| RuleOutput {
                    rule_id: format!("rule-{r}"),
                    output_key: format!("outputs/u/j/rule-{r}/{}.jpg", item.idx),
                    applied: true,
                    not_applied_reason: String::new(),
                })
                .collect();
        }
        big.completed = 2_000;
        let result = result_json(&big);
        let bytes = serde_json::to_vec(&result).unwrap().len();
        assert!(bytes <= MAX_RESULT_BYTES, "{bytes}");
        assert_eq!(result["itemsOmitted"], json!(true));
        assert_eq!(result["items"], json!([]));
        assert_eq!(result["completed"], json!(2_000));
        assert_eq!(result["imageCount"], json!(2_000));
    }

    #[test]
    fn a_result_too_large_for_runpod_leaves_the_masks_out() {
        let result = result_json(&job(500, 40));
        let bytes = serde_json::to_vec(&result).unwrap().len();
        assert!(bytes <= MAX_RESULT_BYTES, "{bytes}");
        assert_eq!(result["masksOmitted"], json!(true));
        assert!(result["items"][499].get("masks").is_none());
        assert_eq!(result["items"][499]["outputs"][0]["applied"], json!(true));
        assert!(result.get("itemsOmitted").is_none());
    }
}
