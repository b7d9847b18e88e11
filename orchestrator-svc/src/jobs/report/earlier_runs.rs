//! Durable jobs (ADAPTER=queue_pull): items an earlier run of the job ended and recorded, whose end stands over
//! anything this run would report for them.

use std::sync::Arc;

use std::time::Duration;

use futures::StreamExt;
use palette_proto::orchestrator::v1::{CallbackState, Item};

use super::{ReportKind, Reporter, durable};
use crate::jobs::job::JobHandle;

impl Reporter {
    /// Durable jobs: an item an earlier run recorded, taken as it ended (`JobHandle::restore_item`) and counted
    /// written; a record whose callback was still pending (that run died while sending it) has it sent again, same
    /// webhook-id, and is counted once recorded settled. False when the item was no longer open here.
    pub fn restore_durable(&self, job: &Arc<JobHandle>, idx: u32, recorded: Item) -> bool {
        let (recorded, pending) = self.as_sendable(recorded);
        if !job.restore_item(idx, recorded) {
            return false;
        }
        match job.item(idx) {
            Some(item) if pending && self.callbacks_on() => {
                tracing::info!(
                    idx,
                    "item recorded by an earlier run with its callback pending: sending it again"
                );
                self.settle_all(job, vec![item]);
            }
            _ => job.durable_written.one_more(),
        }
        true
    }

    /// Durable jobs: an item ended together with others (a cancel) may not have had its record read yet (items read
    /// it only when they start): an earlier run's end, recorded, stands over this one, and is taken into the view
    /// (its callback sent again if it was pending) instead of being overwritten and called back otherwise (a
    /// CANCELLED after the COMPLETED that run told).
    pub(super) async fn settle_unless_recorded(&self, job: &Arc<JobHandle>, item: Item) {
        let idx = item.idx;
        // A drain does not wait for a read that a storage outage holds up: reported as before the read existed.
        let read = durable::read_patiently(&self.store, &job.plan, idx);
        let recorded = tokio::select! {
            recorded = read => recorded,
            () = self.stopping.cancelled() => None,
        };
        let Some(recorded) = recorded else {
            return self.settle_now(job, item, ReportKind::First).await;
        };
        tracing::info!(job_id = %job.plan.job_id, idx, "item ended by an earlier run of the job: that end stands");
        super::count_ended(job, None);
        self.take_recorded(job, idx, recorded);
    }

    /// Durable jobs: item `idx`, which ended here, was recorded by another run first: that end replaces this one in
    /// the view, and its callback is sent (again, same webhook-id) if it was pending; otherwise it counts written.
    pub(super) fn take_recorded(&self, job: &Arc<JobHandle>, idx: u32, recorded: Item) {
        let (recorded, pending) = self.as_sendable(recorded);
        job.apply_record(idx, recorded);
        // What the view holds now: the record, or (when it kept its own) an end of the same state already settled.
        match job.item(idx) {
            Some(item)
                if pending
                    && self.callbacks_on()
                    && item.callback_state == CallbackState::Pending as i32 =>
            {
                self.settle_all(job, vec![item])
            }
            _ => job.durable_written.one_more(),
        }
    }

    /// Durable jobs: item `idx`, which ended here, has a record this process cannot use (`durable::Claim::Unread`):
    /// its writer (a newer release) or the job's next delivery tells its end, not this process. Its callback is
    /// settled here as not sent, and it counts written, so the job can be put back or acknowledged.
    pub(super) fn leave_to_its_writer(&self, job: &Arc<JobHandle>, idx: u32) {
        tracing::warn!(job_id = %job.plan.job_id, idx, "item has a record this process cannot read (a newer release's, or storage down at shutdown): its end is left to it, nothing sent from here");
        if self.callbacks_on() {
            job.record_callback(
                idx,
                false,
                0,
                Some("not sent: the item has a record this process cannot read; its writer or the job's next delivery tells its end".into()),
            );
        }
        job.durable_written.one_more();
    }

    /// Durable jobs, at a CancelJob: the items not started here (PENDING) may have been ended by an earlier run,
    /// and read their record only when they start. Read now, before the cancel ends them, so the cancel's answer and
    /// WatchJob show a recorded end as it stands rather than CANCELLED first (`settle_unless_recorded` would correct
    /// the view, and the callbacks, a moment later). At most READ_TOGETHER at once and for at most `within`: the
    /// items left unread then are checked the later way.
    pub async fn take_recorded_before_cancel(&self, job: &Arc<JobHandle>, within: Duration) {
        const READ_TOGETHER: usize = 16;
        let pending = job.pending_items();
        let reads =
            futures::stream::iter(pending).for_each_concurrent(READ_TOGETHER, |idx| async move {
                if let Some(recorded) = durable::read(&self.store, &job.plan, idx).await {
                    self.restore_durable(job, idx, recorded);
                }
            });
        if tokio::time::timeout(within, reads).await.is_err() {
            tracing::info!(job_id = %job.plan.job_id, "cancel: not every unstarted item's record was read in time; the rest are checked as they are cancelled");
        }
    }

    /// A recorded item as this process can settle it, and whether its callback was pending: with callbacks turned
    /// off since (WORKERS_API_URL unset), NOT_CONFIGURED, as none will be sent (left PENDING, the job never settled).
    fn as_sendable(&self, recorded: Item) -> (Item, bool) {
        let pending = recorded.callback_state == CallbackState::Pending as i32;
        if pending && !self.callbacks_on() {
            let settled = Item {
                callback_state: CallbackState::NotConfigured as i32,
                ..recorded
            };
            return (settled, true);
        }
        (recorded, pending)
    }
}
