//! Jobs to items: schedules each item of a job on the `ItemRunner`, ends it in exactly one terminal state, and
//! hands it to `report` (metrics, its one callback, its durable record).
//!
//! A process-wide semaphore of BATCH_CONCURRENCY permits bounds the images in flight, whatever the number or size
//! of jobs; a job's items are started one by one as permits free up, never loaded all at once.

use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::durable;
use super::edit;
use super::item::{ItemError, ItemRunner};
use super::job::{ItemOutcome, JobHandle, is_terminal};
use super::report::Reporter;
use super::stage::{InFlight, Stage, Waiting};
use super::store::SharedJobStore;
use crate::callback::CallbackSender;
use crate::error::Report;

#[derive(Debug)]
pub struct Pipeline {
    runner: Arc<ItemRunner>,
    reporter: Reporter,
    permits: Arc<Semaphore>,
    /// Every job runner and callback task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Fired at shutdown: no new item starts; items not started end FAILED so each still gets its callback.
    stopping: CancellationToken,
    /// Fired near the end of the grace period: items still running that nothing will run again (no job store, not
    /// from a queue) end FAILED now, so each still gets its callback before the process exits.
    out_of_time: CancellationToken,
    /// Runs handed over whose items in flight a later run of the job waits for (`handed_over`).
    handed_over: super::handed_over::HandedOverRuns,
}

impl Pipeline {
    pub fn new(
        runner: ItemRunner,
        callbacks: Option<Arc<CallbackSender>>,
        concurrency: usize,
    ) -> Self {
        let tasks = TaskTracker::new();
        Waiting::register();
        let stopping = CancellationToken::new();
        Pipeline {
            reporter: Reporter::new(runner.store().clone(), callbacks, tasks.clone(), None)
                .with_stopping(stopping.clone()),
            runner: Arc::new(runner),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            tasks,
            stopping,
            out_of_time: CancellationToken::new(),
            handed_over: Default::default(),
        }
    }

    /// Keeps every job's terminal items in `job_store` (see `report`), and leaves unstarted items to the next start
    /// at shutdown instead of failing them: a restarted process resumes them.
    pub fn with_job_store(mut self, job_store: Option<SharedJobStore>) -> Self {
        self.reporter = Reporter::new(
            self.runner.store().clone(),
            self.reporter.callbacks().cloned(),
            self.tasks.clone(),
            job_store,
        )
        .with_stopping(self.stopping.clone());
        self
    }

    /// JOB_STORE=nats: item records are retried this long while NATS is unreachable, instead of written once.
    pub fn with_store_patience(mut self, patience: std::time::Duration) -> Self {
        self.reporter = self.reporter.with_store_patience(patience);
        self
    }

    /// One of the BATCH_CONCURRENCY permits (the replica's admission), once free; None once shutdown began.
    pub(super) async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            biased;
            _ = self.stopping.cancelled() => None,
            permit = self.permits.clone().acquire_owned() => permit.ok(),
        }
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// `JobService::hand_over`: a later run of `job` here waits for the items it still holds (`handed_over`).
    pub(super) fn keep_handed_over(&self, job: &Arc<JobHandle>) {
        self.handed_over.keep(job);
    }

    /// `JobService::give_up_durable`: waits for every item earlier runs of `job` handed over here still hold (at
    /// most `handed_over`'s bound). A shutdown does not cut it short: those items run on through the drain, and an
    /// item ended FAILED here first would stand over the end they record (the give-up's delivery is the job's last);
    /// the drain's grace bounds it all.
    pub(super) async fn wait_for_handed_over_runs(&self, job: &Arc<JobHandle>) {
        self.handed_over.wait_for_all(job).await;
    }

    pub(super) fn reporter(&self) -> &Reporter {
        &self.reporter
    }

    /// Where inputs, outputs and durable item records are.
    pub(super) fn object_store(&self) -> &crate::storage::SharedStore {
        self.runner.store()
    }

    /// Shutdown: starts no further item; the runner of each job ends its unstarted items (see `abandon_pending`).
    pub fn stop_starting(&self) {
        self.stopping.cancel();
    }

    /// Shutdown, the grace period nearly over: items still running end FAILED where nothing would run them again
    /// (see `abandoned`), with their callbacks; the others are left to their job store or queue.
    pub fn out_of_time(&self) {
        self.out_of_time.cancel();
    }

    /// Resolves once `job`'s running items must end for the shutdown: only for a job no job store keeps and no queue
    /// redelivers (JOB_STORE=memory), whose items would otherwise be cut off unreported at exit.
    async fn abandoned(&self, job: &Arc<JobHandle>) {
        if job.plan.durable_items || self.reporter.job_store_of(job).is_some() {
            return std::future::pending().await;
        }
        self.out_of_time.cancelled().await;
    }

    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn store(&self) -> &crate::storage::SharedStore {
        self.runner.store()
    }

    pub fn segmenter(&self) -> &crate::segmenter::Segmenter {
        self.runner.segmenter()
    }

    pub fn pixel_budget(&self) -> &super::item::PixelBudget {
        self.runner.pixel_budget()
    }

    /// Runs the job's items in the background; `on_end` runs once every item it started has ended.
    pub fn spawn_job(
        self: &Arc<Self>,
        job: Arc<JobHandle>,
        on_end: impl FnOnce() + Send + 'static,
    ) {
        let this = self.clone();
        let span = tracing::info_span!(
            parent: None,
            "job",
            job_id = %job.plan.job_id,
            images = job.plan.image_count
        );
        self.tasks.spawn(
            async move {
                this.run_job(job).await;
                on_end();
            }
            .instrument(span),
        );
    }

    /// Ends every item not yet terminal as CANCELLED (each with its callback) and stops work in flight.
    pub fn cancel(&self, job: &Arc<JobHandle>) {
        let ended = job.cancel_pending(self.reporter.callbacks_on());
        self.reporter.items_ended(job, ended);
    }

    async fn run_job(self: Arc<Self>, job: Arc<JobHandle>) {
        // What a later edit of this job reads back, written before any item starts, so it is there when the job is
        // finished (an edit of a running job is refused). Without it the job still runs; only edits of it fail.
        if let Err(e) = edit::record::write_photos_patiently(self.runner.store(), &job.plan).await {
            tracing::error!(error = %Report(&e), "the job's photos record was not written: edits of it are refused (or read an earlier run's record of this job id)");
        }
        // The items not ended yet (a resumed job's recorded ones are) wait here until they start: the backlog an
        // autoscaler reads (`orchestrator_items_waiting`). Whatever ends this loop, what is left goes back with it.
        let open: Vec<bool> = job
            .snapshot()
            .items
            .iter()
            .map(|item| !is_terminal(item.state))
            .collect();
        let mut waiting = Waiting::new(open.iter().filter(|&&open| open).count() as u32);
        let mut items = JoinSet::new();
        for idx in 0..job.plan.image_count {
            let permit = tokio::select! {
                biased;
                _ = job.cancel.cancelled() => break,
                _ = self.stopping.cancelled() => {
                    self.abandon_pending(&job);
                    break;
                }
                // Another worker runs the rest (ADAPTER=queue_pull, `JobService::hand_over`).
                _ = job.handed_over.cancelled() => {
                    tracing::warn!(job_id = %job.plan.job_id, "job handed over to another worker: its unstarted items are left to it");
                    break;
                }
                permit = self.permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let share = if open.get(idx as usize).copied().unwrap_or(false) {
                waiting.take_one()
            } else {
                Waiting::none()
            };
            let this = self.clone();
            let job = job.clone();
            let span = tracing::info_span!("item", job_id = %job.plan.job_id, idx);
            items.spawn(
                async move { this.run_item(job, idx, permit, share).await }.instrument(span),
            );
            while items.try_join_next().is_some() {}
        }
        // Cancelled, or shutting down (its unstarted items ended, or left to the next start): none waits here now,
        // while the items in flight finish.
        drop(waiting);
        while items.join_next().await.is_some() {}
    }

    /// Items this process will not start (it is shutting down) end FAILED, with their callback, so the caller can
    /// resubmit them, unless something runs them later: a job store that survives the restart, or the queue.
    fn abandon_pending(&self, job: &Arc<JobHandle>) {
        if job.plan.durable_items {
            // The queue redelivers the job to another orchestrator, which runs these items: no failure callback.
            tracing::info!(job_id = %job.plan.job_id, "shutting down: unstarted items left to the job's redelivery");
            return;
        }
        if self.reporter.job_store_of(job).is_some() {
            tracing::info!(job_id = %job.plan.job_id, "shutting down: unstarted items resume at the next start");
            return;
        }
        let ended = (0..job.plan.image_count)
            .filter_map(|idx| {
                let outcome = ItemOutcome::Failed {
                    code: "internal",
                    message: "the orchestrator shut down before this image was processed; submit it again in a new \
                              job"
                        .to_string(),
                };
                job.finish_item_if_pending(idx, outcome, self.reporter.callbacks_on())
            })
            .collect();
        self.reporter.items_ended(job, ended);
    }

    /// `waiting`: the item's share of `orchestrator_items_waiting`, given back when it starts or ends unstarted.
    async fn run_item(
        &self,
        job: Arc<JobHandle>,
        idx: u32,
        permit: OwnedSemaphorePermit,
        waiting: Waiting,
    ) {
        // Held from here until its report settles: a later run of the job on this worker, should this one be handed
        // over, waits for it (`handed_over`). Taken before the hand-over check below, so none slips between.
        let _held = job.hold_unsettled(vec![idx]);
        // An earlier run of the job that this worker handed over may still have the item in hand: waited for
        // without a permit (other items run meanwhile), then its record tells the item's end.
        let permit = if job.plan.durable_items && self.handed_over.holds(&job, idx) {
            drop(permit);
            let waited = async {
                self.handed_over.wait_for_item(&job, idx).await;
                self.permits.clone().acquire_owned().await
            };
            tokio::select! {
                biased;
                _ = job.cancel.cancelled() => return drop(waiting),
                _ = self.stopping.cancelled() => return drop(waiting),
                _ = job.handed_over.cancelled() => return drop(waiting),
                permit = waited => match permit {
                    Ok(permit) => permit,
                    Err(_) => return drop(waiting),
                },
            }
        } else {
            permit
        };
        // A job run again (durable jobs): an item an earlier run finished is taken from its record (its callback sent
        // again if that run died sending it), never run again.
        if job.plan.durable_items {
            let read = durable::read_patiently(self.runner.store(), &job.plan, idx);
            // The read waits for as long as storage fails: a cancel (which ends the pending item) or a shutdown
            // (which leaves it to the queue's redelivery) does not wait for it, and nothing starts after.
            let recorded = tokio::select! {
                biased;
                _ = job.cancel.cancelled() => return drop((permit, waiting)),
                _ = self.stopping.cancelled() => return drop((permit, waiting)),
                _ = job.handed_over.cancelled() => return drop((permit, waiting)),
                recorded = read => recorded,
            };
            if let Some(recorded) = recorded {
                drop((permit, waiting));
                if self.reporter.restore_durable(&job, idx, recorded) {
                    tracing::info!("item already finished by an earlier run; not run again");
                }
                return;
            }
            if self.is_stopping() || job.handed_over.is_cancelled() {
                return drop((permit, waiting));
            }
        }
        // From here it runs (counted in flight), or it ended meanwhile (cancelled): waiting either way no longer.
        drop(waiting);
        if let Some(item) = self.execute_item(&job, idx, permit, false).await {
            self.reporter.item_ended(&job, item);
        }
    }

    /// Runs item `idx` (PENDING -> RUNNING -> terminal) under `permit`; the item if this call ended it (None when it
    /// was not pending, or was ended meanwhile by a cancel, which reports it). `task_held` (JOB_STORE=nats): this
    /// process holds the item's task, so it runs the item even when another replica's claim shows it RUNNING.
    pub(super) async fn execute_item(
        &self,
        job: &Arc<JobHandle>,
        idx: u32,
        permit: OwnedSemaphorePermit,
        task_held: bool,
    ) -> Option<super::job::Ended> {
        let started = if task_held {
            job.start_held_item(idx)
        } else {
            job.start_item(idx)
        };
        if !started {
            return None;
        }
        let _in_flight = InFlight::start();
        let stage = Stage::start("item");
        // A panic in the item's async steps (its CPU work already comes back as ItemError::Worker) ends the item
        // FAILED: unwinding past here would leave it RUNNING for ever, its job never terminal nor forgotten.
        let run = std::panic::AssertUnwindSafe(self.runner.run(&job.plan, idx, &job.swatches))
            .catch_unwind();
        let result = tokio::select! {
            result = run => result.unwrap_or_else(|panic| Err(ItemError::Panicked(panic_message(&*panic)))),
            _ = job.cancel.cancelled() => Err(ItemError::Cancelled),
            _ = self.abandoned(job) => Err(ItemError::ShutDown),
        };
        drop(permit);
        // Completed items only, as every stage: fast failures (input_missing) pulled the item latency down.
        if result.is_ok() {
            stage.finish();
        }
        let outcome = match result {
            Ok(result) => {
                tracing::info!(
                    outputs = result.outputs.len(),
                    masks = result.masks.len(),
                    reused = result.masks_reused,
                    "item completed"
                );
                ItemOutcome::Completed(result)
            }
            Err(ItemError::Cancelled) => ItemOutcome::Cancelled,
            Err(err) => {
                let message = Report(&err).to_string();
                tracing::warn!(job_id = %job.plan.job_id, idx, error = %message, "item failed");
                ItemOutcome::Failed {
                    code: err.code(),
                    message,
                }
            }
        };
        job.finish_item(idx, outcome, self.reporter.callbacks_on())
    }
}

/// What a panic said (its payload is a &str or a String when it came from `panic!` with a message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}
