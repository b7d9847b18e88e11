//! The end of a task whose item ended here (or was found recorded with its callback pending, and called back again):
//! acknowledged only once the job store holds the item's terminal state, and called back only once it holds it.
//!
//! NATS unreachable for longer than NATS_STORE_PATIENCE_SEC while the item's report was written leaves the item
//! without its record (not called back yet: `Reporter::settle_now`), or with its callback settled and the record
//! still saying pending; either is kept in `JobHandle::unrecorded`. The holder keeps the task, its lease renewed,
//! asks the store until it answers (`patiently`), and then writes the record itself. If this end stands, its
//! callback goes out now; if another holder's does (this replica was cut off from NATS past its lease, and the next
//! holder ended the item otherwise: a cancel this one never saw), that one was called back and this one never is.
//! Before, the callback went out without the record, and the receiver could be told two ends of one item; earlier
//! still, the task went back (its next holder ran the item again) or, with only the settled record missing, was
//! acknowledged (every replica showed the callback pending for ever).

use std::sync::Arc;

use palette_proto::orchestrator::v1::{CallbackState, Item};

use super::patience::{Unread, patiently};
use super::{Cluster, ItemTask, TaskEnd};
use crate::jobs::job::{JobHandle, is_older_report};
use crate::jobs::report::{ReportKind, Reporter};
use crate::jobs::store::{JobStore, RunKey, StoreError, Written};

/// How the task of an item that ended here ends. `last`: the consumer's last delivery of the task (nothing is put
/// back then: JetStream never delivers it again). `stopping`: this replica drains, and the task may go back.
pub(super) async fn release(
    cluster: &Cluster,
    reporter: &Reporter,
    task: &ItemTask,
    job: &Arc<JobHandle>,
    last: bool,
    stopping: impl Fn() -> bool,
) -> TaskEnd {
    let key = task.job();
    let idx = task.idx;
    let run = crate::jobs::store::run_of(job);
    let mut counted = false;
    // Again after a callback sent below, whose settled record may have given up in turn.
    while let Some(mine) = job.unrecorded.get(idx) {
        let stands = match patiently(task, &stopping, || write(cluster, &run, &mine)).await {
            Ok(Some(stands)) => stands,
            // The run is gone (forgotten on another replica once its items ended there) or the job id runs again
            // under the same spec: this end belongs to nobody now, and its record would be taken by the next run.
            Ok(None) => {
                job.unrecorded.written(&mine);
                tracing::warn!(job_id = %task.job_id, idx, "item ended here while the job store was unreachable, but its job was forgotten (or submitted again) meanwhile; this end is dropped");
                return TaskEnd::Done;
            }
            // Recorded, if unreadable here (the replica that wrote it reported it): this end is not called back.
            Err(Unread::Corrupt(_)) => {
                job.unrecorded.written(&mine);
                job.record_callback(
                    idx,
                    false,
                    0,
                    Some("not sent from this replica: the job store holds a record of the item it cannot read".into()),
                );
                return TaskEnd::Done;
            }
            // Its next holder finds the record missing (runs the item again) or pending (calls it back again).
            Err(Unread::Stopping) => return TaskEnd::Again(cluster.settings().progress_every()),
        };
        job.unrecorded.written(&mine);
        if stands == mine && !counted {
            counted = true;
            metrics::counter!("orchestrator_items_recorded_late_total").increment(1);
            tracing::info!(job_id = %task.job_id, idx, "item recorded late, once the job store answered again");
        }
        if let Some(end) = call_back_recorded(cluster, reporter, task, job, stands, last).await {
            return end;
        }
    }
    match patiently(task, &stopping, || cluster.store().item(&key, idx)).await {
        // Recorded by another holder of the task (this replica's lease ran out, and its own end was refused) whose
        // callback is not settled yet: that holder may die before it is, and acknowledged here, nobody would resend
        // it. Put back: its next holder finds it settled, or resends it (same webhook-id); on the last delivery,
        // resent from here.
        Ok(Some(recorded)) if recorded.callback_state == CallbackState::Pending as i32 => {
            if !last {
                tracing::info!(job_id = %task.job_id, idx, "item recorded by another holder, its callback not settled yet: put back to be looked at again");
                return TaskEnd::Again(cluster.settings().progress_every());
            }
            call_back_recorded(cluster, reporter, task, job, recorded, last)
                .await
                .unwrap_or(TaskEnd::Done)
        }
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

/// What the holder of a task does with its item as the job store records it ended (by this replica or another):
/// taken into this replica's view, and, while its callback is not settled, called back (same webhook-id: receivers
/// drop a duplicate). None once called back: its task is then released (`release`: its settled record may have
/// given up). `last`: see `release`.
pub(super) async fn call_back_recorded(
    cluster: &Cluster,
    reporter: &Reporter,
    task: &ItemTask,
    job: &Arc<JobHandle>,
    recorded: Item,
    last: bool,
) -> Option<TaskEnd> {
    let idx = task.idx;
    job.apply_record(idx, recorded.clone());
    if recorded.callback_state != CallbackState::Pending as i32 {
        return Some(TaskEnd::Done);
    }
    let resend = if reporter.callbacks_on() {
        tracing::info!(job_id = %task.job_id, idx, "item recorded, callback not settled: sending it");
        recorded
    } else if !last {
        // Callbacks are off here (WORKERS_API_URL unset), not necessarily on every replica (a rolling change of it):
        // put back for one that sends them. Acknowledged, it stayed PENDING on every replica.
        tracing::info!(job_id = %task.job_id, idx, "item recorded, callback not settled, callbacks off here: put back for another replica");
        return Some(TaskEnd::Again(cluster.settings().progress_every()));
    } else {
        // No replica that took it sends callbacks: none will be sent, so the record says so (as `resume` settles
        // such an item on one orchestrator) rather than PENDING for ever.
        let settled = not_configured(recorded);
        job.apply_record(idx, settled.clone());
        settled
    };
    reporter.settle_now(job, resend, ReportKind::Resend).await;
    None
}

/// `item` with its callback settled as never to be sent (WORKERS_API_URL unset).
fn not_configured(item: Item) -> Item {
    Item {
        callback_state: CallbackState::NotConfigured as i32,
        ..item
    }
}

/// Writes `mine`, the item as it ended here, unless the store holds another end of it (another holder's, whose
/// lease began after this replica's ran out while NATS was down): this replica's own write that gave up may have
/// been committed all the same (the same record: stored; its first record, callback pending: the settled one
/// replaces it). The item as the store holds it once written: `mine`, or the end that stands; None when the job's
/// record is no longer this run's (forgotten meanwhile, or a new run under the same key: item keys carry no seq).
async fn write(cluster: &Cluster, run: &RunKey, mine: &Item) -> Result<Option<Item>, StoreError> {
    let store = cluster.store();
    let key = &run.job;
    let this_run = match store.job(&key.user_id, &key.job_id).await {
        Ok(record) => {
            record.is_some_and(|record| record.spec_hash == key.spec_hash && record.seq == run.seq)
        }
        // The job's record does not decode here (a newer release's): whose run it is cannot be told, and dropping
        // the end left the item unrecorded for ever; written as before the check.
        Err(StoreError::Corrupt { .. }) => true,
        Err(e) => return Err(e),
    };
    if !this_run {
        return Ok(None);
    }
    let recorded = match store.put_first_item(key, mine, true).await? {
        Written::Stored => return Ok(Some(mine.clone())),
        Written::Conflict(recorded) if is_older_report(&recorded, mine) => {
            match store.put_item(key, mine).await? {
                Written::Stored => return Ok(Some(mine.clone())),
                Written::Conflict(recorded) => recorded,
                Written::Forgotten => return Ok(None),
            }
        }
        Written::Conflict(recorded) => recorded,
        // Forgotten since the check above.
        Written::Forgotten => return Ok(None),
    };
    if recorded.state != mine.state {
        tracing::warn!(job_id = %key.job_id, idx = mine.idx, recorded = recorded.state, "item recorded meanwhile with another end; that one stands");
    }
    Ok(Some(*recorded))
}
