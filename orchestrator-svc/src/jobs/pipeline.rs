//! Jobs to items: each item start to finish (see `item`), then its one callback.
//!
//! A process-wide semaphore of BATCH_CONCURRENCY permits bounds the images in flight, whatever the number or size
//! of jobs; a job's items are started one by one as permits free up, never loaded all at once.

use std::sync::Arc;
use std::time::Instant;

use palette_proto::orchestrator::v1::{Item, ItemState};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::durable;
use super::item::record_stage;
use super::mask_cache::MaskCache;
use super::registry::{ItemOutcome, JobHandle};
use crate::callback::{CallbackBody, CallbackSender, MaskRef, OutputRef};
use crate::error::Error;
use crate::segmenter::Segmenter;
use crate::storage::SharedStore;

#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    pub max_bytes: u64,
    pub max_pixels: u64,
}

#[derive(Debug)]
pub struct Pipeline {
    pub(super) store: SharedStore,
    pub(super) segmenter: Arc<Segmenter>,
    callbacks: Option<Arc<CallbackSender>>,
    permits: Arc<Semaphore>,
    pub(super) limits: InputLimits,
    pub(super) mask_cache: MaskCache,
    /// Every job runner and callback task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Fired at shutdown: no new item starts; items not started end FAILED so each still gets its callback.
    stopping: CancellationToken,
}

/// Counts items between start and end, whatever way they end.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        metrics::gauge!("orchestrator_items_in_flight").increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("orchestrator_items_in_flight").decrement(1.0);
    }
}

impl Pipeline {
    pub fn new(
        store: SharedStore,
        segmenter: Arc<Segmenter>,
        callbacks: Option<Arc<CallbackSender>>,
        concurrency: usize,
        limits: InputLimits,
        mask_cache_bytes: usize,
    ) -> Self {
        Pipeline {
            store,
            segmenter,
            callbacks,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            limits,
            mask_cache: MaskCache::new(mask_cache_bytes),
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
        }
    }

    /// Shutdown: starts no further item; the runner of each job ends its unstarted items (see `abandon_pending`).
    pub fn stop_starting(&self) {
        self.stopping.cancel();
    }

    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
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
        for item in job.cancel_pending(self.callbacks.is_some()) {
            self.after_terminal(job, item);
        }
    }

    async fn run_job(self: Arc<Self>, job: Arc<JobHandle>) {
        let mut items = JoinSet::new();
        for idx in 0..job.plan.image_count {
            let permit = tokio::select! {
                biased;
                _ = job.cancel.cancelled() => break,
                _ = self.stopping.cancelled() => {
                    self.abandon_pending(&job);
                    break;
                }
                permit = self.permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let this = self.clone();
            let job = job.clone();
            let span = tracing::info_span!("item", job_id = %job.plan.job_id, idx);
            items.spawn(async move { this.run_item(job, idx, permit).await }.instrument(span));
            while items.try_join_next().is_some() {}
        }
        while items.join_next().await.is_some() {}
    }

    /// Items this process will not start (it is shutting down) end FAILED, with their callback, so the caller can
    /// resubmit them; the registry is in memory and does not survive a restart.
    fn abandon_pending(&self, job: &Arc<JobHandle>) {
        if job.plan.durable_items {
            // The queue redelivers the job to another orchestrator, which runs these items: no failure callback.
            tracing::info!(job_id = %job.plan.job_id, "shutting down: unstarted items left to the job's redelivery");
            return;
        }
        for idx in 0..job.plan.image_count {
            let outcome = ItemOutcome::Failed {
                code: "internal",
                message: "the orchestrator shut down before this image was processed; submit it again in a new job"
                    .to_string(),
            };
            if let Some(item) = job.finish_item_if_pending(idx, outcome, self.callbacks.is_some()) {
                self.after_terminal(job, item);
            }
        }
    }

    async fn run_item(&self, job: Arc<JobHandle>, idx: u32, permit: OwnedSemaphorePermit) {
        // A job run again (durable jobs): an item an earlier run finished and called back is taken from its record.
        if job.plan.durable_items
            && let Some(recorded) = durable::read(&self.store, &job.plan, idx).await
        {
            drop(permit);
            if job.restore_item(idx, recorded) {
                tracing::info!("item already finished by an earlier run; not run again");
            }
            return;
        }
        if !job.start_item(idx) {
            return;
        }
        let _in_flight = InFlight::new();
        let started = Instant::now();
        let result = tokio::select! {
            result = self.process(&job.plan, idx) => result,
            _ = job.cancel.cancelled() => Err(Error::Cancelled),
        };
        drop(permit);
        record_stage("item", started);
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
            Err(Error::Cancelled) => ItemOutcome::Cancelled,
            Err(err) => {
                tracing::warn!(job_id = %job.plan.job_id, idx, error = %err, "item failed");
                ItemOutcome::Failed {
                    code: err.item_error_code(),
                    message: err.to_string(),
                }
            }
        };
        if let Some(item) = job.finish_item(idx, outcome, self.callbacks.is_some()) {
            self.after_terminal(&job, item);
        }
    }

    /// Metrics and the one callback of an item that just became terminal.
    fn after_terminal(&self, job: &Arc<JobHandle>, item: Item) {
        let state = ItemState::try_from(item.state)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN");
        metrics::counter!("orchestrator_items_total", "state" => state).increment(1);
        if job.is_terminal() {
            metrics::counter!("orchestrator_jobs_finished_total").increment(1);
        }
        let store = job.plan.durable_items.then(|| self.store.clone());
        let Some(sender) = self.callbacks.clone() else {
            if let Some(store) = store {
                let job = job.clone();
                self.tasks
                    .spawn(async move { durable::write(&store, &job, item.idx).await });
            }
            return;
        };
        let job = job.clone();
        self.tasks.spawn(async move {
            let body = callback_body(&item);
            let outcome = sender.deliver(&job.plan.job_id, &body).await;
            if !outcome.delivered {
                tracing::warn!(job_id = %job.plan.job_id, idx = item.idx, error = ?outcome.error, "callback not delivered");
            }
            job.record_callback(item.idx, outcome.delivered, outcome.attempts, outcome.error);
            // Durable jobs: recorded only once the callback is settled, so a rerun never sends it again.
            if let Some(store) = store {
                durable::write(&store, &job, item.idx).await;
            }
        });
    }
}

/// The callback body of a terminal item.
pub fn callback_body(item: &Item) -> CallbackBody {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let status = match ItemState::try_from(item.state) {
        Ok(ItemState::Completed) => "completed",
        Ok(ItemState::Failed) => "failed",
        _ => "cancelled",
    };
    CallbackBody {
        idx: item.idx,
        status,
        output_key: non_empty(&item.output_key),
        preview_key: non_empty(&item.preview_key),
        error: non_empty(&item.error),
        error_code: non_empty(&item.error_code),
        outputs: item
            .outputs
            .iter()
            .map(|o| OutputRef {
                rule_id: o.rule_id.clone(),
                output_key: o.output_key.clone(),
                applied: o.applied,
                not_applied_reason: non_empty(&o.not_applied_reason),
            })
            .collect(),
        masks: item
            .masks
            .iter()
            .map(|m| MaskRef {
                concept: m.concept.clone(),
                instance: m.instance,
                key: m.key.clone(),
            })
            .collect(),
    }
}
