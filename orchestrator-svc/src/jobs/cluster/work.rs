//! Items handed out as work: every replica pulls item tasks from the shared consumer, one per free BATCH_CONCURRENCY
//! permit (so a replica holds no more tasks than it runs, and the pixel budget of `ItemRunner` still applies per
//! replica), runs the item and acknowledges the task once the item's terminal state is in the bucket. A task that
//! only ends its item (a cancelled job's, one recorded already) trades its permit for one of ENDING_SLOTS.
//!
//! The ack wait is the item's lease: in-progress acks renew it while the item (and its callback) runs. A replica that
//! dies stops renewing, and JetStream hands the task to another replica after the ack wait. The holder records its
//! claim (`run.*`) before it starts the item, so every replica shows the item RUNNING; the next holder overwrites a
//! dead one's claim, and the item's terminal record supersedes it. The task is released only once the bucket holds
//! the item's terminal state, and a task whose item is recorded already is not run again: its callback is resent
//! only if it was not settled (same webhook-id, so receivers drop the duplicate).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::patience::{RETRY_PAUSE, Unread, patiently};
use super::{Cluster, Fetched, ItemTask, TaskEnd, late, unrunnable};
use crate::error::Report;
use crate::jobs::give_up::TOO_MANY_DELIVERIES;
use crate::jobs::job::{ItemOutcome, JobHandle};
use crate::jobs::store::RunClaim;
use crate::jobs::{JobKey, JobService};
use crate::tasks::spawn_tracked;

/// How long one fetch waits for a task before asking again.
const FETCH_WAIT: Duration = Duration::from_secs(5);
/// A task whose job is not recorded: its submitter publishes the tasks before the record, so the job's tasks wait
/// this long, from its first such task (`orphans`), for the record before they are dropped (the submission failed,
/// and the client was told so, or got no answer).
const ORPHAN_AFTER: Duration = Duration::from_secs(60);
/// And each task at least this long: a job submitted again under the same ids just after its orphans were dropped
/// is recorded within milliseconds of its tasks.
const RECORD_GRACE: Duration = Duration::from_secs(2);
/// How often a task whose job is not recorded yet looks again.
const ORPHAN_POLL: Duration = Duration::from_millis(200);
/// The same, for a job this replica knows (it took the SubmitJob, and is writing the record).
const RECORD_POLL: Duration = Duration::from_millis(20);
/// Tasks a replica may hold at once, besides BATCH_CONCURRENCY, that end their item without running it: a cancelled
/// job's items (recorded, called back) and items recorded already (a callback resent). Each is a few job-store round
/// trips and a callback, no image work, so it gives its BATCH_CONCURRENCY permit back for one of these: a cancelled
/// 10,000-image job was called back BATCH_CONCURRENCY items at a time per replica. Above CALLBACK_CONCURRENCY's
/// default (16), so record writes overlap the callbacks.
pub(super) const ENDING_SLOTS: usize = 32;

impl JobService {
    /// Takes item tasks while this replica has permits, until shutdown begins.
    pub async fn take_items(self: Arc<Self>, cluster: Arc<Cluster>, stop: CancellationToken) {
        tracing::info!(stream = %cluster.settings().stream, consumer = %cluster.settings().consumer, "taking item tasks");
        let mut consumer = None;
        'permits: while let Some(permit) = self.pipeline.permit().await {
            loop {
                if self.pipeline.is_stopping() {
                    // Draining: the permit goes back, and queued tasks stay for the other replicas.
                    break 'permits;
                }
                let Some(current) = consumer.as_ref() else {
                    match cluster.consumer().await {
                        Ok(c) => consumer = Some(c),
                        Err(e) => {
                            tracing::warn!(error = %Report(&e), "item stream not reachable");
                            if pause(&stop).await {
                                break 'permits;
                            }
                        }
                    }
                    continue;
                };
                let fetched = tokio::select! {
                    batch = async {
                        let mut batch = current.fetch().max_messages(1).expires(FETCH_WAIT).messages().await?;
                        batch.next().await.transpose()
                    } => batch,
                    () = stop.cancelled() => break 'permits,
                };
                match fetched {
                    Ok(Some(message)) => {
                        let this = self.clone();
                        let cluster = cluster.clone();
                        spawn_tracked(self.pipeline.tasks(), "item_task", async move {
                            this.handle_task(&cluster, message, permit).await;
                        });
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "item fetch failed");
                        consumer = None;
                        if pause(&stop).await {
                            break 'permits;
                        }
                    }
                }
            }
        }
        tracing::info!("no longer taking item tasks");
    }

    async fn handle_task(
        &self,
        cluster: &Cluster,
        message: jetstream::Message,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let Ok(task) = serde_json::from_slice::<ItemTask>(&message.payload) else {
            tracing::error!("item task unreadable; dropped");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        // Its own trace's span, or its job's (the submitter's `job` span, from the headers): not a child of the
        // replica's long-lived `take_items` task, which put every item of every job into one trace that ended only
        // when the process did.
        let span = tracing::info_span!(parent: None, "item", job_id = %task.job_id, idx = task.idx);
        crate::telemetry::adopt_trace_headers(&span, |name| {
            message.headers.as_ref()?.get(name).map(|v| v.as_str())
        });
        self.handle_parsed(cluster, &message, task, permit)
            .instrument(span)
            .await;
    }

    async fn handle_parsed(
        &self,
        cluster: &Cluster,
        message: &jetstream::Message,
        task: ItemTask,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let info = message.info().ok();
        let delivered = info.as_ref().map_or(1, |info| info.delivered.max(1) as u64);
        // JetStream's publish time: tells a later submission's task from the first's (`orphans`).
        let published = info.map(|info| info.published);
        let renew = async {
            let mut every = tokio::time::interval(cluster.settings().progress_every());
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, idx = task.idx, "item lease not renewed");
                }
            }
        };
        // Held here until acknowledged: another task of its item held here meanwhile (this one delivered again, its
        // lease run out under this holder; or published again by a resubmission) waits for this one to end, its lease
        // renewed, instead of finding the item half-done (`held`).
        let run = async {
            let held = cluster
                .held
                .hold(&task, || {
                    tracing::info!(job_id = %task.job_id, idx = task.idx, delivered, "item task delivered again while held here (its lease ran out), or a second task of the item; waiting for the first to end");
                })
                .await;
            (
                self.run_task(cluster, &task, delivered, published, permit)
                    .await,
                held,
            )
        };
        let (end, _held) = tokio::select! {
            ended = run => ended,
            () = renew => unreachable!("renews until the task ends"),
        };
        let acked = match end {
            TaskEnd::Done => message.double_ack().await,
            TaskEnd::Again(delay) => message.ack_with(AckKind::Nak(Some(delay))).await,
            TaskEnd::Drop => message.ack_with(AckKind::Term).await,
        };
        if let Err(e) = acked {
            tracing::warn!(job_id = %task.job_id, idx = task.idx, error = %e, "item task not acknowledged; it comes back, and finds its item recorded");
        }
    }

    async fn run_task(
        &self,
        cluster: &Cluster,
        task: &ItemTask,
        delivered: u64,
        published: Option<async_nats::datetime::DateTime>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> TaskEnd {
        let idx = task.idx;
        // Waited for here, lease renewed, rather than put back: every redelivery counts against
        // NATS_MAX_DELIVERIES.
        let waiting_since = tokio::time::Instant::now();
        let key = task_key(task);
        let item_job = task.job();
        // The consumer's last delivery of this task (`max_deliver` is one past NATS_MAX_DELIVERIES): JetStream never
        // delivers a task put back now again, so its item would never end (no record, no callback, the job never
        // settled). A drain then does not put the task back: it keeps reading and waiting within SHUTDOWN_GRACE_SEC,
        // and the item ends below as this delivery ends it (`too_many_deliveries`, or as recorded). Should the grace
        // run out first, the task is lost just as a NAK would lose it.
        let last = delivered > cluster.settings().max_deliveries;
        let stopping = || self.pipeline.is_stopping() && !last;
        let mut logged_wait = false;
        // `unrunnable`: why the job is recorded but cannot run here; its item then ends FAILED instead of running.
        let (job, unrunnable) = loop {
            let found = match patiently(task, stopping, || self.job_of(cluster, task)).await {
                Ok(found) => found,
                Err(Unread::Stopping) => return TaskEnd::Again(Duration::ZERO),
                Err(Unread::Corrupt(e)) => {
                    cluster.orphans.found(&item_job);
                    let why = format!("its record does not decode here ({})", Report(&e));
                    break (unrunnable::stand_in(task, None), Some(why));
                }
            };
            match found {
                Fetched::Job(job) => {
                    cluster.orphans.found(&item_job);
                    break (job, None);
                }
                // Recorded all the same: waiting for a record changes nothing, and dropping the task left the item
                // without an end (no record, no callback, WatchJob never ending).
                Fetched::Unplannable { record, why } => {
                    cluster.orphans.found(&item_job);
                    break (unrunnable::stand_in(task, Some(&record)), Some(why));
                }
                Fetched::NotRecorded
                    if cluster.orphans.waited(&item_job, published) < ORPHAN_AFTER
                        || waiting_since.elapsed() < RECORD_GRACE => {}
                Fetched::NotRecorded => {
                    tracing::warn!(job_id = %task.job_id, idx, "item task of a job never recorded (or of a spec replaced); dropped");
                    return TaskEnd::Drop;
                }
            }
            if stopping() {
                // Draining: waiting out the orphan window here held the drain up to ORPHAN_AFTER past its grace.
                // Put back at once; another replica waits for the record (or drops the task) instead. Not on the
                // last delivery (`last`): the task waits on here, and ends when the record comes or is dropped.
                return TaskEnd::Again(Duration::ZERO);
            }
            // A job known here is being recorded this instant (this replica took its SubmitJob): look again soon.
            let known = self.registry.get(&key).is_ok();
            // Tasks routinely arrive milliseconds before their record; only a longer wait is worth a line.
            if !known && !logged_wait && waiting_since.elapsed() >= RECORD_GRACE {
                logged_wait = true;
                tracing::info!(job_id = %task.job_id, idx, "item task's job not recorded yet; waiting for its record");
            }
            tokio::time::sleep(if known { RECORD_POLL } else { ORPHAN_POLL }).await;
        };
        let reporter = self.pipeline.reporter();
        let recorded =
            match patiently(task, stopping, || cluster.store().item(&item_job, idx)).await {
                Ok(recorded) => recorded,
                Err(Unread::Stopping) => return TaskEnd::Again(Duration::ZERO),
                // Some terminal state is recorded, if unreadable here: the item is not run again.
                Err(Unread::Corrupt(_)) => return TaskEnd::Done,
            };
        if let Some(recorded) = recorded {
            // Ended already: by another replica, or here before a crash; only an unsettled callback is resent.
            let _slot = ending_slot(cluster, permit).await;
            if let Some(end) =
                late::call_back_recorded(cluster, reporter, task, &job, recorded, last).await
            {
                return end;
            }
            return late::release(cluster, reporter, task, &job, last, stopping).await;
        }
        if delivered > cluster.settings().max_deliveries {
            let outcome = ItemOutcome::Failed {
                code: TOO_MANY_DELIVERIES,
                message: format!(
                    "the image was handed out {} times and never finished (the orchestrators running it stopped); \
                     given up",
                    delivered - 1
                ),
            };
            tracing::warn!(job_id = %task.job_id, idx, delivered, "item delivered too often; given up");
            self.end_here(&job, idx, outcome, last).await;
        } else if job.cancel.is_cancelled() {
            let _slot = ending_slot(cluster, permit).await;
            self.end_here(&job, idx, ItemOutcome::Cancelled, last).await;
        } else if let Some(why) = unrunnable {
            if delivered < cluster.settings().max_deliveries {
                // During a rolling upgrade or config change another replica may read or plan it: put back (each
                // time a delivery), and fail it only on the last delivery that may run it.
                tracing::warn!(job_id = %task.job_id, idx, delivered, reason = %why, "recorded job cannot run here; put back for another replica");
                return TaskEnd::Again(cluster.settings().progress_every());
            }
            tracing::error!(job_id = %task.job_id, idx, reason = %why, "recorded job cannot run on any replica that took it; its item fails");
            self.end_here(&job, idx, unrunnable::outcome(&why), last)
                .await;
        } else if self.pipeline.is_stopping() {
            // Shutting down: another replica runs it (or, past NATS_MAX_DELIVERIES, gives it up: this is not the last
            // delivery, which ended the item above).
            return TaskEnd::Again(Duration::ZERO);
        } else {
            // Every replica's view shows the item RUNNING from here on (`mirror`). A claim that is not written only
            // leaves the others showing it PENDING until it ends: the item runs all the same.
            let claim = RunClaim {
                replica: cluster.replica_id().to_string(),
                delivery: delivered,
            };
            if let Err(e) = cluster.store().claim(&task.job(), idx, &claim).await {
                tracing::warn!(job_id = %task.job_id, idx, error = %Report(&e), "item claim not recorded");
            }
            if let Some(item) = self.pipeline.execute_item(&job, idx, permit, true).await {
                metrics::counter!("orchestrator_item_tasks_run_total").increment(1);
                reporter.item_ended_now(&job, item, last).await;
            }
        }
        // Released only once the terminal state is recorded: a crash before that leaves the task to another replica.
        late::release(cluster, reporter, task, &job, last, stopping).await
    }

    /// Ends item `idx` here with `outcome`, if it is still open here, and reports it before returning (not when it
    /// ended here already: `late::release` then finds how). `last`: the task's last delivery.
    async fn end_here(&self, job: &Arc<JobHandle>, idx: u32, outcome: ItemOutcome, last: bool) {
        let reporter = self.pipeline.reporter();
        if let Some(item) = job.finish_item(idx, outcome, reporter.callbacks_on()) {
            reporter.item_ended_now(job, item, last).await;
        }
    }

    /// The task's job, as this replica knows it or as the bucket records it; None while no job with the task's spec
    /// is recorded. Even the replica that took SubmitJob, which knows the job before it is recorded, waits for the
    /// record: an item never runs for a job whose submission failed, and its claim never precedes the job's record
    /// in the bucket (the other replicas' watches would find no job to show it RUNNING in).
    async fn job_of(
        &self,
        cluster: &Cluster,
        task: &ItemTask,
    ) -> Result<Fetched, crate::jobs::store::StoreError> {
        let key = task_key(task);
        if let Ok(job) = self.registry.get(&key)
            && job.spec_hash == task.spec_hash
        {
            if job.cancel.is_cancelled() {
                // Known cancelled here only once recorded so, and a cancel is final: nothing the record could say
                // now changes what the task does (each of a cancelled 10,000-image job's tasks read it again).
                return Ok(Fetched::Job(job));
            }
            let record = cluster
                .store()
                .job(&task.user_id, &task.job_id)
                .await?
                .filter(|record| record.spec_hash == task.spec_hash);
            let Some(record) = record else {
                return Ok(Fetched::NotRecorded);
            };
            // This replica's handle is its own submission's, and another try of it (a client retrying on another
            // replica) recorded the job first, under its seq: the recorded run is the job, the one a cancel reaches
            // (the watch swaps it in here, maybe not yet). Unplannable here, this handle stands in, as before.
            if record.seq != job.seq
                && let Fetched::Job(recorded) = self.fetch_recorded(cluster, &key).await?
                && recorded.spec_hash == task.spec_hash
            {
                return Ok(Fetched::Job(recorded));
            }
            // The record read now may be newer than this replica's view (its watch lags): a cancel recorded
            // meanwhile stops the item here instead of running it.
            if record.cancelled && !job.cancel.is_cancelled() {
                job.cancel.cancel();
            }
            return Ok(Fetched::Job(job));
        }
        Ok(match self.fetch_recorded(cluster, &key).await? {
            Fetched::Job(job) if job.spec_hash != task.spec_hash => Fetched::NotRecorded,
            Fetched::Unplannable { record, .. } if record.spec_hash != task.spec_hash => {
                Fetched::NotRecorded
            }
            fetched => fetched,
        })
    }
}

fn task_key(task: &ItemTask) -> JobKey {
    JobKey {
        user_id: task.user_id.clone(),
        job_id: task.job_id.clone(),
    }
}

/// One of the ENDING_SLOTS, for the item `permit` was taken for (the permit is given back once it is had: the
/// slots' own wait is the back-pressure on taking more tasks).
async fn ending_slot(
    cluster: &Cluster,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> tokio::sync::OwnedSemaphorePermit {
    let slot = cluster
        .ending
        .clone()
        .acquire_owned()
        .await
        .expect("the ending slots are never closed");
    drop(permit);
    slot
}

/// Waits RETRY_PAUSE; true when `stop` came first.
async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(RETRY_PAUSE) => false,
        () = stop.cancelled() => true,
    }
}
