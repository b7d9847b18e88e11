//! What follows an item's end: its metrics, its one callback, and (durable jobs) its record in storage, written
//! only once the callback is settled.

use std::sync::Arc;

use palette_proto::orchestrator::v1::{Item, ItemState};
use tokio_util::task::TaskTracker;

use super::durable;
use super::job::JobHandle;
use crate::callback::{CallbackBody, CallbackSender, MaskRef, OutputRef};
use crate::storage::SharedStore;
use crate::tasks::spawn_tracked;

/// Reports items that became terminal. Callback deliveries and record writes run as tasks of the pipeline's
/// tracker, so shutdown waits for them.
#[derive(Debug, Clone)]
pub struct Reporter {
    store: SharedStore,
    callbacks: Option<Arc<CallbackSender>>,
    tasks: TaskTracker,
}

impl Reporter {
    pub(super) fn new(
        store: SharedStore,
        callbacks: Option<Arc<CallbackSender>>,
        tasks: TaskTracker,
    ) -> Self {
        Reporter {
            store,
            callbacks,
            tasks,
        }
    }

    pub fn callbacks_on(&self) -> bool {
        self.callbacks.is_some()
    }

    /// Metrics and the one callback of an item that just became terminal.
    pub fn item_ended(&self, job: &Arc<JobHandle>, item: Item) {
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
                spawn_tracked(&self.tasks, "item_record", async move {
                    durable::write(&store, &job, item.idx).await
                });
            }
            return;
        };
        let job = job.clone();
        spawn_tracked(&self.tasks, "callback", async move {
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
                x: m.x,
                y: m.y,
                width: m.width,
                height: m.height,
                image_width: m.image_width,
                image_height: m.image_height,
            })
            .collect(),
    }
}
