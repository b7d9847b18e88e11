//! What a Runpod job reports: progress (counts) while it runs, the whole job when it ends.

use palette_proto::orchestrator::v1::{Item, ItemState, Job, JobState};
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
        "outputs": item.outputs.iter().map(|o| json!({"ruleId": o.rule_id, "outputKey": o.output_key})).collect::<Vec<_>>(),
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

/// The final `output`: the whole job, every item's state, outputs and error.
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
pub fn progress_json(job: &Job) -> Json {
    let running = job
        .items
        .iter()
        .filter(|i| i.state == ItemState::Running as i32)
        .count();
    json!({
        "jobId": job.job_id,
        "state": job_state_name(job.state),
        "imageCount": job.items.len(),
        "completed": job.completed,
        "failed": job.failed,
        "cancelled": job.cancelled,
        "running": running,
    })
}
