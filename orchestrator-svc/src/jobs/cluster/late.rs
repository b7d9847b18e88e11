//! The end of a task whose item ended here (or was found recorded with its callback pending, and called back again):
//! acknowledged only once the job store holds the item's terminal state.
//!
//! NATS unreachable for longer than NATS_STORE_PATIENCE_SEC while the item's report was written leaves the item
//! reported (its callback sent or given up) without its record, or with its callback still pending there
//! (`JobHandle::unrecorded`). The holder keeps the task, its lease renewed, asks the store until it answers
//! (`patiently`), and then writes the record itself. Before, the task went back (its next holder found no record
//! and ran the item again: a second run, a second callback), or, with only the settled record missing, was
//! acknowledged (every replica showed the callback pending for ever, and only a job store's resume could resend it).

use palette_proto::orchestrator::v1::Item;

use super::patience::{Unread, patiently};
use super::{Cluster, ItemTask, TaskEnd};
use crate::jobs::job::{JobHandle, is_older_report};
use crate::jobs::store::{JobStore, RecordKey, StoreError, Written};

/// How the task of an item that ended here ends. `last`: the consumer's last delivery of the task (nothing is put
/// back then: JetStream never delivers it again). `stopping`: this replica drains, and the task may go back.
pub(super) async fn release(
    cluster: &Cluster,
    task: &ItemTask,
    job: &JobHandle,
    last: bool,
    stopping: impl Fn() -> bool,
) -> TaskEnd {
    let key = task.job();
    let idx = task.idx;
    if let Some(mine) = job.unrecorded.get(idx) {
        return match patiently(task, &stopping, || write(cluster, &key, &mine)).await {
            Ok(()) => {
                job.unrecorded.written(&mine);
                metrics::counter!("orchestrator_items_recorded_late_total").increment(1);
                tracing::info!(job_id = %task.job_id, idx, "item recorded late, once the job store answered again");
                TaskEnd::Done
            }
            // Recorded, if unreadable here.
            Err(Unread::Corrupt(_)) => TaskEnd::Done,
            // Its next holder finds the record missing (runs the item again) or pending (calls it back again).
            Err(Unread::Stopping) => TaskEnd::Again(cluster.settings().progress_every()),
        };
    }
    match patiently(task, &stopping, || cluster.store().item(&key, idx)).await {
        // Unreadable here, but recorded all the same.
        Ok(Some(_)) | Err(Unread::Corrupt(_)) => TaskEnd::Done,
        // Not recorded: a task of an item that runs or ended here under another of its tasks waited for that one
        // (`held`), and a report that gave up is written above; what is left is a record gone since, or a path not
        // foreseen. Put back: its next holder finds the record, or no record and ends or runs the item again. On
        // the last delivery there is no next holder, and a NAK left the task in the stream for ever, delivered to
        // nobody.
        Ok(None) if last => {
            tracing::error!(job_id = %task.job_id, idx, "item ended here on its last delivery, but not recorded in the job store; its task is acknowledged");
            TaskEnd::Done
        }
        Ok(None) | Err(Unread::Stopping) => TaskEnd::Again(cluster.settings().progress_every()),
    }
}

/// Writes `mine`, the item as it ended here, unless the store holds another end of it (another holder's, whose
/// lease began after this replica's ran out while NATS was down): this replica's own write that gave up may have
/// been committed all the same (the same record: stored; its first record, callback pending: the settled one
/// replaces it).
async fn write(cluster: &Cluster, key: &RecordKey, mine: &Item) -> Result<(), StoreError> {
    let store = cluster.store();
    let recorded = match store.put_first_item(key, mine, true).await? {
        Written::Stored => return Ok(()),
        Written::Conflict(recorded) if is_older_report(&recorded, mine) => {
            match store.put_item(key, mine).await? {
                Written::Stored => return Ok(()),
                Written::Conflict(recorded) => recorded,
            }
        }
        Written::Conflict(recorded) => recorded,
    };
    tracing::warn!(job_id = %key.job_id, idx = mine.idx, recorded = recorded.state, "item recorded meanwhile with another end; that one stands");
    Ok(())
}
