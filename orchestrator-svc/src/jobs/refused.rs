//! A queued job refused for good (ADAPTER=queue_pull, its last delivery): the caller put it on the queue and hears
//! nothing else (no gRPC answer, no Runpod result), so each of its items is called back FAILED `invalid_job` with
//! the refusal, as the seed's contract has every item end in a state the caller is told about. Only where the
//! callback can name the job: its user id, job id and image count valid (they make the URL, the webhook ids and the
//! items), and a spec refused on its fields (`InvalidArgument`): a job id another spec holds (`JobExists`) would put
//! FAILED callbacks on that other job's URL, and other refusals are not about the job. Items an earlier delivery
//! finished (their record exists: they were called back; e.g. a replica with the job's preset ran part of it and
//! stopped) and jobs that exist under the key are left alone.

use futures::future::join_all;
use palette_proto::orchestrator::v1::JobSpec;

use super::{JobKey, JobService};
use crate::callback::{CallbackBody, CallbackJob};
use crate::error::{ApiError, Report};
use crate::keys;

/// `error_code` of the items of a queued job refused for good.
pub const INVALID_JOB: &str = "invalid_job";

impl JobService {
    /// Calls back every item of `spec` FAILED `invalid_job` with `error` (when callbacks are on and the refusal
    /// allows: see the module); how many callbacks were delivered.
    pub async fn call_back_refused(&self, spec: &JobSpec, error: &ApiError) -> usize {
        let ApiError::InvalidArgument(violations) = error else {
            return 0;
        };
        let names_the_job = !violations
            .iter()
            .any(|v| matches!(v.field.as_str(), "user_id" | "job_id" | "image_count"));
        let Some(sender) = self.pipeline.reporter().callbacks().cloned() else {
            return 0;
        };
        if !names_the_job {
            return 0;
        }
        // A job under this key exists (this replica's registry, or the shared job store): its items are its own to
        // report.
        if self.find(&JobKey::of_spec(spec)).await.is_ok() {
            return 0;
        }
        let spec_hash = super::job::spec_hash(spec);
        // Items an earlier delivery finished have their record (written before their callback): they were told, or
        // (their worker died mid-callback) their end is recorded, and no FAILED callback may contradict it.
        // Where the record cannot be looked up, the item is left out rather than maybe told twice.
        let store = self.pipeline.object_store();
        let mut open = Vec::new();
        for idx in 0..spec.image_count {
            let key = keys::item_marker(&spec.user_id, &spec.job_id, &spec_hash, idx);
            match store.head(&key).await {
                Ok(None) => open.push(idx),
                Ok(Some(_)) => {}
                Err(e) => {
                    tracing::warn!(%key, error = %Report(&e), "refused job: an item record cannot be looked up; not called back")
                }
            }
        }
        let about = CallbackJob {
            user_id: &spec.user_id,
            job_id: &spec.job_id,
            spec_hash: &spec_hash,
        };
        let message = format!("the job was refused: {error}");
        let sends = open.iter().map(|&idx| {
            let body = CallbackBody {
                idx,
                status: "failed",
                output_key: None,
                preview_key: None,
                error: Some(message.clone()),
                error_code: Some(INVALID_JOB.into()),
                user_id: spec.user_id.clone(),
                job_id: spec.job_id.clone(),
                outputs: Vec::new(),
                masks: Vec::new(),
            };
            let sender = sender.clone();
            async move { sender.deliver(about, &body).await }
        });
        let outcomes = join_all(sends).await;
        let delivered = outcomes.iter().filter(|o| o.delivered).count();
        tracing::warn!(
            job_id = %spec.job_id,
            items = open.len(),
            delivered,
            "queue_pull: refused job's items called back FAILED invalid_job"
        );
        delivered
    }
}
