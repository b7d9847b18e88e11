//! A queued job refused for good (ADAPTER=queue_pull, its last delivery): the caller put it on the queue and hears
//! nothing else (no gRPC answer, no Runpod result), so each of its items is called back FAILED `invalid_job` with
//! the refusal, as the seed's contract has every item end in a state the caller is told about. Only where the
//! callback can name the job: its user id, job id and image count valid (they make the URL, the webhook ids and the
//! items), and a spec refused on its fields (`InvalidArgument`): a job id another spec holds (`JobExists`) would put
//! FAILED callbacks on that other job's URL, and other refusals are not about the job.

use futures::future::join_all;
use palette_proto::orchestrator::v1::JobSpec;

use super::JobService;
use crate::callback::{CallbackBody, CallbackJob};
use crate::error::ApiError;

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
        let spec_hash = super::job::spec_hash(spec);
        let about = CallbackJob {
            user_id: &spec.user_id,
            job_id: &spec.job_id,
            spec_hash: &spec_hash,
        };
        let message = format!("the job was refused: {error}");
        let sends = (0..spec.image_count).map(|idx| {
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
            items = spec.image_count,
            delivered,
            "queue_pull: refused job's items called back FAILED invalid_job"
        );
        delivered
    }
}
