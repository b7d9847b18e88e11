//! Durable item records for jobs that may run more than once (ADAPTER=queue_pull: a queue message is redelivered
//! when the worker that held it died).
//!
//! When an item of such a job ends, it is written to `jobs-state/{userId}/{jobId}/{specHash}/{idx}.json`
//! (`keys::item_marker`: a job id reused with another spec finds no record of the first job's items) BEFORE its
//! callback is sent, callback pending, and again once the callback is settled. `specHash` is the hash of the
//! message's spec as it came (`message_hash`), so that a redelivery to a replica with other presets finds the records
//! too; records of releases before it were keyed by the effective spec's hash, which is read as well. A later run of
//! the same job reads the record before starting the item, for as long as storage does not answer
//! (`read_patiently`): a recorded item is taken as it ended and never run again; if its callback was still pending
//! (the earlier run died while sending it), that callback is sent again, same webhook-id
//! (`Reporter::restore_durable`). Outputs need no
//! record: they are written under fixed keys, so a rerun overwrites them with the same objects.
//!
//! Before, the record was written only after the callback: a worker dying in between (a callback retried for
//! minutes, a SIGKILL) left the item unrecorded, and the rerun could end it otherwise (FAILED after COMPLETED): two
//! ends of one item. The first record of an item is written only where none exists (`claim`: S3 `If-None-Match`),
//! so two runs of one job at once (a worker cut off from NATS past its lease while the redelivery runs the job
//! elsewhere) cannot both record, and call back, their own end: the second takes the first's. What is left: a record
//! that cannot be written before the callback even after a few seconds' waits (storage down as the item ends),
//! followed by the worker's death before the settled write; and an S3 service that ignores `If-None-Match`
//! (overwrites, last writer wins, as before).

use std::time::Duration;

use bytes::Bytes;
use palette_proto::orchestrator::v1::Item;

mod claim;
mod codec;

pub use claim::{Claim, claim, claim_key};
pub use codec::{decode, encode};

use super::job::JobHandle;
use super::validate::JobPlan;
use crate::error::Report;
use crate::keys;
use crate::storage::{SharedStore, StorageError};

/// An item record is a few KB (mostly mask keys); anything far larger is not one of ours.
const MAX_RECORD_BYTES: u64 = 16 << 20;

/// The waits before reading (or writing) a record again after a storage error; the last one repeats while reading.
pub(crate) const AGAIN_AFTER: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(5),
];

/// While a record stays unreadable, one warning per this many waits (about a minute).
const WARN_EVERY: usize = 12;

/// The recorded item `idx` of the job, if an earlier run recorded it. A record that cannot be read (storage down)
/// counts as none.
pub async fn read(store: &SharedStore, plan: &JobPlan, idx: u32) -> Option<Item> {
    read_waiting(store, plan, idx, false).await
}

/// `read` for an item about to run (or to be given up), where a record missed is a second, maybe different, end of
/// the item: read again while storage fails (`Unavailable`), for as long as it does. Nothing can run while storage is
/// down anyway (the photos are there); a run then ended FAILED, after the COMPLETED callback an earlier run sent.
/// Callers select it against their job's cancel and the shutdown.
pub async fn read_patiently(store: &SharedStore, plan: &JobPlan, idx: u32) -> Option<Item> {
    read_waiting(store, plan, idx, true).await
}

/// The record; `patient`: read again while storage fails.
async fn read_waiting(
    store: &SharedStore,
    plan: &JobPlan,
    idx: u32,
    patient: bool,
) -> Option<Item> {
    let effective = super::job::spec_hash(&plan.effective_spec);
    let hashes = plan.message_hash.iter().chain(std::iter::once(&effective));
    for spec_hash in hashes {
        let key = keys::item_marker(&plan.user_id, &plan.job_id, spec_hash, idx);
        match read_at(store, &key, patient).await {
            Read::Missing => {}
            Read::Found(item) => return item.map(|item| *item),
            Read::Failed => return None,
        }
    }
    None
}

pub(super) enum Read {
    /// No record under this key.
    Missing,
    /// A record; None when this run cannot use it (undecodable: the item runs again). Boxed: an Item is ~0.5 KB.
    Found(Option<Box<Item>>),
    /// Storage failed (and `patient` was false): counted as none.
    Failed,
}

/// The record at `key`; `patient`: read again after each of `AGAIN_AFTER` (the last repeating) while storage fails
/// (`Unavailable`; a key or size error will not change).
pub(super) async fn read_at(store: &SharedStore, key: &str, patient: bool) -> Read {
    let mut failures = 0usize;
    loop {
        match store.get_at_most(key, MAX_RECORD_BYTES).await {
            Ok(bytes) => {
                let item = decode(&bytes);
                if item.is_none() {
                    tracing::warn!(%key, "unreadable item record; the item runs again");
                } else if failures > 0 {
                    tracing::info!(%key, failures, "item record read after storage errors");
                }
                return Read::Found(item.map(Box::new));
            }
            Err(StorageError::NotFound(_)) => return Read::Missing,
            Err(e) if patient && e.is_outage() => {
                let wait = AGAIN_AFTER[failures.min(AGAIN_AFTER.len() - 1)];
                if failures.is_multiple_of(WARN_EVERY) {
                    tracing::warn!(%key, error = %Report(&e), failures, wait_ms = wait.as_millis() as u64, "item record not readable; the item waits for it");
                }
                failures += 1;
                tokio::time::sleep(wait).await;
            }
            // A refusal (403: a policy without s3:ListBucket answers a missing key so) will not change: read as no
            // record under this key (the next key is still asked: an older release's).
            Err(e) if !e.is_outage() && matches!(e, StorageError::Unavailable { .. }) => {
                tracing::debug!(%key, error = %Report(&e), "item record lookup refused; taken as none");
                return Read::Missing;
            }
            Err(e @ StorageError::Unavailable { .. }) => {
                tracing::warn!(%key, error = %Report(&e), "item record not readable");
                return Read::Failed;
            }
            Err(e) => {
                tracing::warn!(%key, error = %Report(&e), "item record not readable; the item runs again");
                return Read::Found(None);
            }
        }
    }
}

/// The keys of item `idx`'s record, the one read first first: under the message's spec, and under the effective
/// spec's hash too, where a replica of an older release (a rolling upgrade) taking the redelivery looks.
pub(super) fn record_keys(job: &JobHandle, idx: u32) -> Vec<String> {
    job.plan
        .message_hash
        .iter()
        .chain(std::iter::once(&job.spec_hash))
        .map(|spec_hash| keys::item_marker(&job.plan.user_id, &job.plan.job_id, spec_hash, idx))
        .collect()
}

/// Records item `idx` of the job as it is now (terminal); whether every copy was written.
pub async fn write(store: &SharedStore, job: &JobHandle, idx: u32) -> bool {
    let Some(item) = job.item(idx) else {
        return true;
    };
    let mut written = true;
    for key in record_keys(job, idx) {
        written &= put(store, &key, &item).await;
    }
    written
}

/// Writes `item`'s record at `key`; whether it was written.
pub async fn put(store: &SharedStore, key: &str, item: &Item) -> bool {
    let body = Bytes::from(encode(item));
    match store.put(key, body, "application/json").await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(%key, error = %Report(&e), "item record not written; a rerun of the job would run the item again");
            false
        }
    }
}

/// The record at `key`, read for as long as storage is down (`StorageError::is_outage`): None when there is none
/// (or the store refuses to say: 403, as a policy without s3:ListBucket answers a missing key), Some(None) when one
/// exists that does not decode (a refused job's item: see `JobService::call_back_refused`).
pub async fn read_key_patiently(store: &SharedStore, key: &str) -> Option<Option<Item>> {
    match read_at(store, key, true).await {
        Read::Found(item) => Some(item.map(|item| *item)),
        Read::Missing | Read::Failed => None,
    }
}

#[cfg(test)]
mod tests;
