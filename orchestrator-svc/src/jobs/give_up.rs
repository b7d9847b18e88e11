//! Poison jobs (ADAPTER=queue_pull): a job whose message keeps coming back because the orchestrators running it keep
//! dying is not run again past NATS_MAX_DELIVERIES. The orchestrator that receives it once more registers it
//! without running anything: items an earlier run recorded keep their record, every other item ends FAILED with
//! `too_many_deliveries` and its callback, and the message is then acknowledged like a finished job's.

use palette_proto::orchestrator::v1::{Job, JobSpec};

use super::job::ItemOutcome;
use super::registry::Submitted;
use super::{JobService, durable, validate};
use crate::error::ApiError;

/// `Item.error_code` of the items of a job given up.
pub const TOO_MANY_DELIVERIES: &str = "too_many_deliveries";

impl JobService {
    /// ADAPTER=queue_pull: this worker's lease on `job`'s message ran out unrenewed (cut off from NATS), so the queue
    /// gives the job to another worker. No item of it starts here any more (those in flight finish, and their first
    /// records decide against the other worker's), and it leaves the registry: a later delivery of the job to this
    /// worker starts a run of its own, reading what the others recorded, and what this run records of the items it
    /// still holds once they settle (`handed_over`: before, it ran them a second time, or called them back again).
    pub fn hand_over(&self, job: &std::sync::Arc<super::job::JobHandle>) {
        job.handed_over.cancel();
        self.pipeline.keep_handed_over(job);
        self.registry.remove(job);
        // The retained-jobs gauges, as a job forgotten would leave them.
        self.registry.trim();
    }

    /// Like `submit_durable`, but runs nothing: open items end FAILED (`TOO_MANY_DELIVERIES`) with their callbacks.
    /// A job this process already runs is left as it is.
    pub async fn give_up_durable(&self, spec: &JobSpec, deliveries: u64) -> Result<Job, ApiError> {
        let mut plan = validate::validate(spec, &self.presets, self.limits)?;
        plan.durable_items = true;
        plan.message_hash = Some(super::job::spec_hash(spec));
        let job = match self.registry.submit(plan)? {
            Submitted::Existing(job) => return Ok(job.snapshot()),
            Submitted::Created(job) => job,
        };
        tracing::warn!(job_id = %job.plan.job_id, deliveries, "queue_pull: job delivered too often; giving up on its open items");
        let reporter = self.pipeline.reporter();
        let mut ended = Vec::new();
        // Items a run handed over here still has in hand end there (not FAILED here, their end unheard).
        self.pipeline.wait_for_handed_over_runs(&job).await;
        for idx in 0..job.plan.image_count {
            // Read for as long as storage fails: a record missed turned an item an earlier run ended (and called
            // back) into a FAILED one, its record overwritten.
            if let Some(recorded) =
                durable::read_patiently(self.pipeline.object_store(), &job.plan, idx).await
            {
                reporter.restore_durable(&job, idx, recorded);
                continue;
            }
            let outcome = ItemOutcome::Failed {
                code: TOO_MANY_DELIVERIES,
                message: format!(
                    "the job was delivered {deliveries} times and never finished (the orchestrators running it \
                     stopped); given up"
                ),
            };
            ended.extend(job.finish_item(idx, outcome, reporter.callbacks_on()));
        }
        reporter.items_ended(&job, ended);
        Ok(job.snapshot())
    }
}
