//! What follows an item's end: its metrics, its one callback, and its records: in the job store (written before the
//! callback, and again once it is settled: see docs/architecture.md, "Job state") and, for ADAPTER=queue_pull jobs,
//! in object storage (written only once the callback is settled).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use palette_proto::orchestrator::v1::{Item, ItemState};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::durable;
use super::job::{Ended, JobHandle};
use super::store::{self, SharedJobStore, Written};
use crate::callback::{CallbackJob, CallbackSender};
use crate::error::Report;
use crate::storage::SharedStore;
use crate::tasks::spawn_tracked;

/// Reports of items that ended together in flight at once (`Reporter::items_ended`): enough to keep every callback
/// slot (CALLBACK_CONCURRENCY, 16 by default) busy and to give the local store's group commit large groups (a
/// 20,000-image cancel, debug build: 9.0 s with 64, 7.8 s with 256; the memory the same).
const ENDED_TOGETHER: usize = 256;

/// Reports items that became terminal. Callback deliveries and record writes run as tasks of the pipeline's
/// tracker, so shutdown waits for them.
#[derive(Debug, Clone)]
pub struct Reporter {
    store: SharedStore,
    callbacks: Option<Arc<CallbackSender>>,
    tasks: TaskTracker,
    job_store: Option<SharedJobStore>,
    /// How long an item record is retried while the job store is unreachable (zero: written once).
    store_patience: Duration,
    /// The pipeline's: a drain does not wait for a durable record read a storage outage holds up.
    stopping: CancellationToken,
}

impl Reporter {
    pub(super) fn new(
        store: SharedStore,
        callbacks: Option<Arc<CallbackSender>>,
        tasks: TaskTracker,
        job_store: Option<SharedJobStore>,
    ) -> Self {
        Reporter {
            store,
            callbacks,
            tasks,
            job_store,
            store_patience: Duration::ZERO,
            stopping: CancellationToken::new(),
        }
    }

    /// The pipeline's stop signal (see `stopping`).
    pub(super) fn with_stopping(mut self, stopping: CancellationToken) -> Self {
        self.stopping = stopping;
        self
    }

    /// Item records are retried this long while the job store is unreachable.
    pub(super) fn with_store_patience(mut self, patience: Duration) -> Self {
        self.store_patience = patience;
        self
    }

    pub fn job_store(&self) -> Option<&SharedJobStore> {
        self.job_store.as_ref()
    }

    /// The job store that keeps this job, if one does: ADAPTER=queue_pull jobs are kept by their queue instead.
    /// (Edits are kept like submitted jobs: their record names their source.)
    pub fn job_store_of(&self, job: &JobHandle) -> Option<&SharedJobStore> {
        self.job_store.as_ref().filter(|_| !job.plan.durable_items)
    }

    pub fn callbacks(&self) -> Option<&Arc<CallbackSender>> {
        self.callbacks.as_ref()
    }

    pub fn callbacks_on(&self) -> bool {
        self.callbacks.is_some()
    }

    /// Metrics and the one callback of an item that just became terminal.
    pub fn item_ended(&self, job: &Arc<JobHandle>, ended: Ended) {
        let Ended { item, settling } = ended;
        count_ended_here(job, &item);
        self.spawn_settle(job, item, ReportKind::First);
        // Released once the report holds its own (`spawn_settle` takes it before returning), or has nothing to do.
        drop(settling);
    }

    /// Like `item_ended`, done before it returns (JOB_STORE=nats: the item's task is acknowledged only after).
    /// `last_delivery`: the task's last delivery, so no other replica ends the item: should its record give up, it is
    /// called back all the same (withheld, a drain could end before the store answers, and nobody would call it back).
    pub async fn item_ended_now(&self, job: &Arc<JobHandle>, ended: Ended, last_delivery: bool) {
        let Ended { item, settling } = ended;
        count_ended_here(job, &item);
        self.settle(job, item, ReportKind::First, !last_delivery)
            .await;
        drop(settling);
    }

    /// `item_ended` for items that ended together (a cancel, a shutdown, a job given up): reported by one task, at
    /// most ENDED_TOGETHER at a time. A task each held every item's report in memory at once (a cancelled
    /// 10,000-image job: 10,000 tasks, about 4 KB each), when callbacks go out CALLBACK_CONCURRENCY at a time anyway.
    pub fn items_ended(&self, job: &Arc<JobHandle>, ended: Vec<Ended>) {
        let (items, settling): (Vec<Item>, Vec<_>) =
            ended.into_iter().map(|e| (e.item, e.settling)).unzip();
        for item in &items {
            count_ended_here(job, item);
        }
        self.spawn_settle_all(job, items, ReportKind::First);
        drop(settling);
    }

    /// What a resumed job does for its items recorded with their callbacks still pending: sends them again (same
    /// webhook-ids), like `items_ended`.
    pub fn settle_all(&self, job: &Arc<JobHandle>, items: Vec<Item>) {
        self.spawn_settle_all(job, items, ReportKind::Resend);
    }

    /// Whether an ended item of `job` has anything to report: a record to write or a callback to send.
    fn reports(&self, job: &JobHandle) -> bool {
        job.plan.durable_items || self.job_store_of(job).is_some() || self.callbacks.is_some()
    }

    fn spawn_settle_all(&self, job: &Arc<JobHandle>, items: Vec<Item>, report: ReportKind) {
        if items.is_empty() || !self.reports(job) {
            return;
        }
        let this = self.clone();
        let job = job.clone();
        // Taken now, held until the last item's report is written (see `spawn_settle`).
        let settling = job.settling();
        let held = job.hold_unsettled(items.iter().map(|item| item.idx).collect());
        spawn_tracked(&self.tasks, "items_report", async move {
            futures::stream::iter(items)
                .for_each_concurrent(ENDED_TOGETHER, |item| async {
                    // Only a cancel ends items that may not have read their record (a give-up read them all).
                    let unread = item.state == ItemState::Cancelled as i32;
                    if report == ReportKind::First && job.plan.durable_items && unread {
                        this.settle_unless_recorded(&job, item).await;
                    } else {
                        this.settle_now(&job, item, report).await;
                    }
                })
                .await;
            drop((settling, held));
        });
    }

    fn spawn_settle(&self, job: &Arc<JobHandle>, item: Item, report: ReportKind) {
        if !self.reports(job) {
            return;
        }
        let this = self.clone();
        let job = job.clone();
        // Taken now, not when the task first runs: retention must not forget the job in between, and a later run
        // of a durable job handed over here must not take the item for settled (`JobHandle::hold_unsettled`).
        let settling = job.settling();
        let held = job.hold_unsettled(vec![item.idx]);
        spawn_tracked(&self.tasks, "item_report", async move {
            this.settle_now(&job, item, report).await;
            drop((settling, held));
        });
    }

    /// Records the terminal item, sends its callback, records it settled. When the last of these writes gives up
    /// (the job store unreachable for the whole store patience), the item as the store should hold it is kept in
    /// `JobHandle::unrecorded`, for the holder of its task to write once the store answers (JOB_STORE=nats); when
    /// the first record of an item that just ended gives up, it is kept there before any callback, which the holder
    /// sends once it has written it.
    pub async fn settle_now(&self, job: &Arc<JobHandle>, item: Item, report: ReportKind) {
        self.settle(job, item, report, true).await;
    }

    /// `settle_now`; `withhold_unrecorded`: a first report whose record gives up is not called back (see there).
    async fn settle(
        &self,
        job: &Arc<JobHandle>,
        item: Item,
        report: ReportKind,
        withhold_unrecorded: bool,
    ) {
        // Until the last record below is written, retention keeps the job (and its records).
        let _settling = job.settling();
        let store = job.plan.durable_items.then(|| self.store.clone());
        let job_store = self.job_store_of(job).cloned();
        // The terminal state is committed before anyone is told: a crash before this line leaves no trace of it,
        // so the item runs again; after it, the item keeps this state and is only called back again.
        let mut unrecorded = None;
        if let Some(job_store) = &job_store {
            match keep(job_store, job, &item, report, self.store_patience).await {
                Kept::Stored => {}
                Kept::Conflict => return,
                // JOB_STORE=nats: not called back before the store holds this end. The item's task may be another
                // replica's by now (this one cut off from NATS past its lease), which ends the item there, maybe
                // otherwise (a cancel this one never saw): called back here as well, the receiver was told two ends of
                // one item. The task's holder writes it once NATS answers, and calls it back if this end stands
                // (`cluster::late`).
                Kept::Unwritten
                    if report == ReportKind::First
                        && withhold_unrecorded
                        && !self.store_patience.is_zero() =>
                {
                    job.unrecorded.keep(item);
                    return;
                }
                // Called back all the same, only the record late: a resend's first record exists already, on a task's
                // last delivery no other replica ends the item, and with JOB_STORE=local nobody but this process does.
                Kept::Unwritten => unrecorded = Some(item.clone()),
            }
        }
        // Durable jobs: recorded before anyone is told (callback pending), so a rerun after a crash sends this callback
        // again instead of running the item again, maybe to another end; recorded again below once settled. First
        // writer wins: another run of the job (a worker still at it after its lease passed on) that recorded the
        // item's end first has told, or tells, that end: it stands here too, and this one is dropped.
        let mut claimed = false;
        if let Some(store) = &store
            && report == ReportKind::First
        {
            match durable::claim(store, job, item.idx, &self.stopping).await {
                durable::Claim::Ours { written } => {
                    claimed = written;
                    count_ended(job, Some(&item));
                }
                durable::Claim::Theirs(recorded) => {
                    count_ended(job, None);
                    tracing::warn!(job_id = %job.plan.job_id, idx = item.idx, "item's end recorded first by another run of the job (two workers on one job): that end stands, this one is not called back");
                    return self.take_recorded(job, item.idx, *recorded);
                }
                durable::Claim::Unread => {
                    count_ended(job, None);
                    return self.leave_to_its_writer(job, item.idx);
                }
            }
        }
        if let Some(sender) = &self.callbacks {
            let about = CallbackJob {
                user_id: &job.plan.user_id,
                job_id: &job.plan.job_id,
                // A queue job's ids follow its message, as its item records do: a redelivery planned with other
                // presets resends a callback (the one window `durable` leaves) under the same webhook-id.
                spec_hash: job.plan.message_hash.as_deref().unwrap_or(&job.spec_hash),
            };
            let body = callback_body(about, &item);
            // Not sent once the receiver answered 410 Gone to another of this job's callbacks (this process's view;
            // a restart or another replica learns it from its own first attempt).
            let outcome = sender
                .deliver_unless_gone(about, &body, &job.callbacks_gone)
                .await;
            if !outcome.delivered {
                tracing::warn!(job_id = %job.plan.job_id, idx = item.idx, error = ?outcome.error, "callback not delivered");
            }
            // The settled record is the item as record_callback left it, read under the same lock: a snapshot taken
            // later could hold the bucket's echo of the first write (callback pending) and write that back.
            let settled =
                job.record_callback(item.idx, outcome.delivered, outcome.attempts, outcome.error);
            if let Some(job_store) = &job_store
                && let Some(settled) = settled
            {
                let kept = keep(
                    job_store,
                    job,
                    &settled,
                    ReportKind::Resend,
                    self.store_patience,
                )
                .await;
                unrecorded = matches!(kept, Kept::Unwritten).then_some(settled);
            }
        }
        // Durable jobs: recorded settled, so a rerun never sends it again (and only then counted written). With
        // callbacks off, the claim's record is the item as it stands.
        if let Some(store) = store {
            if !(claimed && self.callbacks.is_none()) {
                durable::write(&store, job, item.idx).await;
            }
            job.durable_written.one_more();
        }
        // Kept only where a task's holder writes it (JOB_STORE=nats, the one store given a patience): with
        // JOB_STORE=local nobody would, and a failing disk kept every ended item's copy until the job was forgotten.
        if let Some(item) = unrecorded
            && !self.store_patience.is_zero()
        {
            job.unrecorded.keep(item);
        }
    }
}

/// `count_ended` as an item ends here, except a durable job's: counted once its end is the one recorded (another
/// run's recorded end stands over it, and was counted where it happened).
fn count_ended_here(job: &JobHandle, item: &Item) {
    if !job.plan.durable_items {
        count_ended(job, Some(item));
    }
}

/// Counts the item's end (None: an end this process did not make) and the job's, the first time it is terminal.
fn count_ended(job: &JobHandle, item: Option<&Item>) {
    if let Some(item) = item {
        let state = ItemState::try_from(item.state)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN");
        metrics::counter!("orchestrator_items_total", "state" => state).increment(1);
    }
    if job.first_time_terminal() {
        metrics::counter!("orchestrator_jobs_finished_total").increment(1);
    }
}

/// Whether an item's record is its first report or one written before (a resend, a settled callback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// This process just ended the item: the record must not exist yet (`JobStore::put_first_item`), or another
    /// writer ended it first and reports it.
    First,
    /// The record exists (as written here or before a crash): rewritten with the same terminal state.
    Resend,
}

/// Pause between attempts to write an item record while the job store is unreachable.
const STORE_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// What `keep` did with an item record.
enum Kept {
    Stored,
    /// The store already holds another terminal state for the item: that one stands, this one is not called back.
    Conflict,
    /// The store did not answer within the patience.
    Unwritten,
}

/// Writes the terminal item to the job store. An unreachable store is tried again for `patience` (JOB_STORE=nats:
/// a NATS restart must not turn into an item run twice and called back twice).
async fn keep(
    job_store: &SharedJobStore,
    job: &JobHandle,
    item: &Item,
    report: ReportKind,
    patience: Duration,
) -> Kept {
    let key = store::key_of(job);
    let give_up = tokio::time::Instant::now() + patience;
    let key = &key;
    let write = |retried: bool| async move {
        match report {
            ReportKind::First => job_store.put_first_item(key, item, retried).await,
            ReportKind::Resend => job_store.put_item(key, item).await,
        }
    };
    let mut written = write(false).await;
    while written.is_err() && tokio::time::Instant::now() < give_up {
        tokio::time::sleep(STORE_RETRY_PAUSE).await;
        written = write(true).await;
    }
    match written {
        Ok(Written::Stored) => Kept::Stored,
        Ok(Written::Conflict(recorded)) => {
            tracing::warn!(job_id = %key.job_id, idx = item.idx, recorded = recorded.state, "item already recorded (by another replica, or in another terminal state); not reported again");
            Kept::Conflict
        }
        Ok(Written::Forgotten) => {
            tracing::warn!(job_id = %key.job_id, idx = item.idx, "job no longer recorded (forgotten once its items had ended and been called back): this later end of the item is not reported");
            Kept::Conflict
        }
        Err(e) => {
            metrics::counter!("orchestrator_job_store_errors_total").increment(1);
            tracing::warn!(job_id = %key.job_id, idx = item.idx, error = %Report(&e), "item not recorded in the job store");
            Kept::Unwritten
        }
    }
}

mod body;
mod earlier_runs;
#[cfg(test)]
mod tests;

pub use body::callback_body;
