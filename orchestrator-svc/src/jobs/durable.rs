//! Durable item records for jobs that may run more than once (ADAPTER=queue_pull: a queue message is redelivered
//! when the worker that held it died).
//!
//! When an item of such a job ends, its callback is sent (if callbacks are on) and THEN the item is written to
//! `jobs-state/{userId}/{jobId}/{specHash}/{idx}.json` (`keys::item_marker`: a job id reused with another spec finds
//! no record of the first job's items). `specHash` is the hash of the message's spec as it came (`message_hash`),
//! so that a redelivery to a replica with other presets finds the records too; records of releases before it were
//! keyed by the effective spec's hash, which is read as well. A later run of the same job reads the record
//! before starting the item (again after a storage error, `read_patiently`): a recorded item is taken as it ended,
//! neither processed nor called back again. Outputs
//! need no record: they are written under fixed keys, so a rerun overwrites them with the same objects.
//!
//! The one window left: a worker dying between the callback's delivery and the record's write; the rerun then
//! sends that item's callback once more (callbacks carry a stable webhook id, so receivers can drop it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use palette_proto::orchestrator::v1::{CallbackState, Item, ItemState, MaskKey, RuleOutput};
use serde::{Deserialize, Serialize};

use super::job::JobHandle;
use super::validate::JobPlan;
use crate::error::Report;
use crate::keys;
use crate::storage::{SharedStore, StorageError};

/// An item record is a few KB (mostly mask keys); anything far larger is not one of ours.
const MAX_RECORD_BYTES: u64 = 16 << 20;

/// The waits before reading a record again after a storage error (`read_patiently`, before an item runs). An item
/// whose record cannot be read runs again; with storage still down, that run ends FAILED, and a caller an earlier
/// run told COMPLETED hears FAILED too. A blip (the backend's own retries spent) is waited out here; an outage
/// longer than these ~8 s still runs the item again.
const READ_AGAIN_AFTER: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(5),
];

/// The recorded item `idx` of the job, if an earlier run recorded it. A record that cannot be read (storage down)
/// counts as none: the item runs again, and outputs are overwritten with the same objects.
pub async fn read(store: &SharedStore, plan: &JobPlan, idx: u32) -> Option<Item> {
    read_waiting(store, plan, idx, &[]).await.0
}

/// `read`, reading a record again after a storage error (`READ_AGAIN_AFTER`): for an item about to run, where a
/// record missed is a second, maybe different, callback. `failing` is the job's: once one item's read spent its
/// waits, the job's other items read once (as `read`) until a read succeeds, so an outage does not hold every
/// item's permit through the waits in turn.
pub async fn read_patiently(
    store: &SharedStore,
    plan: &JobPlan,
    idx: u32,
    failing: &AtomicBool,
) -> Option<Item> {
    let waits: &[Duration] = if failing.load(Ordering::Relaxed) {
        &[]
    } else {
        &READ_AGAIN_AFTER
    };
    let (found, storage_failed) = read_waiting(store, plan, idx, waits).await;
    failing.store(storage_failed, Ordering::Relaxed);
    found
}

/// The record, and whether a read ended on a storage error.
async fn read_waiting(
    store: &SharedStore,
    plan: &JobPlan,
    idx: u32,
    waits: &[Duration],
) -> (Option<Item>, bool) {
    let effective = super::job::spec_hash(&plan.effective_spec);
    let hashes = plan.message_hash.iter().chain(std::iter::once(&effective));
    for spec_hash in hashes {
        let key = keys::item_marker(&plan.user_id, &plan.job_id, spec_hash, idx);
        match read_at(store, &key, waits).await {
            Read::Missing => {}
            Read::Found(item) => return (item.map(|item| *item), false),
            Read::Failed => return (None, true),
        }
    }
    (None, false)
}

enum Read {
    /// No record under this key.
    Missing,
    /// A record; None when this run cannot use it (undecodable: the item runs again). Boxed: an Item is ~0.5 KB.
    Found(Option<Box<Item>>),
    /// Storage kept failing through the waits: counted as none, the item runs again.
    Failed,
}

/// The record at `key`, read again after each of `waits` while storage fails (`Unavailable`; a key or size error
/// will not change).
async fn read_at(store: &SharedStore, key: &str, waits: &[Duration]) -> Read {
    let mut waits = waits.iter();
    loop {
        match store.get_at_most(key, MAX_RECORD_BYTES).await {
            Ok(bytes) => {
                let item = decode(&bytes);
                if item.is_none() {
                    tracing::warn!(%key, "unreadable item record; the item runs again");
                }
                return Read::Found(item.map(Box::new));
            }
            Err(StorageError::NotFound(_)) => return Read::Missing,
            Err(e @ StorageError::Unavailable { .. }) => match waits.next() {
                Some(&wait) => {
                    tracing::warn!(%key, error = %Report(&e), wait_ms = wait.as_millis() as u64, "item record not readable; reading it again");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    tracing::warn!(%key, error = %Report(&e), "item record not readable; the item runs again");
                    return Read::Failed;
                }
            },
            Err(e) => {
                tracing::warn!(%key, error = %Report(&e), "item record not readable; the item runs again");
                return Read::Found(None);
            }
        }
    }
}

/// Records item `idx` of the job as it is now (terminal, callback settled).
pub async fn write(store: &SharedStore, job: &JobHandle, idx: u32) {
    let Some(item) = job.item(idx) else {
        return;
    };
    // Under the message's spec, and under the effective spec's hash too, where a replica of an older release (a
    // rolling upgrade) taking the redelivery looks.
    let body = Bytes::from(encode(&item));
    let hashes = job
        .plan
        .message_hash
        .iter()
        .chain(std::iter::once(&job.spec_hash));
    for spec_hash in hashes {
        let key = keys::item_marker(&job.plan.user_id, &job.plan.job_id, spec_hash, idx);
        if let Err(e) = store.put(&key, body.clone(), "application/json").await {
            tracing::warn!(%key, error = %Report(&e), "item record not written; a rerun of the job would run the item again");
        }
    }
}

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
    if !super::job::is_terminal(state) {
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

#[cfg(test)]
mod tests;
