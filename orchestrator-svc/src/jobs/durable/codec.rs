//! The stored form of a terminal item: the JSON of `jobs-state/` records (and of the job stores' item records).

use palette_proto::orchestrator::v1::{CallbackState, Item, ItemState, MaskKey, RuleOutput};
use serde::{Deserialize, Serialize};

/// The stored form of a terminal item.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    idx: u32,
    state: String,
    #[serde(default)]
    input_key: String,
    #[serde(default)]
    output_key: String,
    #[serde(default)]
    outputs: Vec<OutputRecord>,
    #[serde(default)]
    preview_key: String,
    #[serde(default)]
    masks: Vec<MaskRecord>,
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_code: String,
    #[serde(default)]
    masks_reused: bool,
    #[serde(default)]
    callback_state: String,
    #[serde(default)]
    callback_attempts: u32,
    #[serde(default)]
    callback_error: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OutputRecord {
    rule_id: String,
    output_key: String,
    // Records written before these fields existed did not say: they read as applied, as they were reported then.
    #[serde(default = "applied_by_default")]
    applied: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    not_applied_reason: String,
}

fn applied_by_default() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MaskRecord {
    concept: String,
    instance: u32,
    key: String,
    score: f32,
    /// The crop's placement (see `MaskKey`); absent, so zero, in records of full-frame masks from before crops.
    #[serde(default)]
    x: u32,
    #[serde(default)]
    y: u32,
    #[serde(default)]
    width: u32,
    #[serde(default)]
    height: u32,
    #[serde(default)]
    image_width: u32,
    #[serde(default)]
    image_height: u32,
    #[serde(default)]
    grid_width: u32,
    #[serde(default)]
    grid_height: u32,
}

/// The record of a terminal item, as JSON.
pub fn encode(item: &Item) -> Vec<u8> {
    let record = Record {
        idx: item.idx,
        state: ItemState::try_from(item.state)
            .unwrap_or(ItemState::Unspecified)
            .as_str_name()
            .to_string(),
        input_key: item.input_key.clone(),
        output_key: item.output_key.clone(),
        outputs: item
            .outputs
            .iter()
            .map(|o| OutputRecord {
                rule_id: o.rule_id.clone(),
                output_key: o.output_key.clone(),
                applied: o.applied,
                not_applied_reason: o.not_applied_reason.clone(),
            })
            .collect(),
        preview_key: item.preview_key.clone(),
        masks: item
            .masks
            .iter()
            .map(|m| MaskRecord {
                concept: m.concept.clone(),
                instance: m.instance,
                key: m.key.clone(),
                score: m.score,
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
        error: item.error.clone(),
        error_code: item.error_code.clone(),
        masks_reused: item.masks_reused,
        callback_state: CallbackState::try_from(item.callback_state)
            .unwrap_or(CallbackState::Unspecified)
            .as_str_name()
            .to_string(),
        callback_attempts: item.callback_attempts,
        callback_error: item.callback_error.clone(),
    };
    serde_json::to_vec(&record).unwrap_or_default()
}

/// A record back as the item; None when it is not a record of a terminal item.
pub fn decode(bytes: &[u8]) -> Option<Item> {
    let record: Record = serde_json::from_slice(bytes).ok()?;
    let state = ItemState::from_str_name(&record.state)? as i32;
    if !crate::jobs::job::is_terminal(state) {
        return None;
    }
    Some(Item {
        idx: record.idx,
        state,
        input_key: record.input_key,
        output_key: record.output_key,
        outputs: record
            .outputs
            .into_iter()
            .map(|o| RuleOutput {
                rule_id: o.rule_id,
                output_key: o.output_key,
                applied: o.applied,
                not_applied_reason: o.not_applied_reason,
            })
            .collect(),
        preview_key: record.preview_key,
        masks: record
            .masks
            .into_iter()
            .map(|m| MaskKey {
                concept: m.concept,
                instance: m.instance,
                key: m.key,
                score: m.score,
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
        error: record.error,
        error_code: record.error_code,
        callback_state: CallbackState::from_str_name(&record.callback_state)
            .unwrap_or(CallbackState::Delivered) as i32,
        callback_attempts: record.callback_attempts,
        callback_error: record.callback_error,
        masks_reused: record.masks_reused,
    })
}
